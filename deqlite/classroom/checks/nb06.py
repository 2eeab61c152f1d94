"""Checks for notebook 06's exercises (convolutional and multiscale DEQs)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._harness import DT, CheckFailed, _call, _compare, _numbered, _passed, exercise


@exercise
def check_fuse_two(fn: Callable) -> bool:
    """fn(b0, b1, down, up) -> [f0, f1]: two-branch multiscale fusion,
    f0 = b0 + nearest-upsample(up(b1)) to b0's size, f1 = b1 + down(b0)."""
    for seed, (h, w) in [(0, (8, 8)), (1, (7, 7)), (2, (6, 9))]:   # odd: 7 → 4 → back to 7
        torch.manual_seed(seed)
        size = f"{h}×{w}"
        b0 = torch.randn(2, 4, h, w, dtype=DT)
        b1 = torch.randn(2, 6, (h + 1) // 2, (w + 1) // 2, dtype=DT)
        down = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
        up = nn.Conv2d(6, 4, 1).double()
        expected = [b0 + F.interpolate(up(b1), size=b0.shape[-2:], mode="nearest"), b1 + down(b0)]
        got = _call(fn, "fuse_two", b0, b1, down, up)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            raise CheckFailed(f"fuse_two should return a list [f0, f1] of two feature maps, got "
                              f"{type(got).__name__}.")
        hint = ("f0 keeps b0 and adds the low-resolution branch brought up: up(b1) (a 1×1 conv to "
                "b0's channels), then F.interpolate(..., size=b0.shape[-2:], mode='nearest') — "
                "`size=`, not scale_factor=2, so odd sizes work; f1 keeps b1 and adds down(b0).")
        for i in range(2):
            _compare(got[i], expected[i], f"fuse_two output f{i} (branch-0 size {size})",
                     hint, rtol=1e-10, atol=1e-12)
    return _passed("fuse_two", "both outputs right, for even, odd and non-square resolutions")


@exercise
def check_state_numel(fn: Callable) -> bool:
    """fn(channels, height, width) -> entries of one sample's multiscale state, branch i at
    ⌈H/2^i⌉ × ⌈W/2^i⌉ (each stride-2 conv maps a side s to ⌈s/2⌉)."""
    for channels, h, w in [([24, 24], 32, 32), ([32, 64, 128, 256], 56, 56), ([4, 8, 16], 7, 9)]:
        got = _call(fn, "state_numel", list(channels), h, w, convert=_numbered("state_numel"))
        # halving i times rounding up each time is one division rounding up: ⌈s / 2^i⌉
        expected = sum(c * -(-h // 2 ** i) * -(-w // 2 ** i) for i, c in enumerate(channels))
        if got != expected:
            raise CheckFailed(
                f"state_numel({channels}, {h}, {w}): expected {expected}, got {got}. Branch i has "
                f"channels[i] maps of size ⌈H/2^i⌉ × ⌈W/2^i⌉: halve the sides *rounding up* after "
                f"each branch (-(-h // 2) in Python), starting from the full size for branch 0.")
    return _passed("state_numel", "right for 3 multiscale states, odd sizes included")
