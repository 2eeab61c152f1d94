"""The fixed-point problems of ``bench_solvers.py``: tanh cells in seven regimes, a contracting
``ConvCell`` and a contracting ``MultiscaleCell``, each as one map f on a single tensor that both
deqlite and TorchDEQ can be handed.

Every problem is a ``Problem``: ``f`` (no autograd needed: the benchmark calls it under
``torch.no_grad()``), the start ``z0`` (zeros), a one-line description and ``max_iter_for(tol)``,
the least max_iter at which every solver should be able to get there (the slow regimes need more
than the benchmark's default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from deqlite import MLPCell
from deqlite.cells import ConvCell, MultiscaleCell
from deqlite.solvers import flatten_state, unflatten_state

# near-orthogonal regimes: W = ρ Q, inputs scale · N(0, 1); name -> (ρ, scale)
NEAR_ORTHOGONAL = {f"near_orthogonal_{rho}_x{scale}": (rho, scale)
                   for rho in (0.99, 0.999) for scale in (0.01, 0.1)}
MLP_REGIMES = ["gaussian", "orthogonal", "symmetric", *NEAR_ORTHOGONAL]
GRADIENT_REGIMES = ["gaussian", "orthogonal", "symmetric"]    # the float64 reference stays short
CELL_REGIMES = ["conv", "multiscale"]
REGIMES = MLP_REGIMES + CELL_REGIMES


@dataclass
class Problem:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    z0: torch.Tensor
    description: str
    rho: Optional[float] = None          # ‖W‖₂ of a linear-looking regime: sizes max_iter

    def max_iter_for(self, tol: float) -> int:
        """Iterations plain iteration needs in the linear worst case, ρᵏ ≤ tol, with 20 % margin
        (0 where the default max_iter is plenty)."""
        return math.ceil(1.2 * math.log(tol) / math.log(self.rho)) if self.rho else 0


def make_problem(regime: str, width: int, batch: int, dtype=torch.float32, seed: int = 0):
    """``(cell, x, c)`` for an MLP regime: the tanh cell f(z, x) = tanh(W z + x) (U = I, b = 0),
    its input and the loss' direction c (for the gradient section)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if regime == "gaussian":
        W = randn(width, width)
        W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
        x = randn(batch, width)
    elif regime == "orthogonal":
        W = 0.95 * torch.linalg.qr(randn(width, width))[0]
        x = randn(batch, width)
    elif regime == "symmetric":
        Q = torch.linalg.qr(randn(width, width))[0]
        W = (Q * torch.linspace(0, 0.97, width, dtype=torch.float64)) @ Q.T
        x = 0.01 * randn(batch, width)
    elif regime in NEAR_ORTHOGONAL:
        rho, scale = NEAR_ORTHOGONAL[regime]
        W = rho * torch.linalg.qr(randn(width, width))[0]
        x = scale * randn(batch, width)
    else:
        raise ValueError(f"unknown regime {regime!r}")
    cell = MLPCell(width, width).to(dtype)
    with torch.no_grad():
        cell.W.weight.copy_(W)
        cell.U.weight.copy_(torch.eye(width))
        cell.U.bias.zero_()
    return cell, x.to(dtype), randn(batch, width).to(dtype)


def mlp_problem(regime: str, width: int, batch: int) -> Problem:
    cell, x, _ = make_problem(regime, width, batch)
    with torch.no_grad():
        inj = cell.inject(x)
    rho = NEAR_ORTHOGONAL.get(regime, (None,))[0]
    return Problem(regime, lambda z: cell(z, inj), torch.zeros(batch, width),
                   f"tanh cell, width {width}, batch {batch}", rho)


def conv_problem(batch: int, channels: int = 16, size: int = 16, seed: int = 0) -> Problem:
    """``ConvCell(3, 16)`` (expansion 5: an inner width of 80 channels, GroupNorm, weight norm)
    on 16×16 maps, made a contraction: the injection's weights ×2 (u outweighs the block's
    z-dependent part inside its second GroupNorm) and the last GroupNorm's gain 0.7 (damps the
    residual path z → out). At PyTorch's default init it has ρ(J) ≈ 0.98 at its fixed point;
    scaled, ρ(J) ≈ 0.8, and plain iteration needs ~25 steps to 1e-4."""
    torch.manual_seed(seed)
    cell = ConvCell(3, channels).eval()
    with torch.no_grad():
        cell.injection.weight.mul_(2.0)
        cell.block.norm3.weight.fill_(0.7)
        inj = cell.inject(torch.randn(batch, 3, size, size))
    return Problem("conv", lambda z: cell(z, inj), torch.zeros(batch, channels, size, size),
                   f"ConvCell(3, {channels}), {size}×{size}, batch {batch}")


def multiscale_problem(batch: int, channels=(16, 32), size: int = 16, damping: float = 3.0,
                       seed: int = 0) -> Problem:
    """``MultiscaleCell(3, [16, 32], expansion=4)`` at 16×16 and 8×8, made a contraction the way
    ``tests/test_cells.py`` does, with a milder factor d = 3: injection weights and branch 0's
    second GroupNorm gain ×d (the input outweighs z₀), branch 1's last GroupNorm gain and the
    low → high resolution fusion's GroupNorm gain 1/d. (At PyTorch's default init no solver
    converges: ρ(J) > 1.) Scaled, ρ(J) ≈ 0.85.

    Its state is a list [z₀, z₁]; TorchDEQ's solvers need one tensor, so both libraries get the
    same flat map: z (batch, D) → unflatten → cell → flatten (``deqlite.solvers.flatten_state``)."""
    torch.manual_seed(seed)
    cell = MultiscaleCell(3, list(channels), expansion=4).eval()
    with torch.no_grad():
        cell.injection.weight.mul_(damping)
        cell.branches[0].norm2.weight.fill_(damping)
        for branch in cell.branches[1:]:
            branch.norm3.weight.fill_(1 / damping)
        for i in range(len(channels)):
            for j in range(i + 1, len(channels)):
                cell.fuse[i][j][-1].weight.fill_(1 / damping)      # the upsampling's GroupNorm
        inj = cell.inject(torch.randn(batch, 3, size, size))
        z0, spec = flatten_state(cell.init_state(inj))

    def f(z):
        return flatten_state(cell(unflatten_state(z, spec), inj), check=False)[0]
    shapes = " + ".join(f"{c}×{h}×{w}" for c, h, w in cell.state_shapes(size, size))
    return Problem("multiscale", f, z0, f"MultiscaleCell(3, {list(channels)}, expansion=4), "
                   f"state {shapes} flattened, batch {batch}")


def get_problem(regime: str, width: int, batch: int, cell_batch: int) -> Problem:
    if regime == "conv":
        return conv_problem(cell_batch)
    if regime == "multiscale":
        return multiscale_problem(cell_batch)
    return mlp_problem(regime, width, batch)


class Counter:
    """f wrapped so that every call on the batch is counted."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def worst_rel_residual(f, z) -> float:
    """max over the batch of ‖f(z) − z‖ / ‖f(z)‖, for a state of any shape (batch, ...)."""
    with torch.no_grad():
        fz = f(z)
        res = (fz - z).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)
        return res.max().item()


def reached(residual: float, tol: float) -> bool:
    """A solve got there: its worst residual, recomputed, is tol (to 0.1 %: the solvers test
    their own float32 residual)."""
    return residual <= tol * (1 + 1e-3)


def spectral_radius(f, z, steps: int = 30) -> float:
    """An estimate of ρ(J_f(z)), the worst sample's (J is block-diagonal over the batch): the
    geometric mean growth ‖J v‖ / ‖v‖ over the last ``steps`` of 2·steps power-iteration steps,
    with J v by central differences (f(z + εv) − f(z − εv)) / 2ε, ε = 1e-3 ‖z‖ (two f calls; a
    forward-mode JVP through the conv cells costs ~50 f calls). The mean, not the last ratio:
    for a rotation-like J (complex eigenvalues) the single ratios oscillate, their geometric mean
    over many steps does not."""
    eps = 1e-3 * max(z.norm().item(), 1.0)
    v = torch.randn_like(z)
    v = v / v.norm()
    logs = []
    with torch.no_grad():
        for _ in range(2 * steps):
            jv = (f(z + eps * v) - f(z - eps * v)) / (2 * eps)
            norm = jv.norm()
            logs.append(norm.log().item())
            v = jv / norm
    return math.exp(sum(logs[steps:]) / steps)
