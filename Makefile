# deqlite: the two commands a newcomer needs are `make lab` and `make test`.
# Each does its own set-up on a fresh machine (creates .venv, installs the kit).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deqlite-installed
BROWSER_STAMP := $(VENV)/.deqlite-browser-installed
BOOK_STAMP := $(VENV)/.deqlite-book-installed

WORK   ?= work
# JupyterLab refuses to run as root (containers) unless told it may
ROOT_OK := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: install lab lab-instructor test test-nbgrader nbval test-browser book book-fast student notebook-times clean

install: $(STAMP)

# Re-install only when the package metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# A learner's working copy: the student notebooks in work/ (the solutions in work/solutions/),
# copied once and never overwritten, git-ignored and never read by `make test`; without
# nbgrader's instructor tools (.jupyter/learner).
lab: install
	$(BIN)/python -m deqlite.classroom workspace $(WORK)
	JUPYTER_CONFIG_PATH=$(CURDIR)/.jupyter/learner $(BIN)/jupyter lab $(ROOT_OK) $(WORK)/

# The committed notebooks themselves, with nbgrader's lab extension (for instructors and authors).
lab-instructor: install
	$(BIN)/jupyter lab $(ROOT_OK) notebooks/

# pytest on tests/ in fast mode (DEQLITE_FAST=1), in 2 processes (pytest-xdist; each test runs on one
# thread), then every notebook run through nbgrader
# (tests/classroom/test_nbgrader.py): each solution notebook and its untouched student version
# executed top to bottom (no cell may fail but the autograder's tests of unwritten exercises, so
# this is nbval's check too) and a third submission with one planted mistake, autograded, and the
# gradebook's scores checked. tests/classroom/test_student.py fails if the solution notebooks'
# nbgrader metadata or notebooks/student/ is out of date.
test: install
	DEQLITE_FAST=1 $(BIN)/python -m pytest -n 2 --durations=15 tests
	$(BIN)/python -m pytest -m nbgrader tests/classroom/test_nbgrader.py

# The round trip alone. Minutes; DEQLITE_NBGRADER_ONLY=01,09 for a subset,
# DEQLITE_NBGRADER_WORKERS=N courses at once (default 2).
test-nbgrader: install
	$(BIN)/python -m pytest -m nbgrader tests/classroom/test_nbgrader.py

# nbval on every notebook, solution and student versions, in fast mode.
nbval: install
	DEQLITE_FAST=1 $(BIN)/python -m pytest --nbval-lax notebooks/*.ipynb notebooks/student/*.ipynb

# The nbgrader metadata of the solution notebooks (deqlite/classroom/grading.py), then the student
# notebooks generated from them with nbgrader's ClearSolutions and ClearHiddenTests.
student: install
	$(BIN)/python -m deqlite.classroom student

# The notebooks as a learner meets them: JupyterLab in headless Chromium (tests/browser/).
# Installs Debian's chromium with apt-get when it is missing; screenshots go to test-artifacts/browser/.
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,browser,book]'
	@touch $@

test-browser: install $(BROWSER_STAMP)
	bash tests/browser/ensure_chromium.sh
	$(BIN)/python -m pytest tests/browser -v

# The course as a website (Sphinx + myst-nb; docs/README.md): the READMEs, the notebooks executed
# in default mode, the instructors' guide, the benchmarks and the API reference, in
# build/book/html/ (open index.html, or serve it: python -m http.server -d build/book/html).
# Executed notebooks are cached: a rebuild re-executes only the notebooks whose code changed
# (every notebook after a change to deqlite's code; docstrings and comments do not count). `make book-fast` builds it in fast mode
# (DEQLITE_FAST=1, minutes) in build/book-fast/, which `make test-browser` then checks.
BOOK_OUT ?= build/book
$(BOOK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,book]'
	@touch $@

book: install $(BOOK_STAMP)
	$(BIN)/python docs/build.py $(BOOK_OUT)

book-fast: install $(BOOK_STAMP)
	DEQLITE_FAST=1 $(BIN)/python docs/build.py build/book-fast

# Every notebook run top to bottom in default mode, one after the other; the times go to
# benchmarks/notebook_times.md (the table in notebooks/INSTRUCTORS.md comes from it).
notebook-times: install
	$(BIN)/python benchmarks/notebook_times.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache test-artifacts
