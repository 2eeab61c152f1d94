"""Image models built from the pieces: a stem, a DEQ, a head.

    image ──stem──▶ features x ──DEQ: z* = f(z*, x)──▶ z* ──head──▶ class scores

``DEQClassifier``: a small convolutional stem (two conv + ReLU + max-pool blocks), an
``MLPCell`` DEQ over the stem's features, and a linear head.
``ExplicitClassifier``: the same stem and head around an explicit two-layer network with the same
number of parameters as the DEQ cell (z₁ = tanh(U x + b), z₂ = tanh(W z₁ + c)), to compare with.

``ConvDEQClassifier``: a conv stem, a DEQ over one ``ConvCell`` (feature maps at one resolution),
global average pooling and a linear layer: the first convolutional DEQ.

``MDEQClassifier``: the multiscale DEQ classifier of Bai, Koltun, Kolter ("Multiscale Deep
Equilibrium Models", NeurIPS 2020): a stem, a DEQ over a ``MultiscaleCell`` whose state holds n
feature maps z*_0 ... z*_{n−1} (resolution H/2^i), and MDEQ's classification head, which widens
each z*_i, merges them from the highest resolution to the lowest, and pools:

    y = B_0(z*_0);   y = B_i(z*_i) + D_i(y)  for i = 1 .. n−1;   logits = Linear(pool(F(y)))

with B_i a bottleneck block (to 4·head_channels[i] channels), D_i a strided 3×3 conv (halves the
resolution) and F a 1×1 conv to ``final_channels``. Everything is normalized with GroupNorm, never
BatchNorm (MDEQ uses BatchNorm in its stem and head), so that samples stay independent.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .._validate import check_int_list, check_positive_ints, check_range
from ..cells import ConvCell, MLPCell, MultiscaleCell
from ..deq import DEQ


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
        check_positive_ints(in_channels=in_channels, image_size=image_size,
                            n_classes=n_classes, channels=channels, hidden=hidden)
        self.stem = conv_stem(in_channels, channels)
        self.cell = MLPCell(_stem_features(in_channels, image_size, channels), hidden,
                            weight_scale=weight_scale)
        self.deq = DEQ.from_options(self.cell, deq)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(images)))


class DEQDecoder(nn.Module):
    """A generator without an encoder: latent code x → DEQ over an MLPCell (x injected) → linear
    head → sigmoid pixels. Its latent codes are found by optimizing the input (``deqlite.jiio``),
    as in Gurumurthy et al. (NeurIPS 2021).

    Args:
        latent: size of the code x; hidden: size of the equilibrium state z.
        image_size, channels: the images' shape (channels, image_size, image_size).
        weight_scale: initial spectral norm of the cell's W.
        deq: keyword arguments of ``deqlite.DEQ``.
    """

    def __init__(self, *, latent: int = 16, hidden: int = 128, image_size: int = 28,
                 channels: int = 1, weight_scale: float = 0.7,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__()
        check_positive_ints(latent=latent, hidden=hidden, image_size=image_size, channels=channels)
        self.latent, self.image_shape = latent, (channels, image_size, image_size)
        self.cell = MLPCell(latent, hidden, weight_scale=weight_scale)
        self.deq = DEQ.from_options(self.cell, deq)
        self.head = nn.Linear(hidden, channels * image_size * image_size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (batch, C, H, W) in [0, 1] from equilibrium states z."""
        return torch.sigmoid(self.head(z)).reshape(-1, *self.image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.deq(x))

    def objective(self, images: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                  prior: float = 1e-3):
        """ℓ(z, x) = Σ_pixels mask · (decode(z) − images)² + prior · ‖x‖², one value per sample:
        the loss of a reconstruction (mask None), of inpainting (mask 1 on the observed pixels)
        or of denoising (noisy images), for ``deqlite.jiio``."""
        check_range(prior, "prior", low=0)
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images have shape {tuple(images.shape)}; this decoder makes "
                             f"(batch, {', '.join(map(str, self.image_shape))}).")

        def loss(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            error = (self.decode(z) - images) ** 2
            if mask is not None:
                error = error * mask
            return error.flatten(1).sum(1) + prior * x.pow(2).sum(1)
        return loss


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


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest common divisor of groups and channels
    when channels is not a multiple (the published head widths, e.g. 14, are not multiples of 8)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def image_stem(in_channels: int, channels: int, *, downsample: int = 0,
               groups: int = 8) -> nn.Sequential:
    """MDEQ's stem: two 3×3 conv–GroupNorm–ReLU layers, the first ``downsample`` of them with
    stride 2 (more strided layers are added when downsample > 2). (C, H, W) → (channels,
    H/2^downsample, W/2^downsample)."""
    layers = []
    for k in range(max(2, downsample)):
        stride = 2 if k < downsample else 1
        layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, stride=stride,
                             padding=1, bias=False), _norm(channels, groups), nn.ReLU()]
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (He et al. 2016), as MDEQ's head uses it:
    out = ReLU(GN(conv₁ₓ₁ ReLU(GN(conv₃ₓ₃ ReLU(GN(conv₁ₓ₁ x))))) + GN(conv₁ₓ₁ x)),
    C_in → width → width → 4·width channels, the shortcut projecting C_in → 4·width."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, *, groups: int = 8):
        super().__init__()
        out = self.expansion * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), _norm(width, groups), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), _norm(width, groups), nn.ReLU(),
            nn.Conv2d(width, out, 1, bias=False), _norm(out, groups))
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, bias=False),
                                      _norm(out, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class MultiscaleHead(nn.Module):
    """MDEQ's classification head: n feature maps → one pooled vector of ``final_channels``.

        y = B_0(z_0);  y = B_i(z_i) + D_i(y) (i = 1 .. n−1);  out = mean_HW ReLU(GN(conv₁ₓ₁ y))
    """

    def __init__(self, channels: Sequence[int], head_channels: Sequence[int],
                 final_channels: int, *, groups: int = 8):
        super().__init__()
        wide = [Bottleneck.expansion * h for h in head_channels]
        self.widen = nn.ModuleList(Bottleneck(c, h, groups=groups)
                                   for c, h in zip(channels, head_channels))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(wide[i], wide[i + 1], 3, stride=2, padding=1),
                          _norm(wide[i + 1], groups), nn.ReLU())
            for i in range(len(wide) - 1))
        self.final = nn.Sequential(nn.Conv2d(wide[-1], final_channels, 1),
                                   _norm(final_channels, groups), nn.ReLU())

    def forward(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        y = self.widen[0](z[0])
        for widen, down, z_i in zip(self.widen[1:], self.down, z[1:]):
            y = widen(z_i) + down(y)
        return self.final(y).mean((2, 3))


class ConvDEQClassifier(nn.Module):
    """Stem → DEQ over one ``ConvCell`` → global average pool → linear.

    Args:
        in_channels, image_size, n_classes: the data's shape (image_size is only checked).
        channels: width of the stem and of the equilibrium state (batch, channels, H', W').
        expansion, groups, dropout, weight_norm: the cell's options (see ``ConvCell``).
        downsample: stride-2 layers in the stem (H' = H / 2^downsample).
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, in_channels: int = 1, image_size: int = 28, n_classes: int = 10,
                 channels: int = 16, expansion: int = 5, groups: int = 4, dropout: float = 0.0,
                 weight_norm: bool = True, downsample: int = 1,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__()
        check_positive_ints(in_channels=in_channels, image_size=image_size,
                            n_classes=n_classes, channels=channels)
        check_range(downsample, "downsample", low=0, integer=True)
        self.stem = image_stem(in_channels, channels, downsample=downsample, groups=groups)
        self.cell = ConvCell(channels, channels, expansion=expansion, groups=groups,
                             dropout=dropout, weight_norm=weight_norm)
        self.deq = DEQ.from_options(self.cell, deq)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(images)).mean((2, 3)))


class MDEQClassifier(nn.Module):
    """Multiscale DEQ classifier (MDEQ): stem → DEQ over a ``MultiscaleCell`` → MDEQ head.

    The defaults are MDEQ's smallest CIFAR-10 model (``experiments/cifar/cls_mdeq_TINY.yaml``).
    Differences from the locuslab code: GroupNorm instead of BatchNorm in the stem and the head,
    the injection is always a 1×1 conv (there: 1×1 conv–BN–ReLU, or none), PyTorch's default
    initialization (there: N(0, 0.01) for the convs without weight norm).

    Args:
        in_channels, image_size, n_classes: the data's shape (image_size is only checked: the
            model takes any size, the head pools globally).
        channels: channels of each branch of the state, highest resolution first.
        head_channels: per branch, the head's bottleneck width (output 4 × that).
        final_channels: width of the head's last 1×1 conv (the pooled feature vector).
        expansion, groups, dropout, weight_norm: the cell's options (see ``MultiscaleCell``).
        downsample: stride-2 layers in the stem (MDEQ: 0 on CIFAR-10, 2 on ImageNet).
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, n_classes: int = 10,
                 channels: Sequence[int] = (24, 24), head_channels: Sequence[int] = (8, 16),
                 final_channels: int = 200, expansion: int = 5, groups: int = 8,
                 dropout: float = 0.0, weight_norm: bool = True, downsample: int = 0,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__()
        check_positive_ints(in_channels=in_channels, image_size=image_size,
                            n_classes=n_classes, final_channels=final_channels)
        check_range(downsample, "downsample", low=0, integer=True)
        channels = check_int_list(channels, "channels")
        head_channels = check_int_list(head_channels, "head_channels")
        if len(head_channels) != len(channels):
            raise ValueError(f"head_channels needs one width per branch: channels has "
                             f"{len(channels)} entries, head_channels {len(head_channels)}.")
        self.stem = image_stem(in_channels, channels[0], downsample=downsample, groups=groups)
        self.cell = MultiscaleCell(channels[0], channels, expansion=expansion, groups=groups,
                                   dropout=dropout, weight_norm=weight_norm)
        self.deq = DEQ.from_options(self.cell, deq)
        self.head = MultiscaleHead(channels, head_channels, final_channels, groups=groups)
        self.classifier = nn.Linear(final_channels, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.deq(self.stem(images))))
