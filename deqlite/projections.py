"""Constraint sets for input optimization (``deqlite.jiio``): each is a projection Π onto a
convex set C, Π(x) = argmin_{c ∈ C} ‖c − x‖, applied per sample, and ``violation(x)``, how far a
sample lies outside C (0 inside).

Projected gradient descent x ← Π(x − α ∇ℓ) keeps every iterate feasible; JIIO's augmented map
takes that step on its input (Gurumurthy et al., NeurIPS 2021).

A set is checked when it is made (bounds that are NaN, crossed or of shapes that do not broadcast;
a radius that is not positive and finite) and against each x it projects (its shape), so that a
bad set fails with a message, not with NaN iterates or a silently broadcast result. JIIO wraps
any projection (these or the user's own callable) in ``CheckedProjection``, which names one that
returns another shape or NaN/inf for a finite x.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._validate import check_range, check_tensor


def _bound(value, name: str):
    """A bound of a Box: a real number (±inf allowed) or a real tensor, never NaN."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"Box's {name} must be real numbers, got a tensor of dtype {value.dtype}.")
        if bool(torch.isnan(value).any()):
            raise ValueError(f"Box's {name} contains {int(torch.isnan(value).sum())} NaN value(s); "
                             f"use -inf / inf for an unbounded entry.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Box's {name} must be a number or a tensor, got {value!r}.")
    if math.isnan(value):
        raise ValueError(f"Box's {name} is nan; use -inf / inf for an unbounded side.")
    return value


def _check_broadcast(shape: tuple, x_shape: tuple, what: str) -> None:
    try:
        fits = torch.broadcast_shapes(shape, x_shape) == x_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{what} has shape {tuple(shape)}, which does not broadcast to x's shape "
                         f"{tuple(x_shape)}; give it x's shape, x.shape[1:] (one value per feature, "
                         f"for every sample) or a number.")


class Box:
    """Π(x) = min(max(x, low), high): the box low ≤ x ≤ high. The bounds are numbers (low < high),
    or tensors that broadcast to x's shape, e.g. one bound per feature of shape x.shape[1:]
    (low ≤ high everywhere: an entry with low = high is pinned)."""

    def __init__(self, low=-math.inf, high=math.inf):
        low, high = _bound(low, "low"), _bound(high, "high")
        if not isinstance(low, torch.Tensor) and not isinstance(high, torch.Tensor):
            if not low < high:
                raise ValueError(f"Box needs low < high, got low={low}, high={high}.")
        else:
            lo, hi = (torch.as_tensor(b, dtype=torch.float64) for b in (low, high))
            try:
                torch.broadcast_shapes(lo.shape, hi.shape)
            except RuntimeError:
                raise ValueError(f"Box's low (shape {tuple(lo.shape)}) and high (shape "
                                 f"{tuple(hi.shape)}) do not broadcast against each other.") from None
            crossed = (lo > hi) | (lo == math.inf) | (hi == -math.inf)
            if bool(crossed.any()):
                lo, hi, crossed = torch.broadcast_tensors(lo, hi, crossed)
                i = tuple(crossed.nonzero()[0].tolist())
                raise ValueError(f"Box needs low ≤ high (and low < inf, high > -inf) everywhere; "
                                 f"{int(crossed.sum())} of {crossed.numel()} entries break it, e.g. "
                                 f"index {i}: low={lo[i].item():g}, high={hi[i].item():g}. Are low "
                                 f"and high swapped?")
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bounds = []
        for name, b in (("low", self.low), ("high", self.high)):
            b = torch.as_tensor(b, dtype=x.dtype, device=x.device)
            _check_broadcast(b.shape, x.shape, f"Box's {name}")
            bounds.append(b)
        return torch.minimum(torch.maximum(x, bounds[0]), bounds[1])

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far x lies outside the box (0 inside)."""
        return (x - self(x)).flatten(1).norm(dim=1)

    def __repr__(self) -> str:
        return f"Box(low={self.low}, high={self.high})"


class L2Ball:
    """Π(x) = c + (x − c) · min(1, r / ‖x − c‖₂), per sample: the ball ‖x − c‖₂ ≤ r around the
    center c (default 0; shape of x, e.g. the clean images of an attack) with radius r (a number
    or one per sample, > 0 and finite)."""

    def __init__(self, radius, center: Optional[torch.Tensor] = None):
        if isinstance(radius, torch.Tensor):
            if radius.dim() != 1 or not bool((radius > 0).all() & torch.isfinite(radius).all()):
                raise ValueError("L2Ball's radius tensor must hold one radius > 0 (and finite) per "
                                 f"sample, shape (batch,); got shape {tuple(radius.shape)}"
                                 f"{'' if radius.dim() != 1 else f', values {radius.tolist()}'}.")
        else:
            check_range(radius, "radius", low=0, low_open=True)
            if not math.isfinite(radius):
                raise ValueError(f"radius must be finite, got {radius!r} (a ball of infinite "
                                 f"radius constrains nothing: pass projection=None).")
        if center is not None:
            check_tensor(center, "center")
        self.radius, self.center = radius, center

    def _offset(self, x: torch.Tensor) -> torch.Tensor:
        if self.center is not None and self.center.shape != x.shape:
            raise ValueError(f"L2Ball's center has shape {tuple(self.center.shape)}, x has shape "
                             f"{tuple(x.shape)}; they must match.")
        if isinstance(self.radius, torch.Tensor) and len(self.radius) != len(x):
            raise ValueError(f"L2Ball has {len(self.radius)} radii (one per sample) but x has "
                             f"{len(x)} samples (shape {tuple(x.shape)}).")
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


class CheckedProjection:
    """A projection Π (any callable; None: the identity) whose every output is checked, for
    ``deqlite.jiio``: a tensor of its input's shape and dtype, finite wherever the input is (one
    synchronization per call). ``where`` names the caller's step in the error ("JIIO iteration
    3"). NaN/inf from NaN/inf input is passed on: that is the caller's divergence to report."""

    def __init__(self, projection=None):
        self.projection, self.where = projection, "the start"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return x
        out = self.projection(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}" \
                if isinstance(out, torch.Tensor) else type(out).__name__
            raise (ValueError if isinstance(out, torch.Tensor) else TypeError)(
                f"the projection {self.projection!r} returned {got} at {self.where} for x of shape "
                f"{tuple(x.shape)} and dtype {x.dtype}; a projection must return x's shape and dtype.")
        if not bool(torch.isfinite(out).all()):
            broken = (~torch.isfinite(out) & torch.isfinite(x)).unsqueeze(-1).flatten(1).any(1)
            if bool(broken.any()):
                samples = broken.nonzero().flatten().tolist()
                raise ValueError(f"the projection {self.projection!r} returned NaN/inf at "
                                 f"{self.where} for a finite x (sample(s) "
                                 f"{', '.join(map(str, samples[:8]))}); check its bounds, center "
                                 f"and radius.")
        return out
