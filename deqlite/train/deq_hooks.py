"""What the training loop does because the model is a DEQ, as plain functions of (config, step).

Warm-up (as the DEQ papers pretrain): for the first ``pretrain_steps`` steps the cell is unrolled
``pretrain_depth`` times, a shallow weight-tied network, instead of solved for its equilibrium
(``warm_up_depth``; the loop sets it with ``deq.options(pretrain_steps=...)``).

Jacobian regularization (Bai, Koltun, Kolter, ICML 2021): with ``jac_reg_weight = γ > 0`` the
loss of a step becomes  loss + γ_t · ‖J_f(z*)‖²_F / d  (Hutchinson, ``jac_reg_probes`` probes),
on each step with probability ``jac_reg_prob`` (``jac_reg_now``), with γ_t (``jac_weight``)
rising linearly from 0 to γ over the first ``jac_reg_ramp_steps`` steps (0: γ from the start);
``pretrain_jac_reg_weight`` sets another γ for the warm-up and ``jac_reg_stop_epoch`` switches it
off late in training (both as in the MDEQ recipes).

Determinism: every random draw of a step comes from generators seeded by (seed, step) (and the
rank, for the draws that differ per process: ``step_seed``), so a resumed run draws the same.

The numbers of the records: ``solver_metrics`` (forward and backward NFE, the worst final
relative residual) after each step, and ``jacobian_metrics`` (ρ(J) and ‖J‖²_F / d at z*, and the
share of those examples whose solve reached the tolerance) at an evaluation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..deq import DEQ, equilibrium
from ..jacobian import hutchinson_frobenius, spectral_radius
from .config import TrainConfig


def model_deq(model: nn.Module) -> Optional[DEQ]:
    """The model's DEQ, or None for an explicit model (a model with several DEQs is an error)."""
    found = [m for m in model.modules() if isinstance(m, DEQ)]
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} DEQ modules; the trainer "
                         f"records and regularizes one.")
    return found[0] if found else None


def warm_up_depth(config: TrainConfig, step: int) -> int:
    """How many times the cell is unrolled at `step`: ``pretrain_depth`` during the warm-up,
    0 (solve for the equilibrium) after it."""
    return config.pretrain_depth if step < config.pretrain_steps else 0


def jac_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """γ_t: the Jacobian regularizer's weight at `step`: ``pretrain_jac_reg_weight`` during the
    warm-up (if set), 0 from epoch ``jac_reg_stop_epoch`` on (if set), otherwise
    ``jac_reg_weight`` after a linear ramp over the first ``jac_reg_ramp_steps`` steps."""
    c = config
    if c.jac_reg_stop_epoch is not None and step // steps_per_epoch >= c.jac_reg_stop_epoch:
        return 0.0
    if step < c.pretrain_steps and c.pretrain_jac_reg_weight is not None:
        return c.pretrain_jac_reg_weight
    ramp = min(1.0, (step + 1) / c.jac_reg_ramp_steps) if c.jac_reg_ramp_steps else 1.0
    return c.jac_reg_weight * ramp


def jac_reg_now(config: TrainConfig, step: int, weight: float) -> bool:
    """Whether `step` adds the regularizer (of weight `weight`, 0: never): a draw with probability
    ``jac_reg_prob`` from a generator seeded by (seed, step), so a resumed run (and every process)
    makes the same draws."""
    if weight == 0:
        return False
    draw = torch.rand(1, generator=torch.Generator().manual_seed(config.seed * 7919 + step))
    return draw.item() < config.jac_reg_prob


def step_seed(config: TrainConfig, step: int, rank: int) -> int:
    """The seed of torch's generator for this step's random draws (dropout masks, Hutchinson
    probes): a function of (seed, step, rank), so a resumed run draws the same, and the processes
    of a distributed run draw differently (each for its own examples)."""
    return ((config.seed * 1_000_003 + step) * 1_000_003 + rank) % 2 ** 63


def solver_metrics(deq: Optional[DEQ], depth: int) -> dict:
    """Forward and backward NFE, the worst final relative residual of the DEQ's last call, and
    ``nonfinite``: how many samples its forward and adjoint solves lost to NaN/inf (during the
    warm-up: ``depth`` applications of f and nothing else; None for no DEQ)."""
    if deq is None or deq.forward_stats is None:
        return dict(fwd_nfe=depth if deq is not None else None, bwd_nfe=None, residual=None,
                    nonfinite=0 if deq is not None else None)
    fwd, bwd = deq.forward_stats, deq.backward_stats
    lost = fwd.num_nonfinite + (bwd.num_nonfinite if bwd is not None else 0)
    return dict(fwd_nfe=fwd.nfe, bwd_nfe=bwd.nfe if bwd is not None else None,
                residual=fwd.final_rel.max().item(), nonfinite=lost)


def jacobian_metrics(module: nn.Module, inputs: torch.Tensor) -> dict:
    """ρ(J) (mean and max) and ‖J‖²_F / d at the state ``module``'s DEQ reaches on `inputs`
    (a text window's whole (seq_len, width) state as one sample), with fixed random draws so that
    successive evaluations are comparable (in float32: no autocast); ``converged``: the share of
    `inputs` whose forward solve reached the tolerance (None during the warm-up: no solve)."""
    deq, f, z = equilibrium(module, inputs)
    stats = deq.forward_stats
    converged = stats.converged.float().mean().item() if stats is not None else None
    rho = spectral_radius(f, z, generator=torch.Generator().manual_seed(0))
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        fro = hutchinson_frobenius(f(z_in), z_in, n_probes=4, kind="rademacher",
                                   generator=torch.Generator().manual_seed(1))
    return dict(spectral_radius=rho.mean().item(), spectral_radius_max=rho.max().item(),
                jac_frobenius=fro.mean().item(), converged=converged)
