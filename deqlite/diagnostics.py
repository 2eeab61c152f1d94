"""`diagnose`: why is this DEQ slow, stuck or diverging, and what to try.

The forward solve's residual trace says *what* happened; the Jacobian J = ∂f/∂z at the returned
state says *why*. Near z*, forward iteration's error shrinks like e_{k+1} ≈ J e_k, so

* ρ(J) < 1: z* attracts forward iteration, at about ρ(J) per step, i.e.
  log(tol)/log ρ(J) steps to reach ``tol`` (ρ = 0.9: ~90 steps for 1e-4; ρ = 0.5: ~13);
* ρ(J) ≥ 1: z* repels forward iteration (Anderson and Broyden may still find it, less reliably);
  at a state that is *not* an equilibrium (the solve did not converge) ρ(J) says only that the
  map expands there, not whether some equilibrium elsewhere would attract;
* a large ‖J‖²_F / d (many large directions) makes every solver work harder: the quantity
  Jacobian regularization penalizes.

    report = diagnose(model, images)      # a DEQ model (finds its DEQ) or a DEQ and its input
    print(report)                          # the numbers and the advice
    report.plot()                          # residual traces and J's eigenvalues vs the unit circle
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from matplotlib.figure import Figure
from torch import nn

from .deq import equilibrium, find_deq
from .jacobian import exact_jacobian, hutchinson_frobenius, ritz_values
from .plots import plot_diagnosis
from .stats import SolverStats

EXACT_LIMIT = 256          # states up to this size get the exact Jacobian


@dataclass
class Diagnosis:
    """What ``diagnose`` found. ``print(d)`` gives the report; ``d.plot()`` the pictures."""
    stats: SolverStats
    max_iter: int
    spectral_radius: torch.Tensor           # (batch,) ρ(J) at the returned state
    frobenius: torch.Tensor                 # (batch,) ‖J‖²_F / d
    eigenvalues: torch.Tensor               # (k,) complex: J's eigenvalues for sample 0 ...
    exact: bool                             # ... all d of them (True) or k Arnoldi estimates
    status: str = ""
    advice: list = field(default_factory=list)

    def forward_iteration_steps(self, tol: Optional[float] = None) -> float:
        """≈ log(tol)/log(ρ): forward-iteration steps to shrink the error to tol (inf if ρ ≥ 1)."""
        rho = self.spectral_radius.max().item()
        tol = tol or self.stats.tol or 1e-4
        return math.inf if rho >= 1 else math.log(tol) / math.log(max(rho, 1e-12))

    def report(self) -> str:
        rho, fro = self.spectral_radius, self.frobenius
        lines = [f"status: {self.status}",
                 f"  solve: {self.stats!r}",
                 f"  spectral radius ρ(J): median {rho.median().item():.3f}, max {rho.max().item():.3f} "
                 f"({int((rho >= 1).sum())}/{rho.numel()} samples ≥ 1)",
                 f"  ‖J‖²_F / d: median {fro.median().item():.3f}, max {fro.max().item():.3f}"]
        steps = self.forward_iteration_steps()
        if math.isfinite(steps):
            lines.append(f"  forward iteration would need ≈ {steps:.0f} steps for tol {self.stats.tol or 1e-4:g}")
        lines += [f"  try: {a}" for a in self.advice]
        return "\n".join(lines)

    __str__ = report

    def plot(self, fig: Optional[Figure] = None) -> Figure:
        """Left: the residual traces (every sample faintly, the batch max boldly). Right: J's
        eigenvalues for sample 0 in the complex plane, with the unit circle ρ = 1."""
        return plot_diagnosis(self, fig)

    def __repr__(self) -> str:
        return self.report()


def _status_and_advice(stats: SolverStats, rho: torch.Tensor, max_iter: int) -> tuple[str, list]:
    advice = []
    trace = stats.residuals
    if not torch.isfinite(trace).all() or (trace[-1] > 10 * trace.min(dim=0).values).any():
        status = "diverging: the residual blew up"
    elif stats.all_converged:
        status = f"converged in {stats.nfe} NFE"
        if stats.nfe > 0.5 * max_iter:
            status += f" (more than half of max_iter = {max_iter})"
    elif bool(stats.precision_limited.any()):
        status = (f"at the precision floor: tol {stats.tol:g} is below what {stats.dtype} can "
                  f"resolve (the residual stopped near it)")
    elif bool(stats.diverged.any()):
        status = "stagnating: the residual stopped decreasing above tol"
    else:
        status = "slow: still improving when max_iter ran out"
    rho_max = rho.max().item()
    if rho_max >= 1:
        at_equilibrium = bool((rho[stats.converged.to(rho.device)] >= 1).any())
        where = ("at an equilibrium the solve found: that z* repels forward iteration"
                 if at_equilibrium else
                 "at the returned state, which is not an equilibrium (the solve did not converge "
                 "there): the map expands near it, so forward iteration cannot settle there")
        advice.append(f"ρ(J) = {rho_max:.2f} ≥ 1 {where}. Use anderson or broyden, damping "
                      "(forward_iteration's `damping`, anderson's `beta` < 1), a smaller weight "
                      "scale, or train with Jacobian regularization.")
    elif rho_max > 0.9:
        advice.append(f"ρ(J) = {rho_max:.2f} is close to 1: expect slow convergence. Jacobian "
                      "regularization (TrainConfig.jac_reg_weight) keeps it lower during training.")
    if status.startswith("at the precision floor"):
        advice.append(stats.precision_advice(stats.precision_limited).strip())
    if status.startswith("slow"):
        advice.append("raise max_iter, loosen tol, or switch to a faster solver (anderson, broyden).")
    elif status.startswith(("stagnating", "diverging")) and rho_max < 1:
        advice.append("the map contracts at the returned state but the solver failed: lower "
                      "anderson's `beta` or raise its regularizer `lam`, or start from a better z0 "
                      "(warm start).")
    return status, advice


def diagnose(model: nn.Module, inputs: torch.Tensor, *, n_iter: int = 40,
             generator: Optional[torch.Generator] = None) -> Diagnosis:
    """Solve for the equilibrium of `model` (a DEQ, or a model holding one) on `inputs` and report
    the residual trajectory, ρ(J) and ‖J‖²_F/d at the returned state, and what to try.

    The solve uses the DEQ's own settings (the unrolled warm-up is switched off for it);
    convergence warnings are folded into the report. J is computed exactly for states of up to
    ``EXACT_LIMIT`` entries; larger ones get ρ(J) from ``n_iter`` Arnoldi steps and ‖J‖²_F/d
    from 8 Hutchinson probes.
    """
    with find_deq(model).options(pretrain_steps=0), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deq, f, z = equilibrium(model, inputs)
    stats = deq.forward_stats
    if z[0].numel() <= EXACT_LIMIT:              # small state: the exact Jacobian
        J = exact_jacobian(f, z)
        low = J.dtype in (torch.float16, torch.bfloat16)     # eigvals needs float32 or wider
        eig, exact = torch.linalg.eigvals(J.float() if low else J), True
        fro = J.square().sum((1, 2)) / J.shape[-1]
    else:                                        # large: Arnoldi and Hutchinson estimates
        eig, exact = ritz_values(f, z, n_iter=n_iter, generator=generator), False
        z_in = z.detach().requires_grad_()
        with torch.enable_grad():
            fro = hutchinson_frobenius(f(z_in), z_in, n_probes=8, kind="rademacher",
                                       generator=generator)
    rho = eig.abs().max(dim=1).values.to(z.dtype)
    max_iter = deq.forward_solver.max_iter
    status, advice = _status_and_advice(stats, rho, max_iter)
    return Diagnosis(stats=stats, max_iter=max_iter, spectral_radius=rho,
                     frobenius=fro.detach(), eigenvalues=eig[0], exact=exact, status=status,
                     advice=advice)
