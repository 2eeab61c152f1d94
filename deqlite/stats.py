"""Records: `SolverStats`, what a fixed-point solve did, per sample, in a form every solver
shares; `InputOptStats`, what an input optimization did (``deqlite.jiio``); and what to do when a
solve did not converge, or went NaN/inf (``check_convergence``).

For a map f and an iterate z the residuals are, per sample,

    abs residual  r_abs = ‖f(z) − z‖
    rel residual  r_rel = ‖f(z) − z‖ / (‖f(z)‖ + eps)

Every solver evaluates f once per iteration, so row k of `abs_residuals` / `rel_residuals`
is the residual of the k-th function evaluation: every trace has exactly `nfe` rows, and the
traces of different solvers can be drawn on the same "function evaluations" axis.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

EPS = 1e-9  # keeps the relative residual finite when f(z) = 0
ON_FAIL = ("warn", "raise", "ignore")


def residuals(fz: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample ``(‖f(z) − z‖, ‖f(z) − z‖ / (‖f(z)‖ + eps))`` for states of shape (batch, ...),
    in float32 at least: a float16 norm overflows to inf past 65504 (a scaled gradient's does).
    If ‖f(z)‖ itself overflows, the relative residual is NaN, not a false 0."""
    dtype = torch.promote_types(fz.dtype, torch.float32)
    r_abs = torch.linalg.vector_norm((fz - z).flatten(1), dim=1, dtype=dtype)
    size = torch.linalg.vector_norm(fz.flatten(1), dim=1, dtype=dtype)
    return r_abs, relative_residual(r_abs, size)


def relative_residual(r_abs: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """‖f(z) − z‖ / (‖f(z)‖ + eps) from the two norms; NaN where ‖f(z)‖ overflowed to inf."""
    return torch.where(torch.isinf(size), float("nan"), r_abs / (size + EPS))


@dataclass
class SolverStats:
    """The record of one solve.

    Attributes:
        solver: name of the solver that ran (``"anderson"``, ...).
        nfe: true number of function evaluations (calls of f on the whole batch).
        abs_residuals: ``(nfe, batch)`` tensor, ‖f(z) − z‖ of each evaluated iterate.
        rel_residuals: ``(nfe, batch)`` tensor, ‖f(z) − z‖ / ‖f(z)‖ of each evaluated iterate.
        converged: ``(batch,)`` bool, the stopping criterion was met.
        final_abs, final_rel: ``(batch,)`` residuals of the returned z (the best iterate).
        tol, stop: the tolerance and which residual (``"abs"`` or ``"rel"``) it applied to.
        wall_time: seconds spent in the solve.
        nonfinite: ``(batch,)`` bool, the sample was lost to NaN/inf: f(z) (or its residual) was
            not finite, so its iteration stopped there. Its z is the best finite iterate before
            that, or NaN when it had none (never z0 posing as an answer). ``num_nonfinite``
            counts them. Default: the samples whose traces hold a NaN/inf.
        dtype: the dtype the solve computed in (the state's, or f's when that was less precise);
            it sets the precision floor ``report`` compares ``tol`` with. Default: the traces'.
    """

    solver: str
    nfe: int
    abs_residuals: torch.Tensor
    rel_residuals: torch.Tensor
    converged: torch.Tensor
    final_abs: torch.Tensor
    final_rel: torch.Tensor
    tol: float
    stop: str
    wall_time: float
    nonfinite: Optional[torch.Tensor] = None
    dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.nonfinite is None:
            finite = torch.isfinite(self.abs_residuals) & torch.isfinite(self.rel_residuals)
            self.nonfinite = ~self.converged & ~finite.all(dim=0)
        if self.dtype is None:
            self.dtype = self.abs_residuals.dtype

    @classmethod
    def from_traces(cls, solver: str, abs_res: list, rel_res: list, start: float,
                    dtype: Optional[torch.dtype] = None) -> "SolverStats":
        """The record of a fixed number of steps (``tol = 0``: nothing was asked to converge),
        from one ``(batch,)`` residual per step, the ``time.perf_counter()`` of the start and
        the dtype of the state (default: the residuals')."""
        abs_res, rel_res = torch.stack(abs_res), torch.stack(rel_res)
        return cls(solver=solver, nfe=len(abs_res), abs_residuals=abs_res, rel_residuals=rel_res,
                   converged=torch.zeros_like(abs_res[-1], dtype=torch.bool),
                   final_abs=abs_res[-1], final_rel=rel_res[-1], tol=0.0, stop="abs",
                   wall_time=time.perf_counter() - start, dtype=dtype)

    @property
    def residuals(self) -> torch.Tensor:
        """The trace of the residual the stopping rule uses, ``(nfe, batch)``."""
        return self.rel_residuals if self.stop == "rel" else self.abs_residuals

    @property
    def final(self) -> torch.Tensor:
        """Per-sample residual of the returned z, in the stopping rule's kind."""
        return self.final_rel if self.stop == "rel" else self.final_abs

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def num_nonfinite(self) -> int:
        """How many samples were lost to NaN/inf (``nonfinite``); 0 for a healthy solve."""
        return int(self.nonfinite.sum())

    @property
    def precision_floor(self) -> torch.Tensor:
        """Per sample, about the smallest residual ``dtype`` can resolve, in the stopping rule's
        kind: its machine epsilon for the relative residual, eps · ‖f(z)‖ for the absolute one
        (an iterate rounded to ``dtype`` is off by about that much, whatever the solver does)."""
        eps = torch.finfo(self.dtype).eps
        if self.stop == "rel":
            return torch.full_like(self.final_abs, eps)
        size = self.final_abs / self.final_rel.clamp_min(torch.finfo(self.final_rel.dtype).tiny)
        return eps * size                                   # ‖f(z)‖ = r_abs / r_rel

    @property
    def precision_limited(self) -> torch.Tensor:
        """Per sample: not converged, yet its residual got within 10× of ``precision_floor``:
        the tol is below what ``dtype`` can resolve, rather than the map failing to contract.
        (All false for a fixed number of steps, ``tol = 0``: no tol was asked for.)"""
        near_floor = self.final <= 10 * self.precision_floor
        return ~self.converged & ~self.nonfinite & near_floor & (self.tol > 0)

    @property
    def diverged(self) -> torch.Tensor:
        """Per sample: not converged, and the iteration went non-finite or stopped making
        progress (the last quarter of the trace never beat the best residual before it): the
        signature of a map that is not a contraction there, rather than of too few iterations."""
        trace = self.residuals
        blew_up = ~torch.isfinite(trace).all(dim=0)
        q = max(1, len(trace) // 4)
        if len(trace) < 4:
            stalled = trace[-1] >= trace[0]
        else:
            stalled = trace[-q:].min(dim=0).values >= trace[:-q].min(dim=0).values
        return ~self.converged & (blew_up | stalled)

    def __repr__(self) -> str:
        n = self.converged.numel()
        worst = self.final.max().item() if n else float("nan")
        lost = f", {self.num_nonfinite} lost to NaN/inf" if self.num_nonfinite else ""
        return (f"SolverStats({self.solver}: nfe={self.nfe}, converged "
                f"{int(self.converged.sum())}/{n}{lost}, worst {self.stop} residual {worst:.2e} "
                f"(tol {self.tol:g}), {self.wall_time * 1e3:.1f} ms)")

    def report(self) -> str:
        """A few lines for a human: what happened and, if it failed, what to try."""
        lines = [repr(self)]
        if self.all_converged:
            return lines[0]
        bad = (~self.converged).nonzero().flatten().tolist()
        lines.append(f"  not converged: sample(s) {_samples(bad)}")
        trace = self.residuals[:, bad[0]].tolist()
        picks = sorted({0, len(trace) // 4, len(trace) // 2, 3 * len(trace) // 4, len(trace) - 1})
        lines.append(f"  {self.stop} residual trace of sample {bad[0]}: "
                     + ", ".join(f"[{i}] {trace[i]:.2e}" for i in picks))
        lost, limited = self.nonfinite, self.precision_limited
        if bool(lost.any()):
            lost_ones = _samples(lost.nonzero().flatten().tolist())
            lines.append(f"  lost to NaN/inf: sample(s) {lost_ones}: f(z) was not finite there, so "
                         "their z is the best finite iterate before it (NaN if none). Look for "
                         "NaN/inf in the input or the weights (a diverged training step: lower the "
                         "learning rate, clip gradients), an overflow in float16 (use bfloat16 or "
                         "float32), or an iteration that blows up (damping, a smaller weight "
                         "scale, Jacobian regularization).")
        if bool(limited.any()):
            lines.append(self.precision_advice(limited))
        stalled = self.diverged & ~lost & ~limited
        if bool(stalled.any()):
            lines.append("  the iteration is not contracting: try damping (forward_iteration's "
                         "`damping` < 1, anderson's `beta` < 1), a smaller weight scale, "
                         "another solver, or Jacobian regularization.")
        if bool((~self.converged & ~self.diverged & ~limited).any()):
            lines.append("  still improving when stopped: raise `max_iter`, loosen `tol`, "
                         "or use a faster solver (anderson, broyden).")
        return "\n".join(lines)

    def precision_advice(self, limited: torch.Tensor) -> str:
        """The line for samples stuck at ``dtype``'s precision floor: a tol it can reach."""
        floor = self.precision_floor[limited].max().item()
        reachable = max(floor, self.final[limited].max().item())
        wider = {torch.float64: "", torch.float32: " or solve in float64"}.get(
            self.dtype, " or solve in float32")
        size = "" if self.stop == "rel" else f", an abs residual of about {floor:.1e} here"
        return (f"  tol {self.tol:g} is below the precision floor of {self.dtype} (eps ≈ "
                f"{torch.finfo(self.dtype).eps:.1e}{size}): sample(s) "
                f"{_samples(limited.nonzero().flatten().tolist())} stalled there, as close as "
                f"{self.dtype} can get (damping would not help). Raise tol to about "
                f"{reachable:.0e}{wider}.")


def _samples(indices: list) -> str:
    """``"0, 3, 5"``, the first eight of them, then ``" ..."``."""
    return ", ".join(map(str, indices[:8])) + (" ..." if len(indices) > 8 else "")


@dataclass
class Snapshot:
    """x as it was after ``iteration`` iterations (or outer steps), with the work spent so far."""
    iteration: int
    f_evals: int
    vjps: int
    seconds: float
    x: torch.Tensor

    @property
    def evaluations(self) -> int:
        return self.f_evals + self.vjps


@dataclass
class InputOptStats:
    """The record of one input optimization, JIIO or nested, per iteration (JIIO) or per outer
    step (nested).

    Attributes:
        method: ``"jiio/damped"``, ``"jiio/anderson"`` or ``"nested/<optimizer>"``.
        iterations: JIIO iterations, or nested outer steps.
        f_evals, vjps: evaluations of f and vector–Jacobian products through f, counted apart
            (a VJP costs about as much as an evaluation; ``evaluations`` is their sum).
        objective: ``(iterations, batch)`` ℓ(z, x) at each iterate (for nested, at the solved z*;
            for JIIO at the current z, which is only near z*(x): use ``objective_at`` on the
            ``snapshots`` to compare methods fairly).
        evaluations_at, seconds_at: ``(iterations,)`` work and wall time spent up to each iterate.
        primal, adjoint, stationarity: ``(iterations, batch)`` KKT residuals (JIIO only, else
            None): ‖f(z, x) − z‖/‖f(z, x)‖, ‖J_zᵀμ + ∇_zℓ − μ‖/‖J_zᵀμ + ∇_zℓ‖, and the norm of
            the gradient mapping ‖x − Π(x − α ∇_x L)‖ / α (= ‖∇_x L‖ without constraints).
        converged: ``(batch,)`` all three below tolerance (JIIO); None for nested.
        best_iteration: ``(batch,)`` the iterate returned, per sample.
        snapshots: x every ``record_every`` iterations (and the last), for ``objective_at``.
        wall_time: seconds.
    """

    method: str
    iterations: int
    f_evals: int
    vjps: int
    objective: torch.Tensor
    evaluations_at: torch.Tensor
    seconds_at: torch.Tensor
    best_iteration: torch.Tensor
    wall_time: float
    primal: Optional[torch.Tensor] = None
    adjoint: Optional[torch.Tensor] = None
    stationarity: Optional[torch.Tensor] = None
    converged: Optional[torch.Tensor] = None
    snapshots: list = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return self.f_evals + self.vjps

    def final(self, trace: torch.Tensor) -> torch.Tensor:
        """Per sample, the value of a ``(iterations, batch)`` trace at the returned iterate."""
        return trace.gather(0, self.best_iteration[None]).squeeze(0)

    def __repr__(self) -> str:
        done = "" if self.converged is None else \
            f", converged {int(self.converged.sum())}/{self.converged.numel()}"
        return (f"InputOptStats({self.method}: {self.iterations} iterations, {self.f_evals} f "
                f"evaluations + {self.vjps} VJPs{done}, mean objective "
                f"{self.final(self.objective).mean().item():.4g}, {self.wall_time:.2f} s)")


class DEQConvergenceWarning(RuntimeWarning):
    """A forward or adjoint solve stopped before every sample reached the tolerance."""


class DEQConvergenceError(RuntimeError):
    """Raised instead of the warning when ``on_fail="raise"``."""


class DEQNonFiniteWarning(RuntimeWarning):
    """A solve lost samples to NaN/inf (``SolverStats.nonfinite``). Its own class, not a
    ``DEQConvergenceWarning``: silencing slow solves must not silence this."""


class DEQNonFiniteError(DEQConvergenceError):
    """Raised instead of ``DEQNonFiniteWarning`` when ``on_fail="raise"``."""


def check_convergence(stats: SolverStats, which: str, on_fail: str, *, hint: str = "") -> None:
    """What to do after a solve, with ``on_fail`` as ``DEQ``'s.

    A solve that stopped before every sample converged: warn (``"warn"``, a
    ``DEQConvergenceWarning``), raise (``"raise"``, ``DEQConvergenceError``) or stay quiet
    (``"ignore"``); the message carries ``stats.report()``. A solve with ``tol = 0`` asked for
    exactly ``max_iter`` steps: not a failure.

    A solve that lost samples to NaN/inf is not "did not converge", and ``on_fail="ignore"`` does
    not silence it (nor does ``tol = 0``): it raises ``DEQNonFiniteError`` under ``"raise"`` and
    otherwise warns with ``DEQNonFiniteWarning``. Why: ``"ignore"`` is for solves that stop short
    of tol, whose z is still the best iterate and usable; a NaN/inf sample has no answer (its z
    is NaN or an older iterate), and the loss and the gradient that follow are NaN: saying
    nothing would hide where it started. Why a warning rather than an error: a float16 run with
    a gradient scaler recovers from an overflow by skipping the step, and the trainer stops by
    itself on a NaN loss. Under ``"ignore"`` the warning's text is fixed (no numbers), so Python's
    default filter shows it once per place in the code rather than at every training step;
    ``stats.num_nonfinite`` counts every occurrence (the trainer logs it). ``hint``: a sentence
    on the likely cause, added to the non-finite message (the IFT rule says when the incoming
    gradient itself is NaN/inf)."""
    hint = f" {hint}" if hint else ""
    if bool(stats.nonfinite.any()):
        if on_fail == "ignore":
            warnings.warn(f"DEQ {which} solve: f went NaN/inf for some samples; their state is NaN "
                          f"or an older iterate, and what follows from them is NaN. "
                          f"on_fail='ignore' silences solves that stop short of tol, not this. "
                          f"SolverStats.num_nonfinite counts them at every call; "
                          f"SolverStats.report() says what to try.{hint}",
                          DEQNonFiniteWarning, stacklevel=3)
            return
        message = f"DEQ {which} solve lost samples to NaN/inf.{hint}\n{stats.report()}"
        if on_fail == "raise":
            raise DEQNonFiniteError(message)
        warnings.warn(message, DEQNonFiniteWarning, stacklevel=3)
        return
    if stats.all_converged or on_fail == "ignore" or stats.tol == 0:
        return
    message = f"DEQ {which} solve did not converge.\n{stats.report()}"
    if on_fail == "raise":
        raise DEQConvergenceError(message)
    warnings.warn(message, DEQConvergenceWarning, stacklevel=3)
