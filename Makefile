# deqlite: the two commands a newcomer needs are `make lab` and `make test`.
# Each does its own set-up on a fresh machine (creates .venv, installs the kit).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deqlite-installed

.PHONY: install lab test clean

install: $(STAMP)

# Re-install only when the package metadata changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

lab: install
	$(BIN)/jupyter lab notebooks/

# pytest on tests/ and nbval on every notebook, notebooks in fast mode (DEQLITE_FAST=1).
test: install
	DEQLITE_FAST=1 $(BIN)/python -m pytest tests --nbval-lax notebooks/*.ipynb

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
