"""`SolverStats`: what a fixed-point solve did, per sample, in a form every solver shares.

For a map f and an iterate z the residuals are, per sample,

    abs residual  r_abs = ‖f(z) − z‖
    rel residual  r_rel = ‖f(z) − z‖ / (‖f(z)‖ + eps)

Every solver evaluates f once per iteration, so row k of `abs_residuals` / `rel_residuals`
is the residual of the k-th function evaluation: every trace has exactly `nfe` rows, and the
traces of different solvers can be drawn on the same "function evaluations" axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-9  # keeps the relative residual finite when f(z) = 0


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
