"""The pieces the browser tests share: a throw-away JupyterLab server, and a census of the
processes this test session started (so the teardown can prove none is left)."""
from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts" / "browser"
VENV_BIN = Path(sys.executable).parent          # run jupyter from the environment running pytest
CHROMIUM = os.environ.get("DEQLITE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_TIMEOUT = 180          # s; the machine may be busy
REPORT: list[str] = []              # lines for the terminal summary


# --- processes -----------------------------------------------------------------------------------

def _proc_info(pid: int):
    """(ppid, cmdline, cwd) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        return ppid, cmdline, cwd
    except (OSError, IndexError, ValueError):
        return None


def our_processes(tmp: Path) -> dict[int, str]:
    """Processes started by this test session: descendants of pytest, and anything whose command
    line or working directory lies in our temporary folder (kernels run in their own session, so
    they would outlive a server killed hard). Zombies already reaped by nobody are ignored."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _proc_info(int(entry))) is not None:
            table[int(entry)] = info
    ours, me = {}, os.getpid()
    for pid, (ppid, cmdline, cwd) in table.items():
        if pid == me or not cmdline:                  # no cmdline: a zombie or a kernel thread
            continue
        ancestor, seen = ppid, set()
        while ancestor not in (0, 1, me) and ancestor in table and ancestor not in seen:
            seen.add(ancestor)
            ancestor = table[ancestor][0]
        if ancestor == me or str(tmp) in cmdline or cwd.startswith(str(tmp)):
            ours[pid] = cmdline[:160]
    return ours


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until_gone(tmp: Path, predicate, timeout: float) -> dict[int, str]:
    """Wait until no process of ours matching predicate(cmdline) is left; returns the leftovers."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: cmd for pid, cmd in our_processes(tmp).items() if predicate(cmd)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


# --- JupyterLab ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "notebooks"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self._cookies = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self._cookies))

    def api(self, path: str, method: str = "GET"):
        """Call the server's REST API. With no token, a request that changes something must
        carry the _xsrf cookie as a header, as the browser does: a page load sets the cookie."""
        headers = {}
        if method != "GET":
            if not any(c.name == "_xsrf" for c in self._cookies):
                self._opener.open(self.url + "/lab", timeout=30).read()
            headers = {"X-XSRFToken": next(c.value for c in self._cookies if c.name == "_xsrf")}
        request = urllib.request.Request(self.url + path, method=method, headers=headers)
        with self._opener.open(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def start(self) -> None:
        shutil.copytree(NOTEBOOKS, self.root,
                        ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints"))
        jupyter_dirs = {name: self.tmp / name.lower() for name in
                        ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")}
        settings, workspaces = self.tmp / "lab-settings", self.tmp / "lab-workspaces"
        # no "fetch Jupyter news?" toast: it covers the notebook and would reach for the internet
        notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ, DEQLITE_FAST="1",
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   **{k: str(v) for k, v in jupyter_dirs.items()})
        env.pop("MPLBACKEND", None)     # the kernel picks its inline backend, as for a learner
        command = [str(VENV_BIN / "jupyter"), "lab", "--no-browser",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
                   "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
                   f"--ServerApp.root_dir={self.root}",
                   f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}"]
        if os.geteuid() == 0:           # CI runs as root; JupyterLab refuses that unless told
            command.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer on {self.url} within "
                                       f"{SERVER_START_TIMEOUT} s:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def shutdown_kernels(self) -> None:
        """Shut every kernel down through the API, and wait until their processes are gone."""
        try:
            for kernel in self.api("/api/kernels"):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        wait_until_gone(self.tmp, lambda cmd: "ipykernel" in cmd, timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.shutdown_kernels()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
