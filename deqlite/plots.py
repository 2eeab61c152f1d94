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
import math
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

    ::

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


def plot_diagnosis(diagnosis, fig: Optional[Figure] = None) -> Figure:
    """A ``deqlite.diagnostics.Diagnosis`` in two panels. Left: the residual traces (every sample
    faintly, the batch max boldly). Right: J's eigenvalues for sample 0 in the complex plane,
    with the unit circle |λ| = 1 and the circle of radius ρ(J)."""
    ensure_figure_display()
    fig = fig or Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    plot_residuals({diagnosis.stats.solver: diagnosis.stats}, ax1, per_sample=True)
    ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title(f"forward solve: {diagnosis.status.split(':')[0].split(' (')[0]}")
    t = torch.linspace(0, 2 * math.pi, 200)
    ax2.plot(t.cos(), t.sin(), color="gray", linestyle=":", label="|λ| = 1")
    eig = diagnosis.eigenvalues.cpu()
    what = "eigenvalues of J" if diagnosis.exact else f"{len(eig)} Arnoldi estimates"
    ax2.scatter(eig.real, eig.imag, s=12, label=f"{what} (sample 0)")
    r = diagnosis.spectral_radius[0].item()
    ax2.plot(r * t.cos(), r * t.sin(), color="C3", linewidth=1, label=f"ρ(J) = {r:.3f}")
    ax2.set_aspect("equal")
    ax2.set_xlabel("Re λ")
    ax2.set_ylabel("Im λ")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    ax2.set_title("spectrum of J = ∂f/∂z at the returned z")
    fig.tight_layout()
    return fig
