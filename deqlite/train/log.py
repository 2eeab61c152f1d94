"""The run log: one JSON record per line (JSONL), appended as the run goes.

Every training step writes a record ``{"split": "train", "step": k, "loss": ..., ...}`` and every
evaluation one with ``"split": "test"``; a run that finishes ends the log with
``{"event": "done", "step": k}``. ``read_log`` reads it back (``deqlite.train.dashboard.follow``
draws a log that another process is still writing).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log; a half-written last line (a run still writing) is skipped."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Add one record as a line at the end of the log (the folder is made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def append_done(path: str | os.PathLike, step: int) -> None:
    """The record that says the run finished."""
    append_record(path, {"event": "done", "step": step, "time": time.time()})


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Keep the records of steps up to `step` (a resumed run writes the ones after it again),
    without the "done" record."""
    kept = [r for r in read_log(path) if r.get("step", 0) <= step and "event" not in r]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))
