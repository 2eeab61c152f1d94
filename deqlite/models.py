"""Task models built from the pieces: a stem, a DEQ, a head.

    image ──stem──▶ features x ──DEQ: z* = f(z*, x)──▶ z* ──head──▶ class scores

``DEQClassifier``: a small convolutional stem (two conv + ReLU + max-pool blocks), an
``MLPCell`` DEQ over the stem's features, and a linear head.
``ExplicitClassifier``: the same stem and head around an explicit two-layer network with the same
number of parameters as the DEQ cell (z₁ = tanh(U x + b), z₂ = tanh(W z₁ + c)), to compare with.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ._validate import check_options, check_range, lookup
from .cells import MLPCell
from .deq import DEQ


def conv_stem(in_channels: int, channels: int) -> nn.Sequential:
    """Two conv–ReLU–pool blocks: (C, H, W) → (2·channels, H/4, W/4)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten())


def _stem_features(in_channels, image_size, channels) -> int:
    return 2 * channels * (image_size // 4) ** 2


class DEQClassifier(nn.Module):
    """Conv stem → DEQ over an MLPCell → linear head.

    Args:
        in_channels, image_size, n_classes: the data's shape.
        channels: the stem's first conv width (the second is twice that).
        hidden: size of the equilibrium state z.
        weight_scale: initial spectral norm of the cell's W (< 1: a contraction at the start).
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 28, n_classes: int = 10,
                 channels: int = 16, hidden: int = 128, weight_scale: float = 0.7,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__()
        for name, value in dict(in_channels=in_channels, image_size=image_size,
                                n_classes=n_classes, channels=channels, hidden=hidden).items():
            check_range(value, name, low=1, integer=True)
        self.stem = conv_stem(in_channels, channels)
        self.cell = MLPCell(_stem_features(in_channels, image_size, channels), hidden,
                            weight_scale=weight_scale)
        self.deq = DEQ(self.cell, **dict(deq or {}))
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(images)))


class ExplicitClassifier(nn.Module):
    """The same stem and head around two explicit (not weight-tied) tanh layers with the DEQ cell's
    parameter count (+ one bias vector)."""

    def __init__(self, *, in_channels: int = 1, image_size: int = 28, n_classes: int = 10,
                 channels: int = 16, hidden: int = 128):
        super().__init__()
        self.stem = conv_stem(in_channels, channels)
        self.body = nn.Sequential(
            nn.Linear(_stem_features(in_channels, image_size, channels), hidden), nn.Tanh(),
            nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(images)))


MODELS = {"deq_classifier": DEQClassifier, "explicit_classifier": ExplicitClassifier}


def build_model(name: str, **options) -> nn.Module:
    """``MODELS[name](**options)``, with an unknown option reported by name."""
    cls = lookup(MODELS, name, "model")
    check_options(cls.__init__, options, f"model {name!r}")
    return cls(**options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
