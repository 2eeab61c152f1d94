"""Files: where the data lives, and writing so that an interruption never leaves a half-written
file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch


def data_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The data folder: `root` if given, else ``$DEQLITE_DATA``, else ``data/`` beside the package
    (in a checkout) or in the current directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("DEQLITE_DATA"):
        return Path(os.environ["DEQLITE_DATA"]).expanduser()
    checkout = Path(__file__).resolve().parents[1] / "data"
    return checkout if checkout.is_dir() else Path.cwd() / "data"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`: an interrupted
    write leaves the previous file intact (os.replace is atomic on one file system), and
    processes writing the same path at once each rename a complete file of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
