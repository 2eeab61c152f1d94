"""Files: where the data lives, and writing so that an interruption never leaves a half-written
file behind."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ._validate import did_you_mean


def data_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The data folder: `root` if given, else ``$DEQLITE_DATA``, else ``data/`` beside the package
    (in a checkout) or in the current directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("DEQLITE_DATA"):
        return Path(os.environ["DEQLITE_DATA"]).expanduser()
    checkout = Path(__file__).resolve().parents[1] / "data"
    return checkout if checkout.is_dir() else Path.cwd() / "data"


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: an interrupted
    write leaves the previous file intact (os.replace is atomic on one file system), and
    processes writing the same path at once each rename a complete file of their own. A failed
    write (a full disk) raises an OSError that says where, how much was needed and how much is
    free; the previous file is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}. It needs "
                               f"{len(data) / 2**20:.1f} MiB; {free / 2**20:.1f} MiB are free in "
                               f"{path.parent}; {kept}. Free some space or write elsewhere.") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def serialize(obj: Any) -> bytes:
    """The bytes ``torch.save(obj, ...)`` would write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, written with ``atomic_write`` (serialized in memory first, so a
    full disk fails cleanly and the previous file survives)."""
    atomic_write(serialize(obj), path)


def missing_file(path: str | os.PathLike, what: str, pattern: str) -> FileNotFoundError:
    """"no `what` at `path`", with what the folder holds of `pattern` (and a did-you-mean), or
    that the folder itself does not exist."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        return FileNotFoundError(f"no {what} at {path}; the folder {folder} does not exist.")
    others = sorted(p.name for p in folder.glob(pattern))
    where = f"holds {', '.join(others)}" if others else f"holds no {pattern} file"
    return FileNotFoundError(f"no {what} at {path}; {folder} {where}."
                             f"{did_you_mean(path.name, others)}")
