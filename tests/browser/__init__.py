# A package, so that this folder's conftest is imported as `browser.conftest` and never shadows
# tests/conftest.py, which the other tests import as `conftest`.
