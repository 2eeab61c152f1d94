"""The course website's own Sphinx extension (docs/conf.py loads it).

What it adds to a plain Sphinx + myst-nb build:

* ``PAGES``: the files the site is built from, and ``toctree_markdown``: the site's navigation,
  appended (hidden) to the README when Sphinx reads it, so the README stays as GitHub shows it.
* A "Run it yourself" box under each notebook's title: how to run it, links to download it and
  its student version, and which mode (default or ``DEQLITE_FAST=1``) produced the outputs shown.
* The ``{modules}`` directive of the API reference: ``automodule`` for a package and every public
  module under it, found by walking the package, so a new module appears without editing a page.
* ``cache_path``: where myst-nb's execution cache lives, one per mode and per version of
  deqlite's source.
* In place of each interactive control (an ipywidgets output: sliders, a live redraw), a note
  that it works in JupyterLab: a static page has no kernel to move it, and the widgets'
  JavaScript would come from a CDN, which an offline reader does not reach.
* ``index.html`` in the built site, which sends the browser to the home page (README.html).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import pkgutil
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BENCHMARK_PAGES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.md") if p.stem != "README")
API_PAGES = ("core", "models", "data", "train", "classroom")

PAGES = ("README.md", "notebooks/README.md", "notebooks/INSTRUCTORS.md",
         *(f"notebooks/{name}" for name in NOTEBOOKS), "benchmarks/README.md",
         *(f"benchmarks/{name}.md" for name in BENCHMARK_PAGES),
         "docs/api/index.md", *(f"docs/api/{name}.rst" for name in API_PAGES))


def toctree_markdown() -> str:
    """The site's navigation, as MyST toctrees relative to the README (the root document)."""
    def toctree(caption, entries):
        return "\n".join(["", "```{toctree}", ":hidden:", f":caption: {caption}", "",
                          *entries, "```", ""])
    return (toctree("The course", ["notebooks/README",
                                   *(f"notebooks/{Path(n).stem}" for n in NOTEBOOKS)])
            + toctree("Teaching and measuring", ["notebooks/INSTRUCTORS", "benchmarks/README",
                                                 *(f"benchmarks/{n}" for n in BENCHMARK_PAGES)])
            + toctree("API reference", ["docs/api/index",
                                        *(f"docs/api/{n}" for n in API_PAGES)]))


def run_box(notebook: str, fast: bool) -> str:
    """The "Run it yourself" box of one notebook's page (MyST Markdown)."""
    mode = ("in **fast mode** (`DEQLITE_FAST=1`: small sizes, so the numbers are rough)" if fast
            else "in **default mode** (the sizes the notebook is written for)")
    return "\n".join([
        ":::{admonition} Run it yourself",
        ":class: tip",
        f"This page is `notebooks/{notebook}`, executed {mode} when the site was built.",
        "",
        f"* {{download}}`The student version <student/{notebook}>` has the exercises to write: "
        f"from a clone of the repository, `make lab` copies it to `work/{notebook}` (never "
        "overwriting your work) and opens JupyterLab there.",
        f"* {{download}}`This notebook, with solutions <{notebook}>`: "
        f"`make lab-instructor`, or `jupyter lab notebooks/{notebook}`.",
        "* `DEQLITE_FAST=1` before either command runs it with small sizes, in seconds; without "
        "it a notebook takes about a minute on a 2-core CPU.",
        ":::",
    ])


def add_run_box(app, docname: str, source: list) -> None:
    """``source-read``: insert the run box after a notebook's first cell (its title)."""
    name = docname.removeprefix("notebooks/") + ".ipynb"
    if docname == app.config.root_doc:
        source[0] += toctree_markdown()
    if not docname.startswith("notebooks/") or name not in NOTEBOOKS:
        return
    notebook = json.loads(source[0])
    box = {"cell_type": "markdown", "id": "deqlite-run-it-yourself", "metadata": {},
           "source": run_box(name, app.config.book_fast)}
    notebook["cells"].insert(1, box)
    source[0] = json.dumps(notebook)


class ModulesDirective(SphinxDirective):
    """``{modules} deqlite.train``: the package's docstring, then each public module under it
    (its docstring and members), one section per module. ``:flat:`` leaves out subpackages
    (the core is the flat ``deqlite`` package; its subpackages have pages of their own)."""

    required_arguments = 1
    option_spec = {"flat": directives.flag}

    def run(self) -> list:
        name = self.arguments[0]
        lines = [f".. automodule:: {name}", "   :no-members:", ""]
        for module in public_modules(name, flat="flat" in self.options):
            lines += [module, "-" * len(module), "", f".. automodule:: {module}", ""]
        node = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=f"modules:{name}"), node)
        return node.children


def public_modules(package: str, *, flat: bool) -> list[str]:
    """Every module under `package` whose dotted name has no part starting with "_" (so no
    ``__main__``, the command lines, and no private helper), in alphabetical order."""
    found = []
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        parts = info.name.split(".")[len(package.split(".")):]
        if any(p.startswith("_") for p in parts) or (flat and (info.ispkg or len(parts) > 1)):
            continue
        found.append(info.name)
    return sorted(found)


def escape_bars(app, what, name, obj, options, lines: list) -> None:
    """``autodoc-process-docstring``: deqlite's docstrings write absolute values and norms as
    ``|λ|``, which reStructuredText would read as substitutions; escape every ``|`` outside
    literal text (``...``) so it shows as written."""
    for i, line in enumerate(lines):
        parts = line.split("``")
        lines[i] = "``".join(p if k % 2 else p.replace("|", r"\|") for k, p in enumerate(parts))


def cache_path(root: Path, fast: bool) -> Path:
    """myst-nb's execution cache: build/book[-fast]/jupyter_cache/<hash of deqlite's code>.

    The hash covers each module's code without its docstrings and comments, so editing the
    API reference's text re-executes no notebook, and a change in what the code does
    re-executes them all."""
    digest = hashlib.sha256()
    for path in sorted((root / "deqlite").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + code_of(path).encode())
    return root / "build" / ("book-fast" if fast else "book") / "jupyter_cache" / digest.hexdigest()[:16]


def code_of(path: Path) -> str:
    """A module's code as its syntax tree, with the docstrings taken out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("Here the notebook shows an interactive control (ipywidgets): in JupyterLab, "
               "moving it redraws the figure. Run the notebook to use it.")


def replace_widgets(app, doctree) -> None:
    """``doctree-read``: each rendered widget view becomes a short note (see the module's
    docstring)."""
    for raw in list(doctree.findall(nodes.raw)):
        if WIDGET_VIEW in raw.astext():
            note = nodes.admonition(classes=["note", "deqlite-widget"])
            note += nodes.title(text="Interactive in JupyterLab")
            note += nodes.paragraph(text=WIDGET_NOTE)
            raw.replace_self(note)


def write_index(app, exception) -> None:
    """``build-finished``: index.html, a redirect to the home page, for web servers and browsers
    opening the folder."""
    if exception is not None or app.builder.format != "html":
        return
    home = app.builder.get_target_uri(app.config.root_doc)
    (Path(app.outdir) / "index.html").write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>deqlite</title>'
        f'<meta http-equiv="refresh" content="0; url={home}"></head>'
        f'<body><a href="{home}">deqlite: the course</a></body></html>\n', encoding="utf-8")


def setup(app) -> dict:
    app.add_config_value("book_fast", False, "env")        # conf.py: DEQLITE_FAST=1
    app.add_directive("modules", ModulesDirective)
    app.connect("source-read", add_run_box)
    app.connect("autodoc-process-docstring", escape_bars)
    app.connect("doctree-read", replace_widgets)
    app.connect("build-finished", write_index)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
