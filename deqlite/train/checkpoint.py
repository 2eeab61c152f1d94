"""The run's files: checkpoints that say what is wrong with them, a fresh run that never touches
another run's files, and updates that an interrupt cannot cut in half.

A checkpoint is a ``torch.save`` file holding a small envelope::

    {"format": "deqlite-checkpoint", "version": 1, "size": n, "sha256": "...", "payload": bytes}

where ``payload`` is the training state (config, step, model, optimizer, schedule, scaler, random
state, history) serialized with ``torch.save`` and ``sha256`` its checksum. The envelope lets a
load tell apart the ways a file goes bad: empty (a copy that never happened), truncated or
corrupt (a cut-off transfer, a bad disk: the checksum or the zip archive does not match), foreign
(a text file, a plain ``state_dict``), written by a newer deqlite, or saved after a run diverged
(NaN weights). Each gets a ``CheckpointError`` that names the file and says what to do. Both
levels load with ``weights_only=True``: no code in a checkpoint is ever run. Files are written
atomically (``deqlite._files.atomic_write``): an interrupted or failed save keeps the previous
checkpoint.

A fresh run whose log or checkpoint path already exists, or whose TensorBoard folder holds event
files, stops before it writes anything (``run_files_in_use``, ``files_in_use_message``): resume
it, write elsewhere, or overwrite it on purpose. ``deferred_interrupt`` holds Ctrl-C back until
a training step is done and logged.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .._files import atomic_write, missing_file, serialize
from .tensorboard_log import EVENT_FILES, event_files

FORMAT, VERSION = "deqlite-checkpoint", 1
STATE_KEYS = ("config", "step", "model", "optimizer", "scheduler")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from; the message names the file and the fault."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` (a dict with at least ``STATE_KEYS``) as a checkpoint at `path`, atomically."""
    payload = serialize(state)
    envelope = dict(format=FORMAT, version=VERSION, size=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest(), payload=payload)
    atomic_write(serialize(envelope), path)


def _load_file(path: Path):
    """torch.load with weights_only, each failure turned into a CheckpointError that says why."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a save or a copy that never happened. "
                              f"Use an earlier checkpoint, or start a fresh run.")
    head = path.read_bytes()[:64]
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # torch raises RuntimeError, UnpicklingError, ...
        if head.startswith(b"PK"):
            kind = (f"a PyTorch file that is truncated or corrupt ({size} bytes; torch says: "
                    f"{str(e).splitlines()[0][:160]}): a cut-off copy or transfer, or a bad disk")
        elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
            kind = f"text, not a checkpoint (it begins {head[:40].decode(errors='replace')!r})"
        else:
            kind = f"not a PyTorch file ({size} bytes; torch says: {str(e).splitlines()[0][:160]})"
        raise CheckpointError(f"{path} is {kind}. Use an earlier checkpoint, or start a fresh "
                              f"run.") from None


def _unwrap(path: Path, envelope) -> dict:
    """The training state inside the envelope, its size and checksum verified."""
    if not isinstance(envelope, dict):
        raise CheckpointError(f"{path} holds a {type(envelope).__name__}, not a deqlite "
                              f"checkpoint.")
    if envelope.get("format") != FORMAT:
        if all(k in envelope for k in STATE_KEYS):            # written before the envelope
            warnings.warn(f"{path} is a checkpoint of an older deqlite, without a checksum: "
                          f"loaded unverified.", stacklevel=3)
            return envelope
        if envelope and all(isinstance(v, torch.Tensor) for v in envelope.values()):
            raise CheckpointError(
                f"{path} is a plain state_dict ({len(envelope)} tensors), not a deqlite training "
                f"checkpoint: load it into a model with model.load_state_dict(torch.load(path)). "
                f"A run resumes only from the checkpoints its Trainer writes.")
        raise CheckpointError(f"{path} is not a deqlite checkpoint (its keys: "
                              f"{', '.join(map(str, list(envelope)[:8]))}).")
    if envelope.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer deqlite (checkpoint format "
                              f"{envelope['version']}; this one reads up to {VERSION}): upgrade "
                              f"deqlite to resume it.")
    payload = envelope.get("payload", b"")
    if len(payload) != envelope.get("size") or \
            hashlib.sha256(payload).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its content does not match the checksum it was "
                              f"written with. Use an earlier checkpoint, or start a fresh run.")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The training state saved at `path`, verified: a clear error for a missing, empty,
    truncated, corrupt, foreign or newer file, or one whose weights are not finite."""
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "checkpoint", "*.pt")
    state = _unwrap(path, _load_file(path))
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a training checkpoint.")
    bad = [name for name, t in state["model"].items()
           if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{path} has NaN/inf weights in {len(bad)} tensor(s) ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}): it was saved after training diverged. Use an "
            f"earlier checkpoint (a lower lr, grad_clip or Jacobian regularization may avoid the "
            f"divergence).")
    return state


def run_files_in_use(log_path: Optional[str], checkpoint_path: Optional[str],
                     tensorboard: Optional[str] = None) -> list[str]:
    """The files of a run at these paths that already exist (a fresh run must not touch them):
    the log, the checkpoint, the TensorBoard event files in the folder `tensorboard`."""
    return [p for p in (log_path, checkpoint_path) if p and Path(p).exists()] + \
        event_files(tensorboard)


def files_in_use_message(files: list[str], *, cli: bool) -> str:
    """What to do when a fresh run's log, checkpoint or TensorBoard events already exist."""
    if cli:
        options = ("--resume to go on with that run, --log/--checkpoint (and --set tensorboard=) to "
                   "start another beside it, or --overwrite to replace it")
    else:
        options = ("Trainer.resume(checkpoint) to go on with that run, other log_path/"
                   "checkpoint_path/tensorboard to start another beside it, or Trainer(config, "
                   "overwrite=True) to replace it")
    events = [f for f in files if Path(f).match(EVENT_FILES)]
    named = [f for f in files if f not in events] + (
        [f"the {len(events)} TensorBoard event file(s) in {Path(events[0]).parent}"] if events else [])
    return f"{' and '.join(named)} already hold a run; nothing was changed. Use {options}."


@contextlib.contextmanager
def deferred_interrupt(notice: str = ""):
    """A Ctrl-C inside the block takes effect when the block ends (after printing `notice`); a
    second Ctrl-C stops at once. The trainer runs each training step and its record inside one,
    so the weights, the step counter and the log move together. (Signals reach only the main
    thread; elsewhere the block runs as it is.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def hold(signum, frame):
        if caught:
            raise KeyboardInterrupt            # asked twice: now
        caught.append(signum)
        if notice:
            print(notice, flush=True)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
