"""Data files that may be damaged: errors that name the file and say what to do, a cache that
proves it is whole before it is used, and a check that actually opens a folder's images.

A download can stop half way, a disk can fill up, a file can be an HTML error page saved under
the right name, or belong to another dataset. Reading such a file usually fails deep inside a
parser ("invalid load key", "shape '[12, 28, 28]' is invalid") with no file named; worse, it
may not fail at all. Three tools against that:

* ``DataFileError``: a ``ValueError`` whose message names the file, says what is wrong with it
  and what to do (``redownload``: delete it and download it again, or fix ``$DEQLITE_DATA``).
* ``save_checked`` / ``load_checked``: a cache of tensors written with a header (each tensor's
  length and CRC-32 checksum, and the checksum of the rest) and used only when the header and
  the data agree. A CRC-32 (cyclic redundancy check) catches every burst of up to 32 damaged
  bits and all but one in 2³² other damages, for about 0.1 s per 400 MB. ``torch.load`` alone
  does not: a flipped byte inside a tensor loads without complaint.
* ``check_image_folder``: decode a random sample of a class-per-folder tree's images (all of
  them when there are few) and list the unreadable ones by name. Counting files proves nothing
  about their contents.
"""
from __future__ import annotations

import os
import random
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .._files import atomic_save

CACHE_FORMAT = 2      # the layout of a checked cache; a file of another layout is rebuilt


class DataFileError(ValueError):
    """A data file that exists but is not what it should be (truncated, damaged, another format).
    ``path`` is the file; the message says what is wrong and what to do."""

    def __init__(self, path, problem: str, remedy: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}\n{remedy}")


def redownload(path, dataset: str, root) -> str:
    """What to do about a damaged file of a downloadable `dataset` under the data folder `root`."""
    env = os.environ.get("DEQLITE_DATA")
    return (f"The file is damaged (an interrupted download or copy?) or is not {dataset}'s. "
            f"Delete it and download it again with\n"
            f"    python -m deqlite.data download {dataset} --root {root}\n"
            f"or, if this is not the folder you meant, point $DEQLITE_DATA at the right one "
            f"(it is {'set to ' + repr(env) if env else 'unset'}).")


def first_non_utf8(path) -> str:
    """Where the file at `path` stops being UTF-8: the line, the byte within it, the bytes there
    (read line by line in binary, since a text-mode read fails a whole chunk ahead)."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number:,}, byte {e.start + 1} ({line[e.start:e.start + 4]!r})"
    return "no line (the file decodes now: did it change?)"


# --- a cache that checks itself ------------------------------------------------------------------

def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().numpy())


def save_checked(path, tensors: dict, meta: dict) -> None:
    """Write `tensors` (name → CPU tensor) and `meta` (plain Python data: lists, strings, numbers)
    atomically (``atomic_save``), with the header that ``load_checked`` verifies."""
    header = {"format": CACHE_FORMAT, "meta_crc32": zlib.crc32(repr(meta).encode()),
              "lengths": {k: t.numel() for k, t in tensors.items()},
              "crc32": {k: _crc(t) for k, t in tensors.items()}}
    atomic_save({"header": header, "meta": meta, "tensors": tensors}, path)


def _damage(saved) -> Optional[str]:
    """What is wrong with a loaded cache, or None when its header and contents agree."""
    header = saved.get("header")
    tensors, meta = saved.get("tensors"), saved.get("meta")
    if not isinstance(tensors, dict) or not isinstance(meta, dict):
        return "its contents are missing"
    if header.get("meta_crc32") != zlib.crc32(repr(meta).encode()):
        return "the checksum of its metadata does not match its header"
    if set(tensors) != set(header.get("lengths", {})):
        return f"it holds {sorted(tensors)}, its header lists {sorted(header.get('lengths', {}))}"
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.numel() != header["lengths"][name]:
            n = t.numel() if isinstance(t, torch.Tensor) else "no"
            return f"{name!r} has {n} values, its header says {header['lengths'][name]}"
        if _crc(t) != header["crc32"].get(name):
            return f"the checksum of {name!r} does not match its header"
    return None


def load_checked(path, rebuild: str) -> Optional[tuple[dict, dict]]:
    """``(meta, tensors)`` of a cache written by ``save_checked``, or None when there is none to
    use: no file, or one of another layout (another version of deqlite wrote it: silently, the
    caller rebuilds it), or a damaged one (with a warning that names the file, says what is wrong
    and that the caller will `rebuild`)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as e:          # truncated, not a torch file, ...: all mean "damaged"
        problem = f"it does not load ({type(e).__name__}: {str(e).split('.')[0][:100]})"
    else:
        if not isinstance(saved, dict):
            problem = f"it holds a {type(saved).__name__}, not a cache"
        elif not isinstance(saved.get("header"), dict) or saved["header"].get("format") != CACHE_FORMAT:
            return None             # another layout: replaced without fuss
        else:
            try:
                problem = _damage(saved)
            except (AttributeError, KeyError, TypeError) as e:      # a header with holes
                problem = f"its header is incomplete ({type(e).__name__}: {e})"
            if problem is None:
                return saved["meta"], saved["tensors"]
    warnings.warn(f"the cache {path} is damaged: {problem}. {rebuild}", stacklevel=3)
    return None


# --- decoding a sample of an image folder --------------------------------------------------------

@dataclass
class FolderCheck:
    """What ``check_image_folder`` found: classes and their image counts, how many images it tried
    to decode, the unreadable ones ``(path, reason)``, layout problems, and notes (not failures)."""
    folder: Path
    classes: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    checked: int = 0
    unreadable: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.problems

    @property
    def images(self) -> int:
        return sum(self.counts)

    def report(self, max_listed: int = 20) -> str:
        """A few lines for a person: the counts, the sample, and every problem."""
        counts = f" ({min(self.counts)}-{max(self.counts)} per class)" if self.counts else ""
        lines = [f"{self.folder}: {self.images:,} images in {len(self.classes):,} class folders"
                 f"{counts}; decoded {self.checked} of them: {len(self.unreadable)} unreadable."]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  unreadable: {p} ({why})" for p, why in self.unreadable[:max_listed]]
        if len(self.unreadable) > max_listed:
            lines.append(f"  ... and {len(self.unreadable) - max_listed} more unreadable images")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _decode(path: Path) -> Optional[str]:
    """None if PIL decodes the whole image at `path`, else why not."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()            # Image.open reads only the header; load() decodes the pixels
        return None
    except Exception as e:          # PIL raises OSError, SyntaxError, ValueError, ... by format
        return f"{type(e).__name__}: {e}"


def _images_of(class_dir: Path, extensions: tuple) -> tuple[list, int]:
    """(image paths, number of other files) under `class_dir`, sub-folders included, in sorted
    order: what torchvision's ``ImageFolder`` takes for the class (by the file name's ending)."""
    images, others = [], 0
    for where, dirs, names in os.walk(class_dir, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            if name.lower().endswith(extensions):
                images.append(os.path.join(where, name))
            else:
                others += 1
    return images, others


def check_image_folder(folder, *, sample: int = 50, seed: int = 0) -> FolderCheck:
    """Count a ``folder/<class>/<image>`` tree's images per class, as torchvision's ``ImageFolder``
    finds them, and decode a random `sample` of them (all when there are no more).

    The sample is drawn while walking (reservoir sampling: the i-th image replaces a random one of
    the `sample` kept with probability sample / i), so a million paths are never held at once."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    folder, rng = Path(folder), random.Random(seed)
    check = FolderCheck(folder)
    if not folder.is_dir():
        check.problems.append("the folder does not exist")
        return check
    entries = sorted(folder.iterdir())
    loose = [p.name for p in entries if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
    if loose:
        check.problems.append(f"{len(loose)} images lie directly in the folder, outside any class "
                              f"folder (e.g. {loose[0]}), where ImageFolder does not see them: "
                              f"sort them into <class>/ folders")
    kept, seen, others = [], 0, 0
    for class_dir in (p for p in entries if p.is_dir()):
        images, skipped = _images_of(class_dir, IMG_EXTENSIONS)
        check.classes.append(class_dir.name)
        check.counts.append(len(images))
        others += skipped
        if not images:
            check.problems.append(f"class folder {class_dir.name}/ holds no images")
        for path in images:
            seen += 1
            if len(kept) < sample:
                kept.append(path)
            elif (j := rng.randrange(seen)) < sample:
                kept[j] = path
    if not check.classes:
        check.problems.append("it holds no class folders")
    if others:
        check.notes.append(f"files in the class folders that are not images (by their "
                           f"extension), skipped as ImageFolder skips them: {others}")
    for path in sorted(kept):
        why = _decode(Path(path))
        if why is not None:
            check.unreadable.append((Path(path), why))
    check.checked = len(kept)
    return check
