"""Fixtures for the browser tests: a throw-away JupyterLab server and headless Chromium.

These tests run only when asked for by path (`make test-browser`, i.e. `pytest tests/browser`);
`pytest tests` (what `make test` runs) skips this folder, so the normal suite needs no browser.

The server runs on 127.0.0.1 with a random free port and no token, on a copy of notebooks/ in a
temporary folder (so the autosaved outputs, `runs/` and checkpoints never touch the repository),
with its own Jupyter config, data, runtime, settings and workspace folders there too (so a learner's
own settings are neither used nor changed), and DEQLITE_FAST=1, which its kernels inherit. The
browser is Debian's chromium driven by Playwright (`DEQLITE_CHROMIUM` picks another binary), with
a fresh profile. Whatever happens, both are shut down, and the teardown fails if any process of
ours (server, kernel, browser) is left.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from .harness import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, HERE, REPORT, LabServer, kill_all, wait_until_gone


def pytest_ignore_collect(collection_path, config):
    """Collect this folder only when the command line names it (or something inside it)."""
    if collection_path == HERE or HERE not in collection_path.parents:
        return None
    for arg in config.args:
        target = Path(arg.split("::")[0]).resolve()
        if target == HERE or HERE in target.parents:
            return None
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("browser tests")
        for line in REPORT:
            terminalreporter.write_line(line)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def tmp_root():
    """The session's temporary folder. While it exists, SIGTERM (a CI timeout) interrupts the
    run like Ctrl-C, so that the fixtures below still shut the server and the browser down."""
    tmp = Path(tempfile.mkdtemp(prefix="deqlite-browser-"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield tmp
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def artifacts():
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    REPORT.append(f"screenshots: {ARTIFACTS}")
    return ARTIFACTS


@pytest.fixture(scope="session")
def lab(tmp_root):
    server = LabServer(tmp_root)
    try:
        server.start()
        REPORT.append(f"JupyterLab {_lab_version()} on {server.url} (a copy of notebooks/ in {server.root})")
        yield server
    finally:
        server.stop()
        is_jupyter = lambda cmd: "jupyter" in cmd or "ipykernel" in cmd   # noqa: E731
        left = wait_until_gone(tmp_root, is_jupyter, timeout=15)
        kill_all(left)
        assert not left, f"JupyterLab processes left after shutdown (now killed): {left}"


def _lab_version() -> str:
    from importlib.metadata import version
    return version("jupyterlab")


# --- Chromium ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def browser(tmp_root):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: run `make test-browser` (installs Debian's chromium) "
                    f"or set DEQLITE_CHROMIUM to a Chromium binary.")
    from playwright.sync_api import sync_playwright
    profile = tmp_root / "chromium-profile"
    is_chromium = lambda cmd: "chrom" in cmd.lower() or "playwright" in cmd   # noqa: E731
    playwright = sync_playwright().start()
    context = None
    try:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000}, timeout=120_000)
        REPORT.append(f"browser: {CHROMIUM}, {context.browser.version if context.browser else ''}")
        yield context
    finally:
        # either may fail if the browser died already (a signal to the whole process group)
        for close in ([context.close] if context is not None else []) + [playwright.stop]:
            try:
                close()
            except Exception as error:              # noqa: BLE001 -- still check for leftovers
                print(f"closing the browser: {error}")
        left = wait_until_gone(tmp_root, is_chromium, timeout=15)
        kill_all(left)
        assert not left, f"browser processes left after closing (now killed): {left}"


@pytest.fixture
def page(browser, lab, artifacts, request):
    """A fresh tab; on the way out a screenshot if the test failed, and the server's kernels are
    shut down (each notebook's kernel holds a few hundred MB)."""
    page = browser.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        try:
            if report is not None and report.failed:
                path = artifacts / f"FAILED-{request.node.name}.png"
                page.screenshot(path=str(path), full_page=False, timeout=30_000)
                print(f"failure screenshot: {path}\nJupyterLab log:\n{lab.log_tail()}")
        finally:
            page.close()
            lab.shutdown_kernels()
