"""Sphinx configuration of the deqlite course website (``make book``; docs/README.md explains it).

The site is built from the repository itself: Sphinx reads the repository root (``-c docs``
points here) but only the files named in ``include_patterns``: the README files, the solution
notebooks, the instructors' guide, the benchmarks' write-ups and the API reference pages in
docs/api/. myst-nb executes each notebook and caches the result (jupyter-cache), so a rebuild
re-executes only the notebooks whose code changed. The cache is kept per mode (``DEQLITE_FAST=1``
runs the notebooks' small sizes) and per version of deqlite's code, docstrings and comments
aside (a change to what the package does can change every output, so it re-executes every
notebook; ``book_ext.cache_path``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))          # book_ext, the site's own Sphinx extension
sys.path.insert(0, str(ROOT))          # deqlite itself, for autodoc

import book_ext  # noqa: E402

FAST = os.environ.get("DEQLITE_FAST") == "1"
book_fast = FAST                       # what each notebook page says produced its outputs

project = "deqlite"
author = "the deqlite authors"
copyright = "2026, the deqlite authors"
html_title = "deqlite: Deep Equilibrium Models, step by step"

root_doc = "README"                    # the home page is the repository's README
include_patterns = list(book_ext.PAGES)
exclude_patterns = [".git", ".venv", "build", "work", "data", "runs", "test-artifacts",
                    "notebooks/student", "notebooks/answers", "**/.ipynb_checkpoints"]

extensions = [
    "myst_nb",                         # Markdown (MyST) and executed notebooks
    "sphinx.ext.autodoc",              # the API reference from deqlite's docstrings
    "sphinx.ext.napoleon",             # their "Args:" sections
    "sphinx.ext.viewcode",             # each documented object links to its source
    "sphinx-mathjax-offline",          # MathJax 3 served from the site: the math renders offline
    "book_ext",
]

# -- notebooks (myst-nb) ----------------------------------------------------------------------
nb_execution_mode = "cache"
nb_execution_cache_path = str(book_ext.cache_path(ROOT, FAST))
nb_execution_in_temp = True            # runs/, checkpoints and logs go to a temporary folder
nb_execution_timeout = 300             # seconds per cell (a whole default-mode notebook takes ~1 min); docs/build.py
                                       # builds once more after a timeout (a stall, not the notebook)
nb_execution_raise_on_error = True     # a failing cell fails the build
nb_merge_streams = True
nb_execution_show_tb = True
nb_ipywidgets_js = {}                  # no widget JavaScript from a CDN: book_ext puts a note there
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3               # [text](#a-heading) links, as GitHub makes them

# -- the API reference ----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- HTML --------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_theme_options = {
    "use_download_button": True,       # each notebook page offers its .ipynb
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}
html_copy_source = True
html_show_sourcelink = False
html_favicon = "_static/favicon.svg"   # the fixed point: where the map's curve crosses the diagonal
