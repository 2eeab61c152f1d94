"""Live figures of training runs: the dashboard of one run, several runs side by side, and a run
followed through its log while another process writes it.

They draw the trainer's records (``deqlite.train.log``): pass ``dashboard.log`` (or
``compare.callback(label)``) as ``Trainer.fit(callback=...)``, or ``follow(path)`` a JSONL log.
Each is a ``deqlite.plots.LiveFigure``: one picture in the notebook, redrawn in place.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional

from matplotlib.figure import Figure

from ..plots import LiveFigure
from .._files import missing_file
from .log import LogLines, LogWarning, read_lines, skipped_message


class TrainingDashboard(LiveFigure):
    """Loss, accuracy, solver effort (NFE), residual and the Jacobian at z* (spectral radius and
    ‖J‖²_F / d, the quantity Jacobian regularization penalizes) against training steps, redrawn
    in place.

    Feed it the training loop's records: ``trainer.fit(callback=dashboard.log)``. Train records
    draw lines; test records (``split == "test"``) draw markers.
    """

    PANELS = (("loss", "loss", False), ("acc", "accuracy", False),
              ("nfe", "function evaluations", False), ("residual", "final rel. residual", True),
              ("rho", r"spectral radius $\rho(J)$", False), ("jac", r"$\|J\|_F^2\,/\,d$", False))

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
        self.axes["rho"].axhline(1.0, color="gray", linestyle=":", linewidth=1,
                                 label=r"$\rho(J) = 1$")
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
                first = not len(line.get_xdata())
                line.set_data([*line.get_xdata(), record["step"]], [*line.get_ydata(), value])
                if first:
                    _legend(line.axes)          # a series gets its legend entry with its data
        for ax in self.axes.values():
            ax.relim()
            ax.autoscale_view()
        self.update()

    def points(self, panel: str, split: str, key: str) -> int:
        """How many points one series holds (for tests and sanity checks)."""
        return len(self.series[f"{panel}/{split}/{key}"][0].get_xdata())


def _legend(ax) -> None:
    """The axes' legend, listing only the lines that hold data (an empty series is not shown)."""
    shown = [line for line in ax.get_lines()
             if not line.get_label().startswith("_") and len(line.get_xdata())]
    ax.legend(handles=shown, loc="best", fontsize=8)


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
        axes[0].legend(loc="best", fontsize=9)
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
           dashboard: Optional[TrainingDashboard] = None, process=None,
           start_timeout: float = 120.0) -> TrainingDashboard:
    """Live dashboard of a run that writes its JSONL log elsewhere (a GPU job in a terminal).

    Reads new lines every `poll` seconds and stops when the run writes its ``{"event": "done"}``
    record, when `process` (a ``subprocess.Popen`` of the run, if you started it) has exited, or
    after `timeout` seconds. To go on watching, call ``follow(log_path, dashboard=d)`` with the
    dashboard it returned: it continues after the records already drawn. Safe to interrupt; the
    dashboard keeps what it has drawn. A log that does not exist yet is waited for up to
    `start_timeout` seconds (a run loading its data), then a ``FileNotFoundError`` names the logs
    that do exist; a folder that does not exist fails at once. Lines that are not records are
    skipped, with one ``LogWarning`` that counts them.
    """
    log_path = Path(log_path)
    if not log_path.parent.is_dir():
        raise missing_file(log_path, "run log", "*.jsonl")
    dashboard = dashboard or TrainingDashboard(title=f"following {log_path}")
    start = time.perf_counter()
    seen = getattr(dashboard, "records_followed", 0)
    warned = 0
    try:
        while True:
            exited = process is not None and process.poll() is not None   # before the last read
            if not log_path.exists():
                if exited or (process is None and time.perf_counter() - start >= start_timeout):
                    raise missing_file(log_path, "run log", "*.jsonl")
                lines = LogLines()
            else:
                lines = read_lines(log_path)
            if len(lines.bad_lines) > warned:
                warnings.warn(skipped_message(log_path, lines.bad_lines), LogWarning, stacklevel=2)
                warned = len(lines.bad_lines)
            for record in lines.records[seen:]:
                dashboard.log(record)
            seen = dashboard.records_followed = len(lines.records)
            events = [r["event"] for r in lines.records if "event" in r]
            done = bool(events) and events[-1] == "done"
            if done or exited or (timeout is not None and time.perf_counter() - start >= timeout):
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.close()
    return dashboard
