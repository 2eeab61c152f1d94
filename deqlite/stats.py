"""Records: `SolverStats`, what a fixed-point solve did, per sample, in a form every solver
shares; `InputOptStats`, what an input optimization did (``deqlite.jiio``); and what to do when a
solve did not converge (``check_convergence``).

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
    """Per sample ``(‖f(z) − z‖, ‖f(z) − z‖ / (‖f(z)‖ + eps))`` for states of shape (batch, ...)."""
    r_abs = (fz - z).flatten(1).norm(dim=1)
    return r_abs, r_abs / (fz.flatten(1).norm(dim=1) + EPS)


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

    @classmethod
    def from_traces(cls, solver: str, abs_res: list, rel_res: list, start: float) -> "SolverStats":
        """The record of a fixed number of steps (``tol = 0``: nothing was asked to converge),
        from one ``(batch,)`` residual per step and the ``time.perf_counter()`` of the start."""
        abs_res, rel_res = torch.stack(abs_res), torch.stack(rel_res)
        return cls(solver=solver, nfe=len(abs_res), abs_residuals=abs_res, rel_residuals=rel_res,
                   converged=torch.zeros_like(abs_res[-1], dtype=torch.bool),
                   final_abs=abs_res[-1], final_rel=rel_res[-1], tol=0.0, stop="abs",
                   wall_time=time.perf_counter() - start)

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
        return (f"SolverStats({self.solver}: nfe={self.nfe}, converged {int(self.converged.sum())}/{n}, "
                f"worst {self.stop} residual {worst:.2e} (tol {self.tol:g}), "
                f"{self.wall_time * 1e3:.1f} ms)")

    def report(self) -> str:
        """A few lines for a human: what happened and, if it failed, what to try."""
        lines = [repr(self)]
        if self.all_converged:
            return lines[0]
        bad = (~self.converged).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        lines.append(f"  not converged: sample(s) {shown}")
        trace = self.residuals[:, bad[0]].tolist()
        picks = sorted({0, len(trace) // 4, len(trace) // 2, 3 * len(trace) // 4, len(trace) - 1})
        lines.append(f"  {self.stop} residual trace of sample {bad[0]}: "
                     + ", ".join(f"[{i}] {trace[i]:.2e}" for i in picks))
        if bool(self.diverged.any()):
            lines.append("  the iteration is not contracting: try damping (forward_iteration's "
                         "`damping` < 1, anderson's `beta` < 1), a smaller weight scale, "
                         "another solver, or Jacobian regularization.")
        else:
            lines.append("  still improving when stopped: raise `max_iter`, loosen `tol`, "
                         "or use a faster solver (anderson, broyden).")
        return "\n".join(lines)


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


def check_convergence(stats: SolverStats, which: str, on_fail: str) -> None:
    """Warn (``on_fail="warn"``), raise (``"raise"``) or stay quiet (``"ignore"``) when a solve
    stopped before every sample converged; the message carries ``stats.report()``. A solve with
    ``tol = 0`` asked for exactly ``max_iter`` steps: not a failure."""
    if stats.all_converged or on_fail == "ignore" or stats.tol == 0:
        return
    message = f"DEQ {which} solve did not converge.\n{stats.report()}"
    if on_fail == "raise":
        raise DEQConvergenceError(message)
    warnings.warn(message, DEQConvergenceWarning, stacklevel=3)
