# deqlite: the two commands a newcomer needs are `make lab` and `make test`.
# Each does its own set-up on a fresh machine (creates .venv, installs the kit).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deqlite-installed
BROWSER_STAMP := $(VENV)/.deqlite-browser-installed

.PHONY: install lab test test-browser student clean

install: $(STAMP)

# Re-install only when the package metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

# pytest on tests/ and nbval on every notebook, solution and student versions, in fast mode
# (DEQLITE_FAST=1). tests/test_classroom.py fails if notebooks/student/ is out of date.
test: install
	DEQLITE_FAST=1 $(BIN)/python -m pytest tests --nbval-lax notebooks/*.ipynb notebooks/student/*.ipynb

# The student notebooks, generated from the solution notebooks with nbgrader's ClearSolutions.
student: install
	$(BIN)/python -m deqlite.classroom student

# The notebooks as a learner meets them: JupyterLab in headless Chromium (tests/browser/).
# Installs Debian's chromium with apt-get when it is missing; screenshots go to test-artifacts/browser/.
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,browser]'
	@touch $@

test-browser: install $(BROWSER_STAMP)
	bash tests/browser/ensure_chromium.sh
	$(BIN)/python -m pytest tests/browser -v

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache test-artifacts
