"""The course website (``make book``) as a reader meets it, in headless Chromium.

The site is built in fast mode (``DEQLITE_FAST=1 python docs/build.py build/book-fast``: the
notebooks executed at their small sizes, cached under build/book-fast/ between runs) and served
from a local HTTP server in this process. Then every page of it is opened, and:

* it loads (status 200), nothing it asks for (a stylesheet, a script, an image) is missing, and
  it asks for nothing outside the site (the site works offline: MathJax is served with it, and
  the notebooks' interactive controls, which need a kernel, are replaced by a note);
* every image shows (decoded, with a size), and each notebook page has figures;
* the math renders: MathJax typesets every formula on the page, with no error marks;
* every link inside the site leads to a page or file that exists, and to an element with the
  anchor's id; links out of the site are counted, not followed (the machine may be offline);
* the search page finds ``anderson`` in the solvers' reference and in the notebooks.

The tests at the end check docs/book_ext.py without a browser: which files are pages, that the
navigation reaches each of them, and the API reference's list of modules.
"""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from .harness import REPO, REPORT

BUILD = REPO / "build" / "book-fast"
HTML = BUILD / "html"
sys.path.insert(0, str(REPO / "docs"))
import book_ext  # noqa: E402
from build import pages as site_pages  # noqa: E402  (docs/build.py)


@pytest.fixture(scope="session")
def site():
    """Build the site in fast mode and serve it on 127.0.0.1 (a random free port)."""
    start = time.perf_counter()
    env = dict(os.environ, DEQLITE_FAST="1")
    done = subprocess.run([sys.executable, str(REPO / "docs" / "build.py"), str(BUILD), "--quiet"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"the site's build failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    pages = [p.relative_to(HTML).as_posix() for p in site_pages(HTML)]
    REPORT.append(f"website: {len(pages)} pages built in {time.perf_counter() - start:.0f} s "
                  f"(fast mode, {BUILD})")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", pages
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def visited(site, browser):
    """Open every page once; what each one showed, keyed by its path in the site."""
    base, pages = site
    tab = browser.new_page()
    tab.set_default_timeout(60_000)
    failed_requests: list[str] = []
    tab.on("request", lambda r: failed_requests.append(f"{r.url} (outside the site)")
           if not r.url.startswith((base, "data:", "blob:")) else None)
    tab.on("requestfailed", lambda r: failed_requests.append(f"{r.url} ({r.failure})"))
    tab.on("response", lambda r: failed_requests.append(f"{r.url} (HTTP {r.status})")
           if r.status >= 400 else None)
    seen = {}
    try:
        for path in pages:
            failed_requests.clear()
            response = tab.goto(base + path, wait_until="load")
            tab.wait_for_function("() => !window.MathJax || !window.MathJax.startup"
                                  " || window.MathJax.startup.promise !== undefined")
            tab.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
            seen[path] = dict(status=response.status if response else None,
                              failed=list(failed_requests), **tab.evaluate(_PAGE_FACTS))
    finally:
        tab.close()
    return seen


# what one page shows, read in the page after MathJax is done
_PAGE_FACTS = """() => {
  const images = [...document.querySelectorAll('article img, main img')];
  return {
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    images: images.length,
    broken_images: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    widget_views: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
    widget_notes: document.querySelectorAll('.deqlite-widget').length,
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('.math mjx-container').length,
    math_errors: document.querySelectorAll('mjx-merror').length,
    raw_tex: [...document.querySelectorAll('article p')].filter(p => /\\$[^$\\s][^$]*\\$/.test(p.textContent)
             && !p.querySelector('code')).length,
  };
}"""


def test_every_page_loads_with_everything_it_asks_for(visited):
    assert len(visited) >= 25, sorted(visited)
    bad = {path: (facts["status"], facts["failed"]) for path, facts in visited.items()
           if facts["status"] != 200 or facts["failed"]}
    assert not bad, bad


def test_interactive_controls_are_a_note_not_a_dead_widget(visited):
    assert not {path: f["widget_views"] for path, f in visited.items() if f["widget_views"]}
    assert visited["notebooks/02_fixed_point_solvers.html"]["widget_notes"] >= 1   # its sliders


def test_every_figure_shows(visited):
    broken = {path: facts["broken_images"] for path, facts in visited.items() if facts["broken_images"]}
    assert not broken, broken
    for notebook in book_ext.NOTEBOOKS:
        path = f"notebooks/{Path(notebook).stem}.html"
        assert visited[path]["images"] >= 1, f"{path} shows no figure"
    REPORT.append(f"website: {sum(f['images'] for f in visited.values())} images, all decoded")


def test_the_math_renders(visited):
    with_math = {path: facts for path, facts in visited.items() if facts["math"]}
    assert len(with_math) >= len(book_ext.NOTEBOOKS), sorted(with_math)   # every notebook has math
    untypeset = {path: (f["math"], f["typeset"]) for path, f in with_math.items()
                 if f["typeset"] != f["math"] or f["math_errors"]}
    assert not untypeset, untypeset
    leftover = {path: f["raw_tex"] for path, f in visited.items() if f["raw_tex"]}
    assert not leftover, f"paragraphs with $...$ left as text: {leftover}"
    REPORT.append(f"website: {sum(f['math'] for f in with_math.values())} formulas typeset "
                  f"on {len(with_math)} pages")


def test_no_link_inside_the_site_is_broken(site, visited):
    base, _ = site
    broken, outside, checked = [], set(), 0
    for path, facts in visited.items():
        for link in facts["links"]:
            if not link.startswith(base):
                if link.startswith(("http://", "https://", "mailto:")):
                    outside.add(link)
                    continue
                broken.append(f"{path}: {link} (not a web link)")
                continue
            target, _, anchor = link[len(base):].partition("#")
            target = urllib.parse.unquote(target.split("?")[0]) or "index.html"
            checked += 1
            if not (HTML / target).is_file():
                broken.append(f"{path}: {link} (no such file)")
            elif anchor and target in visited and urllib.parse.unquote(anchor) not in visited[target]["ids"]:
                broken.append(f"{path}: {link} (no element with id {anchor!r})")
    assert not broken, "\n".join(broken[:40])
    REPORT.append(f"website: {checked} links inside the site all lead somewhere; "
                  f"{len(outside)} links out of it not followed")


def test_the_search_finds_anderson(site, browser):
    base, _ = site
    tab = browser.new_page()
    try:
        tab.goto(base + "search.html?q=anderson", wait_until="load")
        # Sphinx's search adds its results one by one, then says "Search finished, found N pages"
        tab.wait_for_function("() => /Search finished/.test(document.querySelector("
                              "'#search-results .search-summary')?.textContent || '')", timeout=60_000)
        summary = tab.text_content("#search-results .search-summary")
        hits = tab.eval_on_selector_all("#search-results ul.search li > a", "as => as.map(a => a.href)")
    finally:
        tab.close()
    assert f"found {len(hits)} pages" in summary, (summary, hits)
    assert any("docs/api/core.html" in h for h in hits), hits
    assert any("notebooks/02_fixed_point_solvers.html" in h for h in hits), hits
    REPORT.append(f"website: the search finds 'anderson' on {len(hits)} pages")


def test_each_notebook_page_says_how_to_run_it(visited):
    for notebook in book_ext.NOTEBOOKS:
        path = f"notebooks/{Path(notebook).stem}.html"
        student = [link for link in visited[path]["links"] if link.endswith(f"/{notebook}")
                   and "_downloads" in link]
        assert len(student) >= 2, f"{path}: no download links to the student and solution notebooks"
    downloads = sorted(HTML.glob("_downloads/*/*.ipynb"))
    students = [p for p in downloads if p.read_bytes() == (REPO / "notebooks" / "student" / p.name).read_bytes()]
    assert len(students) == len(book_ext.NOTEBOOKS), [p.relative_to(HTML) for p in downloads]


# --- docs/book_ext.py, without a browser --------------------------------------------------------

def test_the_pages_are_the_course_and_nothing_private():
    pages = set(book_ext.PAGES)
    assert {"README.md", "notebooks/README.md", "notebooks/INSTRUCTORS.md", "benchmarks/README.md"} <= pages
    assert {f"notebooks/{n}" for n in book_ext.NOTEBOOKS} <= pages
    assert len(book_ext.NOTEBOOKS) == len(list((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))) >= 10
    assert not any(p.startswith(("notebooks/answers", "notebooks/student")) for p in pages)
    assert all((REPO / p).is_file() for p in pages)


def test_the_navigation_reaches_every_page():
    toctree = book_ext.toctree_markdown()
    for page in book_ext.PAGES:
        if page != "README.md":
            assert "\n" + page.rsplit(".", 1)[0] + "\n" in toctree, page


def test_the_api_reference_lists_every_public_module():
    core = book_ext.public_modules("deqlite", flat=True)
    assert "deqlite.solvers" in core and "deqlite.deq" in core
    assert not any(m.startswith(("deqlite._", "deqlite.train")) for m in core)
    train = book_ext.public_modules("deqlite.train", flat=False)
    assert "deqlite.train.trainer" in train and "deqlite.train.configs.mnist_mdeq" in train
    assert not any("__main__" in m or "._" in m for m in train)
    for group in book_ext.API_PAGES:
        assert (REPO / "docs" / "api" / f"{group}.rst").read_text().count(".. modules::") == 1


def test_bars_are_escaped_outside_literals():
    lines = ["the spectral radius |λ| and ``a | b``", "no bar"]
    book_ext.escape_bars(None, "function", "f", None, {}, lines)
    assert lines == [r"the spectral radius \|λ\| and ``a | b``", "no bar"]


def test_the_cache_follows_the_code_not_the_docstrings(tmp_path):
    package = tmp_path / "deqlite"
    package.mkdir()
    module = package / "m.py"
    module.write_text('"""Doc."""\ndef f():\n    """Doc."""\n    return 1  # a comment\n')
    first = book_ext.cache_path(tmp_path, fast=True)
    module.write_text('"""Other doc."""\ndef f():\n    """Other."""\n    return 1\n')
    assert book_ext.cache_path(tmp_path, fast=True) == first
    assert book_ext.cache_path(tmp_path, fast=False) != first
    module.write_text('"""Other doc."""\ndef f():\n    return 2\n')
    assert book_ext.cache_path(tmp_path, fast=True) != first


@pytest.mark.parametrize("first_failure, calls", [("Executing notebook failed: CellTimeoutError", 2),
                                                  ("Executing notebook failed: CellExecutionError", 1)])
def test_a_stalled_notebook_is_built_once_more_and_a_failing_one_is_not(tmp_path, monkeypatch,
                                                                        first_failure, calls):
    import sphinx.cmd.build
    from build import build
    made = []

    def build_main(args):
        made.append(args)
        warnings = Path(args[args.index("-w") + 1])
        if len(made) == 1:
            warnings.write_text(f"WARNING: {first_failure}\n")
            return 2
        return 0

    monkeypatch.setattr(sphinx.cmd.build, "build_main", build_main)
    status = build(tmp_path)
    assert len(made) == calls and status == (0 if calls == 2 else 2)
