"""Build the course website: ``python docs/build.py [OUT]`` (what ``make book`` runs).

Runs Sphinx on the repository with docs/conf.py (``-W``: a warning, such as a broken
cross-reference or a docstring reStructuredText cannot read, fails the build; a notebook cell that
raises fails it too), into OUT/html (default build/book; ``DEQLITE_FAST=1`` for the notebooks'
fast mode, as ``make book-fast`` does), then says how many pages it made, how long it took and
where to open them. It writes OUT (the pages, Sphinx's doctrees, warnings.txt) and myst-nb's
execution cache, build/book/jupyter_cache/ (build/book-fast/ in fast mode) whatever OUT is,
so that ``make book`` and a build elsewhere share the executed notebooks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pages(html: Path) -> list[Path]:
    """The site's HTML pages (not the theme's assets)."""
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.relative_to(html).parts)


# a notebook's execution that ended this way says nothing about the notebook: once in a while
# the kernel and the client lose a message and both wait (seen with ipykernel 7), until the cell
# times out (docs/conf.py: nb_execution_timeout)
STALLS = ("Executing notebook failed: CellTimeoutError", "Executing notebook failed: DeadKernelError")


def build(out: Path, *, quiet: bool = False) -> int:
    """Sphinx's exit status for a build of the site into out/html. When a notebook's execution
    stalled, the build is run once more: the notebooks already executed come from the cache, so
    only the stalled one runs again; a notebook that fails for any other reason fails the build."""
    from sphinx.cmd.build import build_main
    warnings = out / "warnings.txt"
    args = ["-b", "html", "-c", str(ROOT / "docs"), "-W", "--keep-going", "-w", str(warnings),
            "-d", str(out / "doctrees"), str(ROOT), str(out / "html")]
    status = build_main((["-q"] if quiet else []) + args)
    if status and warnings.is_file() and any(s in warnings.read_text() for s in STALLS):
        print("A notebook's execution stalled (the cell timed out, or the kernel died); building "
              "once more, with the notebooks executed so far taken from the cache.", flush=True)
        status = build_main((["-q"] if quiet else []) + args)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/build.py", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default=ROOT / "build" / "book", type=Path,
                        help="the build folder (default: build/book); the site goes to OUT/html")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    mode = "fast mode (DEQLITE_FAST=1)" if os.environ.get("DEQLITE_FAST") == "1" else "default mode"
    print(f"Building the course website, notebooks in {mode}, into {args.out}/html ...", flush=True)
    start = time.perf_counter()
    status = build(args.out.resolve(), quiet=args.quiet)
    seconds = time.perf_counter() - start
    if status:
        print(f"The build failed after {seconds:.0f} s (the messages above say why).", file=sys.stderr)
        return status
    html = args.out / "html"
    print(f"{len(pages(html))} pages in {seconds:.0f} s. Open {html / 'index.html'}, or serve the "
          f"folder: python -m http.server -d {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
