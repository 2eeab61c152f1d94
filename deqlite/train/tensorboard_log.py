"""The run's numbers as TensorBoard events (``TrainConfig.tensorboard``; ``tensorboard --logdir``).

Every record the trainer appends to its JSONL log (``deqlite.train.log``: one per training step,
one per evaluation) also becomes TensorBoard scalars: each number in it, tagged
``"{split}/{key}"`` -- ``train/loss``, ``train/acc``, ``train/fwd_nfe``, ``train/jac_weight``,
``test/spectral_radius``, ... -- at the record's ``step``, with its ``time`` as the wall time.
The bookkeeping keys (``split``, ``step``, ``epoch``, ``time``) and what is not a number (None,
true/false, text) are left out: the events hold the log's numbers and nothing else. They are
written with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package), flushed at
every evaluation and closed when ``fit`` returns, fails or is interrupted.

Rank 0 only: under torchrun every process holds the same records (combined over the
processes), as for the JSONL log, so one writer says everything; W writers would show each
number W times. The other processes make no folder and no file (but every process checks that
the package imports, so that all of them stop alike when the trainer is made).

A resumed run (or ``fit()`` called again after an interrupt) goes on in the same folder with a
new event file that begins with a purge at the step after the one it goes on from: readers drop
what an interrupted attempt wrote after the checkpoint, as ``read_log`` drops its records, so
the events read back as the log does. (Readers take a folder's files in name order; names begin
with the second a file was made in, and ``open`` waits out the second of the newest one, so the
new file comes last.) A fresh run whose folder already holds event files is refused like an
existing log; the trainer's ``overwrite=True`` deletes those files (only the
``events.out.tfevents.*`` directly in that folder; anything else there stays).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

BOOKKEEPING = ("split", "step", "epoch", "time")
EVENT_FILES = "events.out.tfevents.*"       # how SummaryWriter names its files


def event_files(folder: Optional[str | os.PathLike]) -> list[str]:
    """The TensorBoard event files directly in `folder` (none when it is None or missing)."""
    return sorted(str(p) for p in Path(folder).glob(EVENT_FILES) if p.is_file()) if folder else []


def scalars(record: dict) -> dict:
    """The record's numbers by tag: ``{"train/loss": 0.31, "train/fwd_nfe": 12, ...}``."""
    return {f"{record['split']}/{key}": value for key, value in record.items()
            if key not in BOOKKEEPING and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def summary_writer_class():
    """torch's ``SummaryWriter``; an ImportError that says what to install when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"config.tensorboard is set, but TensorBoard cannot be imported ({e}): "
                          f"pip install 'deqlite[tensorboard]' (or leave tensorboard unset)") from e
    return SummaryWriter


class TensorBoardLog:
    """Writes the run's records to `folder` on rank 0 (``is_main``); does nothing when `folder`
    is None or on the other ranks. Made with the trainer: a missing package fails there, on
    every rank, before any step."""

    def __init__(self, folder: Optional[str], is_main: bool):
        self.writer_class = summary_writer_class() if folder is not None else None
        self.folder = folder if is_main else None
        self.writer = None

    def open(self, step: int) -> None:
        """Start a new event file for a run that goes on from `step` (0: a fresh run); the events
        an earlier attempt wrote after `step` are superseded."""
        if self.folder is None or self.writer is not None:
            return
        _after_the_newest_file(self.folder)
        self.writer = self.writer_class(self.folder, purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        """The record's numbers as scalars at its step; flushed to disk after an evaluation."""
        if self.writer is None:
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"], walltime=record["time"])
        if record["split"] == "test":
            self.writer.flush()

    def close(self) -> None:
        """Write out what is pending and close the file (a later ``open`` starts a new one)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _after_the_newest_file(folder: str) -> None:
    """Wait, if need be, until the second in which the folder's newest event file was made has
    passed. Readers take a folder's files in name order and a name begins with that second, so
    the new file (a resumed run's purge and events) then sorts after the old ones."""
    made = [int(part) for f in event_files(folder)
            if (part := Path(f).name.split(".")[3]).isdigit()]
    delay = max(made, default=0) + 1 - time.time()
    if 0 < delay <= 2:                  # (a file from a clock far ahead: waiting would not help)
        time.sleep(delay)
