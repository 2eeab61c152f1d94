"""The run log: one JSON record per line (JSONL), only ever appended to.

Every training step writes a record ``{"split": "train", "step": k, "loss": ..., ...}`` and every
evaluation one with ``"split": "test"``; a run that finishes ends with ``{"event": "done", ...}``.
A run resumed from its checkpoint at step k appends ``{"event": "resume", "step": k}``: the
records of steps after k that the interrupted attempt wrote (after its last checkpoint) are then
superseded, and ``read_log`` leaves them out. Nothing is ever rewritten, so a log survives any
crash: the worst is a torn last line (a write cut off mid-line), which ``read_log`` skips
quietly, as it is expected after a crash or while a run is still writing. Any other line that is
not a JSON record is skipped with a warning that counts them (so a stray blank or a hand edit
costs that line, never the records after it).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path


class LogWarning(UserWarning):
    """Lines of a run log that are not JSON records were skipped."""


@dataclass
class LogLines:
    """A log as read: its records in file order, the numbers (from 1) of the lines that are not
    JSON records, and whether the last line is torn (no newline at its end)."""
    records: list = field(default_factory=list)
    bad_lines: list = field(default_factory=list)
    torn: bool = False


def read_lines(path: str | os.PathLike) -> LogLines:
    """Every record of the log at `path`, as written (``resume`` markers and superseded records
    included); see ``read_log`` for the run's own records."""
    out = LogLines()
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    out.torn = lines[-1] != ""     # text after the last newline: a line cut off, or being written
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):          # (a torn line that parses lacks only its newline)
            out.records.append(record)
        elif not (out.torn and number == len(lines)):
            out.bad_lines.append(number)
    return out


def skipped_message(path, bad_lines: list) -> str:
    """The warning for lines of a log that are not records."""
    shown = ", ".join(map(str, bad_lines[:10])) + (", ..." if len(bad_lines) > 10 else "")
    return (f"{path}: skipped {len(bad_lines)} line(s) that are not JSON records (line "
            f"{shown}); the other records are read.")


def supersede(records: list) -> list:
    """The run's records: each ``{"event": "resume", "step": k}`` drops the records of steps
    after k written before it (and an earlier ``done``); the markers themselves are left out."""
    kept: list = []
    for record in records:
        if record.get("event") == "resume":
            k = record.get("step", 0)
            kept = [r for r in kept if "event" not in r and r.get("step", 0) <= k]
        else:
            kept.append(record)
    return kept


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's JSONL log, in order, each step's once (a resumed run's later
    attempt replaces the records an interrupted one wrote after its checkpoint). A torn last line
    is skipped quietly; other unreadable lines are skipped with a ``LogWarning`` that counts
    them."""
    lines = read_lines(path)
    if lines.bad_lines:
        warnings.warn(skipped_message(path, lines.bad_lines), LogWarning, stacklevel=2)
    return supersede(lines.records)


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Add one record as a line at the end of the log (the folder is made if missing). A torn
    last line left by a crash is first closed with a newline, so the new record stays whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as fh:
        fh.seek(0, os.SEEK_END)
        torn = False
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
        fh.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())


def append_done(path: str | os.PathLike, step: int) -> None:
    """The record that says the run finished."""
    append_record(path, {"event": "done", "step": step, "time": time.time()})


def append_resume(path: str | os.PathLike, step: int) -> None:
    """The record that says a run went on from its checkpoint at `step`."""
    append_record(path, {"event": "resume", "step": step, "time": time.time()})
