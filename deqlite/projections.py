"""Constraint sets for input optimization (``deqlite.jiio``): each is a projection Π onto a
convex set C, Π(x) = argmin_{c ∈ C} ‖c − x‖, applied per sample, and ``violation(x)``, how far a
sample lies outside C (0 inside).

Projected gradient descent x ← Π(x − α ∇ℓ) keeps every iterate feasible; JIIO's augmented map
takes that step on its input (Gurumurthy et al., NeurIPS 2021).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._validate import check_range, check_tensor


class Box:
    """Π(x) = min(max(x, low), high): the box low ≤ x ≤ high (numbers, or tensors that
    broadcast against x, e.g. a pixel range [0, 1])."""

    def __init__(self, low=-math.inf, high=math.inf):
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not low < high:
            raise ValueError(f"Box needs low < high, got low={low}, high={high}.")
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return torch.minimum(torch.maximum(x, low), high)

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far x lies outside the box (0 inside)."""
        return (x - self(x)).flatten(1).norm(dim=1)

    def __repr__(self) -> str:
        return f"Box(low={self.low}, high={self.high})"


class L2Ball:
    """Π(x) = c + (x − c) · min(1, r / ‖x − c‖₂), per sample: the ball ‖x − c‖₂ ≤ r around the
    center c (default 0; shape of x, e.g. the clean images of an attack) with radius r (a number
    or one per sample)."""

    def __init__(self, radius, center: Optional[torch.Tensor] = None):
        if isinstance(radius, torch.Tensor):
            if radius.dim() != 1 or not bool((radius >= 0).all()):
                raise ValueError("L2Ball's radius tensor must hold one radius ≥ 0 per sample, "
                                 f"shape (batch,); got shape {tuple(radius.shape)}.")
        else:
            check_range(radius, "radius", low=0)
        if center is not None:
            check_tensor(center, "center")
        self.radius, self.center = radius, center

    def _offset(self, x: torch.Tensor) -> torch.Tensor:
        if self.center is not None and self.center.shape != x.shape:
            raise ValueError(f"L2Ball's center has shape {tuple(self.center.shape)}, x has shape "
                             f"{tuple(x.shape)}; they must match.")
        return x if self.center is None else x - self.center

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = self._offset(x)
        norm = d.flatten(1).norm(dim=1)
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        factor = torch.clamp(r / norm.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)
        d = d * factor.reshape(-1, *[1] * (x.dim() - 1))
        return d if self.center is None else self.center + d

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far x lies outside the ball (0 inside)."""
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        return (self._offset(x).flatten(1).norm(dim=1) - r).clamp_min(0)

    def __repr__(self) -> str:
        return f"L2Ball(radius={self.radius}, center={'0' if self.center is None else 'given'})"
