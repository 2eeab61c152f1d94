"""Plots that update in place while a solver runs, in JupyterLab, and stay as a normal static figure
in a saved or headless notebook.

How the live part works: the figure is a plain ``matplotlib.figure.Figure`` (not registered with
pyplot, so the inline backend never shows a second copy at the end of the cell). It is rendered to
a PNG, shown once with ``IPython.display.display(..., display_id=True)``, and then *replaced*
through that display handle, at most every ``min_interval`` seconds, so the output area holds one
image that changes instead of a pile of frames; the last frame is what a saved notebook keeps.
Rendering the PNG ourselves works whatever matplotlib backend the kernel has. Outside IPython
nothing is displayed; the figure is still there to save or inspect.
"""
from __future__ import annotations

import io
import time
import warnings
from typing import Iterable, Mapping, Optional

import torch
from matplotlib.figure import Figure

from .stats import SolverStats


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A live plot's first frame may have a single y value (a log axis with only the `tol`
        # line): matplotlib widens the range itself, but would print a warning for the learner.
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high")
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def ensure_figure_display() -> None:
    """Make ``display(fig)`` (or a figure as a cell's last value) show a picture in a notebook
    even if pyplot was never imported there, which is what normally teaches IPython to draw
    matplotlib figures. Does nothing outside a notebook or when a formatter exists already."""
    if not _in_notebook():
        return
    from IPython import get_ipython
    png = get_ipython().display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, _figure_png)


class LiveFigure:
    """A figure shown once in the notebook and redrawn in place by ``update()``."""

    def __init__(self, fig: Figure, *, min_interval: float = 0.25):
        self.fig, self.min_interval = fig, min_interval
        self._handle = None
        self._draw_time = 0.0
        if _in_notebook():
            from IPython.display import display
            self._handle = display(self._png(), display_id=True)
        self._last = time.perf_counter()

    def _png(self):
        from IPython.display import Image
        return Image(data=_figure_png(self.fig), format="png")

    def update(self, force: bool = False) -> None:
        """Redraw now if ``force`` or if ``min_interval`` seconds passed since the last redraw."""
        # wait at least min_interval, and 5× the last draw's time, *after* the last draw ended,
        # so that drawing never takes more than a small share of the work it shows
        wait = max(self.min_interval, 5 * self._draw_time)
        if not force and time.perf_counter() - self._last < wait:
            return
        start = time.perf_counter()
        if self._handle is not None:
            self._handle.update(self._png())
        self._last = time.perf_counter()
        self._draw_time = self._last - start

    def close(self) -> None:
        """Final redraw, so the saved notebook keeps the finished picture."""
        self.update(force=True)


def _residual_axes(ax, stop: str, tol: Optional[float]) -> None:
    ax.set_yscale("log")
    ax.set_xlabel("function evaluations (NFE)")
    ax.set_ylabel(f"{'relative' if stop == 'rel' else 'absolute'} residual (batch max)")
    if tol is not None and tol > 0:
        ax.axhline(tol, color="gray", linestyle=":", linewidth=1, label=f"tol = {tol:g}")
    ax.grid(True, which="both", alpha=0.3)


class LiveResidualPlot(LiveFigure):
    """Residual vs. function evaluations, one line per solver, drawn while the solvers run.

        plot = LiveResidualPlot(["anderson", "broyden"], tol=1e-4)
        for name in ["anderson", "broyden"]:
            solve(f, z0, solver=name, tol=1e-4, callback=plot.callback(name))
        plot.close()

    Each line shows the largest residual over the batch after each evaluation of f.
    """

    def __init__(self, labels: Iterable[str], *, stop: str = "rel", tol: Optional[float] = None,
                 title: str = "Fixed-point solve", min_interval: float = 0.25):
        fig = Figure(figsize=(6.5, 4))
        self.ax = fig.add_subplot()
        _residual_axes(self.ax, stop, tol)
        self.ax.set_title(title)
        self.stop = stop
        self.lines = {label: self.ax.plot([], [], label=label, marker=".", markersize=3)[0]
                      for label in labels}
        self.ax.legend(loc="upper right")
        super().__init__(fig, min_interval=min_interval)

    def callback(self, label: str):
        """A solver callback ``(iteration, abs_res, rel_res)`` that extends the line `label`."""
        if label not in self.lines:
            raise KeyError(f"no line {label!r}; the plot was made for {list(self.lines)}.")
        line = self.lines[label]

        def on_iteration(k: int, abs_res: torch.Tensor, rel_res: torch.Tensor) -> None:
            res = rel_res if self.stop == "rel" else abs_res
            line.set_data([*line.get_xdata(), k], [*line.get_ydata(), float(res.max())])
            if len(line.get_xdata()) > 1:          # a one-point line has no range to scale to
                self.ax.relim()
                self.ax.autoscale_view()
                self.update()

        return on_iteration


def plot_residuals(stats: Mapping[str, SolverStats], ax=None, *, per_sample: bool = False):
    """Static residual-vs-NFE plot of finished solves, one line per entry of `stats`
    (the batch maximum, or every sample faintly with ``per_sample=True``). Returns the axes."""
    if ax is None:
        ensure_figure_display()
        ax = Figure(figsize=(6.5, 4)).add_subplot()
    first = next(iter(stats.values()))
    _residual_axes(ax, first.stop, first.tol)
    for label, st in stats.items():
        trace = st.residuals.detach().cpu()
        steps = torch.arange(1, st.nfe + 1)
        line, = ax.plot(steps, trace.max(dim=1).values, label=f"{label} ({st.nfe} NFE)")
        if per_sample:
            ax.plot(steps, trace, color=line.get_color(), alpha=0.15, linewidth=0.8)
    ax.legend(loc="upper right")
    return ax


class TrainingDashboard(LiveFigure):
    """Loss, accuracy, solver effort (NFE), residual and the Jacobian at z* (spectral radius and
    ‖J‖²_F / d, the quantity Jacobian regularization penalizes) against training steps, redrawn
    in place.

    Feed it the training loop's records: ``trainer.fit(callback=dashboard.log)``. Train records
    draw lines; test records (``split == "test"``) draw markers.
    """

    PANELS = (("loss", "loss", False), ("acc", "accuracy", False),
              ("nfe", "function evaluations", False), ("residual", "final rel. residual", True),
              ("rho", "spectral radius ρ(J)", False), ("jac", "‖J‖²_F / d", False))

    def __init__(self, title: str = "Training", *, min_interval: float = 0.5):
        fig = Figure(figsize=(13, 6.5))
        axes = fig.subplots(2, 3, sharex=True)
        self.axes = dict(zip([p[0] for p in self.PANELS], axes.flat))
        self.series: dict[str, tuple] = {}
        for key, label, log in self.PANELS:
            ax = self.axes[key]
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if log:
                ax.set_yscale("log")
        for ax in axes[1]:
            ax.set_xlabel("training step")
        fig.suptitle(title)
        self._add("loss", "train", "loss", "-")
        self._add("loss", "test", "loss", "o")
        self._add("acc", "train", "acc", "-")
        self._add("acc", "test", "acc", "o")
        self._add("nfe", "train", "fwd_nfe", "-", label="forward")
        self._add("nfe", "train", "bwd_nfe", "-", label="backward")
        self._add("nfe", "test", "fwd_nfe", "o", label="forward (test)")
        self._add("residual", "train", "residual", "-")
        self._add("rho", "test", "spectral_radius", "o", label="mean (test)")
        self._add("rho", "test", "spectral_radius_max", "^", label="max (test)")
        self._add("jac", "train", "jac_loss", "-", label="train (JR estimate)")
        self._add("jac", "test", "jac_frobenius", "o", label="test")
        self.axes["rho"].axhline(1.0, color="gray", linestyle=":", linewidth=1)
        for ax in self.axes.values():
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        super().__init__(fig, min_interval=min_interval)

    def _add(self, panel: str, split: str, key: str, style: str, label: Optional[str] = None):
        line, = self.axes[panel].plot([], [], style, label=label or split, markersize=4,
                                      alpha=0.5 if (split == "train" and panel in ("loss", "acc")) else 1.0)
        self.series[f"{panel}/{split}/{key}"] = (line, split, key)

    def log(self, record: dict) -> None:
        """Add one record of the training log and redraw (throttled)."""
        if "step" not in record or "split" not in record:
            return
        for line, split, key in self.series.values():
            value = record.get(key)
            if record["split"] == split and value is not None:
                line.set_data([*line.get_xdata(), record["step"]], [*line.get_ydata(), value])
        for ax in self.axes.values():
            ax.relim()
            ax.autoscale_view()
        self.update()

    def points(self, panel: str, split: str, key: str) -> int:
        """How many points one series holds (for tests and sanity checks)."""
        return len(self.series[f"{panel}/{split}/{key}"][0].get_xdata())


class RunComparison(LiveFigure):
    """Several training runs side by side, redrawn as they train: one panel per metric, one line
    per run, one colour per label (runs with the same label, e.g. seeds, share it).

        compare = RunComparison(["no JR", "JR"], {"fwd_nfe": "forward NFE", "acc": "accuracy"})
        Trainer(config).fit(callback=compare.callback("no JR", run=0))

    ``split`` picks which records are drawn (``"test"``: the evaluations; ``"train"``: every step).
    """

    def __init__(self, labels: Iterable[str], panels: Mapping[str, str], *, split: str = "test",
                 title: str = "", min_interval: float = 0.5):
        self.labels, self.panels, self.split = list(labels), dict(panels), split
        if not self.panels:
            raise ValueError("panels is empty: give {record key: axis label}, e.g. {'acc': 'accuracy'}.")
        fig = Figure(figsize=(4.2 * len(self.panels), 3.6))
        axes = fig.subplots(1, len(self.panels), squeeze=False)[0]
        self.axes = dict(zip(self.panels, axes))
        for (key, label), ax in zip(self.panels.items(), axes):
            ax.set_ylabel(label)
            ax.set_xlabel("training step")
            ax.grid(True, alpha=0.3)
        for i, label in enumerate(self.labels):             # legend entries, one per label
            axes[0].plot([], [], color=f"C{i}", label=label)
        axes[0].legend(loc="best", fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        self.lines: dict[tuple, object] = {}
        super().__init__(fig, min_interval=min_interval)

    def callback(self, label: str, run: int = 0):
        """A ``fit(callback=...)`` that draws the records of run `run` of `label`."""
        if label not in self.labels:
            raise KeyError(f"no run label {label!r}; the figure was made for {self.labels}.")
        color = f"C{self.labels.index(label)}"

        def log(record: dict) -> None:
            if record.get("split") != self.split:
                return
            for key, ax in self.axes.items():
                if record.get(key) is None:
                    continue
                if (label, run, key) not in self.lines:
                    self.lines[label, run, key] = ax.plot([], [], color=color, marker=".",
                                                          alpha=0.8)[0]
                line = self.lines[label, run, key]
                line.set_data([*line.get_xdata(), record["step"]], [*line.get_ydata(), record[key]])
                ax.relim()
                ax.autoscale_view()
            self.update()

        return log


def follow(log_path, *, poll: float = 2.0, timeout: Optional[float] = None,
           dashboard: Optional[TrainingDashboard] = None, process=None) -> TrainingDashboard:
    """Live dashboard of a run that writes its JSONL log elsewhere (a GPU job in a terminal).

    Reads new lines every `poll` seconds and stops when the run writes its ``{"event": "done"}``
    record, when `process` (a ``subprocess.Popen`` of the run, if you started it) has exited, or
    after `timeout` seconds. To go on watching, call ``follow(log_path, dashboard=d)`` with the
    dashboard it returned: it continues after the records already drawn. Safe to interrupt; the
    dashboard keeps what it has drawn.
    """
    from pathlib import Path

    from .train import read_log
    dashboard = dashboard or TrainingDashboard(title=f"following {log_path}")
    start = time.perf_counter()
    seen = getattr(dashboard, "records_followed", 0)
    try:
        while True:
            exited = process is not None and process.poll() is not None   # before the last read
            records = read_log(log_path) if Path(log_path).exists() else []
            for record in records[seen:]:
                dashboard.log(record)
            seen = dashboard.records_followed = len(records)
            done = any(r.get("event") == "done" for r in records)
            if done or exited or (timeout is not None and time.perf_counter() - start >= timeout):
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.close()
    return dashboard
