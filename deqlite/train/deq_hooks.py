"""What the training loop does because the model is a DEQ, as plain functions of (config, step);
with the learning-rate schedule, which the DEQ recipes shape around the warm-up.

Steps are counted from 0: "step k" is the (k+1)-th optimizer step, taken after k steps.

Learning rate (``lr_factor``, the factor of ``lr`` at step k; T = the run's total steps,
W = ``lr_warmup_steps``, as ``DEQ-Sequence/train_transformer.py`` of locuslab/deq does it)::

    k < W:   max(k, 1) / W                  (a linear rise, not shaped by the cosine)
    k ≥ W:   cosine:   f + (1 − f) · ½ (1 + cos(π · min(k, T) / T)),   f = lr_min / lr
             constant: 1

The cosine runs over all T steps from step 0 (the warm-up covers its start, it does not shift
it), so at k = W the rate steps from (W − 1)/W to the cosine's value there. (The locuslab loop
sets the rate only after a step, so its step 0 runs at the full rate; here step 0 takes step 1's,
1/W.)

Warm-up (as the DEQ papers pretrain): for the first ``pretrain_steps`` steps the cell is unrolled
``pretrain_depth`` times, a shallow weight-tied network, instead of solved for its equilibrium
(``warm_up_depth``; the loop sets it with ``deq.options(pretrain_steps=...)``); an evaluation in
the warm-up unrolls it ``pretrain_eval_depth`` times instead, when that is set (locuslab's
``--eval_n_layer``, which its model, though, reads only for an evaluation at train_step 0).

Random forward cap (``forward_max_iter``; J = ``max_iter_jitter``, M = the forward solver's
``max_iter``): after the warm-up, a training step's forward solve stops after at most ::

    "sequence":  M − U{0, ..., J}    on every training step (DEQ-Sequence: --rand_f_thres_delta)
    "vision":    M + U{−J, ..., +1}  on the steps that add the Jacobian regularizer, M on the
                                     others (MDEQ-Vision: DEQ.RAND_F_THRES_DELTA)

iterations (never fewer than 1); evaluation always uses M.

Jacobian regularization (Bai, Koltun, Kolter, ICML 2021): with ``jac_reg_weight = γ > 0`` the
loss of a step becomes  loss + γ_k · ‖J_f(z*)‖²_F / d  (Hutchinson, ``jac_reg_probes`` probes),
on each step with probability ``jac_reg_prob`` (``jac_reg_now``), with γ_k (``jac_weight``)
rising linearly from 0 to γ over the first ``jac_reg_ramp_steps`` steps (0: γ from the start)
and growing by δ = ``jac_reg_increment`` every N = ``jac_reg_increment_every`` steps after the
warm-up of P steps:

    "sequence":  γ_k = γ + δ · (⌊k / N⌋ − ⌊P / N⌋)   for k > P   (at every multiple of N past P)
    "vision":    γ_k = γ + δ · ⌊(k − P) / N⌋          for k ≥ P   (N, 2N, ... steps after P)

(DEQ-Sequence's ``--jac_incremental N`` adds 0.1 after each step whose count is a multiple of
N beyond the warm-up; MDEQ-Vision's ``LOSS.JAC_INCREMENTAL`` 0.1 per N steps since the warm-up);
``pretrain_jac_reg_weight`` sets another γ for the warm-up and ``jac_reg_stop_epoch`` switches it
off late in training (both as in the MDEQ recipes).

Determinism: every random draw of a step comes from generators seeded by (seed, step) (and the
rank, for the draws that differ per process: ``step_seed``), so a resumed run draws the same,
and the draws that must agree across processes (whether to regularize, the forward cap) do.

The numbers of the records: ``solver_metrics`` (forward and backward NFE, the worst final
relative residual) after each step, and ``jacobian_metrics`` (ρ(J) and ‖J‖²_F / d at z*, and the
share of those examples whose solve reached the tolerance) at an evaluation.
"""
from __future__ import annotations

import math
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


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate's factor (of ``lr``) at `step` of a run of `total_steps` steps: the
    linear warm-up max(step, 1) / ``lr_warmup_steps`` first, then the cosine from 1 to
    lr_min / lr over all `total_steps` (or 1 for the constant schedule); module docstring."""
    c = config
    if step < c.lr_warmup_steps:
        return max(step, 1) / c.lr_warmup_steps
    if c.schedule != "cosine":
        return 1.0
    floor = c.lr_min / c.lr
    return floor + (1 - floor) * 0.5 * (
        1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def warm_up_depth(config: TrainConfig, step: int, *, evaluating: bool = False) -> int:
    """How many times the cell is unrolled at `step`: during the warm-up ``pretrain_depth`` (an
    evaluation: ``pretrain_eval_depth`` if set), after it 0 (solve for the equilibrium)."""
    c = config
    if step >= c.pretrain_steps:
        return 0
    return c.pretrain_eval_depth if evaluating and c.pretrain_eval_depth is not None \
        else c.pretrain_depth


def forward_max_iter(config: TrainConfig, step: int, max_iter: int, *,
                     regularized: bool = False) -> Optional[int]:
    """The forward solve's iteration cap for training step `step` when ``max_iter_jitter`` J > 0
    (`max_iter`: the solver's own cap M; `regularized`: whether the step adds the Jacobian
    regularizer): after the warm-up, M − U{0..J} (rule "sequence") or, on regularized steps,
    M + U{−J..1} (rule "vision"), at least 1. None where no jitter applies (no J, the warm-up, an
    unregularized step under "vision"): the solver's own cap. The draw is the second of the
    generator seeded by (seed, step) whose first is ``jac_reg_now``'s, so a resumed run and every
    process draw the same cap."""
    c, jitter = config, config.max_iter_jitter
    if not jitter or step < c.pretrain_steps or (c.max_iter_jitter_rule == "vision"
                                                 and not regularized):
        return None
    count = jitter + 1 + (c.max_iter_jitter_rule == "vision")       # caps M − J ... M (+ 1)
    u = step_uniform(c, step, 1)
    return max(1, max_iter - jitter + min(int(u * count), count - 1))


def jac_increments(config: TrainConfig, step: int) -> int:
    """How many times γ has grown by ``jac_reg_increment`` before `step` (module docstring)."""
    c, every, warm = config, config.jac_reg_increment_every, config.pretrain_steps
    if not every:
        return 0
    if c.jac_reg_increment_rule == "sequence":
        return step // every - warm // every if step > warm else 0
    return (step - warm) // every if step >= warm else 0


def jac_weight(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """γ_k: the Jacobian regularizer's weight at `step`: ``pretrain_jac_reg_weight`` during the
    warm-up (if set), 0 from epoch ``jac_reg_stop_epoch`` on (if set), otherwise
    ``jac_reg_weight`` after a linear ramp over the first ``jac_reg_ramp_steps`` steps, plus
    ``jac_reg_increment`` times the increments due (``jac_increments``)."""
    c = config
    if c.jac_reg_stop_epoch is not None and step // steps_per_epoch >= c.jac_reg_stop_epoch:
        return 0.0
    if step < c.pretrain_steps and c.pretrain_jac_reg_weight is not None:
        return c.pretrain_jac_reg_weight
    ramp = min(1.0, (step + 1) / c.jac_reg_ramp_steps) if c.jac_reg_ramp_steps else 1.0
    return c.jac_reg_weight * ramp + c.jac_reg_increment * jac_increments(c, step)


def jac_reg_now(config: TrainConfig, step: int, weight: float) -> bool:
    """Whether `step` adds the regularizer (of weight `weight`, 0: never): a draw with probability
    ``jac_reg_prob`` from a generator seeded by (seed, step), so a resumed run (and every process)
    makes the same draws."""
    if weight == 0:
        return False
    return step_uniform(config, step, 0) < config.jac_reg_prob


def step_uniform(config: TrainConfig, step: int, index: int) -> float:
    """Uniform draw number `index` of the generator seeded by (seed, step), the same in every
    process and in a resumed run: 0 decides the Jacobian regularizer, 1 the forward cap."""
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    return torch.rand(index + 1, generator=generator)[index].item()


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
