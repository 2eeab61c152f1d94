"""Datasets, offline and real, images and text, behind one registry.

    load_dataset("mnist5k", "train")            # a TensorDataset of (images, labels)
    load_dataset("stdlib_chars", "valid")       # a TokenStream of characters

``images`` holds the image datasets, ``text`` the corpora, ``batches`` the batches a training run
draws from either (a function of the step, for exact resume), ``integrity`` what guards against
damaged files (errors that name the file, a cache that checks itself, decoding a sample of an
image folder). Real datasets live under the data
folder (``$DEQLITE_DATA``, default ``data/``); download one from a terminal with

    python -m deqlite.data download mnist        (or cifar10, wikitext103, wikitext2;
                                                  "imagenet" checks the folders and decodes a
                                                  sample of the images; exit status 1 if not OK)
"""
from __future__ import annotations

from torch.utils.data import Dataset

from .._files import data_root
from .._validate import lookup
from .images import cifar10, digits, imagenet, mnist, mnist5k
from .text import TokenStream, stdlib_chars, wikitext2, wikitext103

IMAGE_DATASETS = {"mnist5k": mnist5k, "digits": digits, "mnist": mnist, "cifar10": cifar10,
                  "imagenet": imagenet}
TEXT_DATASETS = {"stdlib_chars": stdlib_chars, "wikitext103": wikitext103, "wikitext2": wikitext2}
DATASETS = {**IMAGE_DATASETS, **TEXT_DATASETS}
OFFLINE = ("mnist5k", "digits", "stdlib_chars")
AUGMENTABLE = ("cifar10", "imagenet")       # the others are digits: a flip would change them

__all__ = ["AUGMENTABLE", "DATASETS", "IMAGE_DATASETS", "OFFLINE", "TEXT_DATASETS", "TokenStream",
           "data_root", "is_text", "load_dataset", "cifar10", "digits", "imagenet", "mnist",
           "mnist5k", "stdlib_chars", "wikitext2", "wikitext103"]


def is_text(dataset: str) -> bool:
    """Whether `dataset` names a text dataset (a language-modeling task)."""
    return dataset in TEXT_DATASETS


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = False,
                 augment: bool = False) -> Dataset:
    """The dataset `name` (see ``DATASETS``): a TensorDataset of (images, labels), an
    ``ImageFolder`` for ImageNet, a ``TokenStream`` for text (splits "train", "valid", "test").
    ``augment=True`` adds the dataset's standard random augmentation."""
    fn = lookup(DATASETS, name, "dataset")
    if augment and is_text(name):
        raise ValueError(f"dataset {name!r} is text; augmentation applies to images "
                         f"({', '.join(AUGMENTABLE)}). Use augment=False.")
    if augment and name not in AUGMENTABLE:
        raise ValueError(f"dataset {name!r} has no augmentation (flipping or cropping digits changes "
                         f"them); datasets with one: {', '.join(AUGMENTABLE)}. Use augment=False.")
    if name in OFFLINE:
        return fn(split)
    options = dict(augment=True) if augment else {}
    return fn(split, root=root, download=download, **options)
