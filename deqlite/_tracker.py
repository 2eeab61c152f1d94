"""The bookkeeping every fixed-point solver shares (``deqlite.solvers``): count the evaluations of
f, record the residual of each, judge convergence per sample, keep each sample's best iterate.

Per evaluation k (z_k, f(z_k)) and sample b, with crit the residual the stopping rule uses:

    sample b freezes at the first k where crit ≤ tol (converged) or crit is NaN/inf (lost);
    its best iterate is the z_k of lowest crit among the evaluations up to its freeze;
    after it froze, its trace repeats the value it froze with.

How the work is kept small (on a cell of width 256 an evaluation of f is ~0.14 ms, the cost of
some thirty small tensor operations, so bookkeeping after every step would be most of a solve):

* Booking in chunks. The iterates are kept (references, no copies) and booked together every
  ``chunk`` evaluations: one stack of the residuals, one argmin per sample for the best
  iterate, one scan for each sample's first converged step.
  The rules above are applied retroactively, so the result is the same as booking after every
  evaluation (``tests/test_solver_bookkeeping.py``). The chunk shrinks for large states (its
  iterates stay under ``CHUNK_ELEMENTS`` numbers), down to 1, and is 1 when a callback wants
  every step.
* A cheap stopping test. The only per-step work is the two norms of the residual and, every
  ``check_every`` evaluations, "has every sample met tol once?" (a running mask of the samples
  that have not, and one ``any()``). That test is exact: the solve ends at the very evaluation
  it would end at if it were booked step by step. ``check_every`` > 1 skips the test's host sync
  (a stall on a GPU) at the price of up to ``check_every − 1`` extra evaluations at the end.
* Masks only when needed. Until a sample freezes, ``mask`` is None and the solvers skip their
  ``torch.where``s. A sample that converges mid-chunk keeps iterating until the chunk is booked;
  that changes nothing it returns (rows of a batch do not interact), only wastes a little work.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .stats import EPS, SolverStats, relative_residual

CHUNK_ELEMENTS = 2 ** 21      # a chunk's iterates: at most this many numbers (8 MB in float32)
MAX_CHUNK = 16                # (more made no difference; 64 iterates of 64 KB were slower)


class Tracker:
    """Per-sample bookkeeping of one solve; see the module docstring.

    ``evaluate(z)`` applies f to the flat iterate z (batch, D) and returns f(z) flat
    (``evaluate_g(z)``: and g = f(z) − z);
    ``running()`` says whether to go on; ``mask`` is None or the (batch, 1) bool of frozen samples;
    ``finish(dtype)`` returns ``(best_z, SolverStats)``. ``apply`` maps a flat iterate to f's
    image, flat (the solvers' ``_Map``, which checks what f returns)."""

    def __init__(self, name: str, apply: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
                 *, tol: float, max_iter: int, stop: str, callback: Optional[Callable],
                 check_every: int):
        self.name, self.apply, self.tol, self.max_iter = name, apply, tol, max_iter
        self.rel, self.callback, self.check_every = stop == "rel", callback, check_every
        batch, dim = z0.shape
        self.chunk = 1 if callback is not None else \
            max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(1, batch * dim)))
        self.acc = torch.promote_types(z0.dtype, torch.float32)   # a float16 norm overflows at 65504
        self.norm_dtype = None if self.acc == z0.dtype else self.acc   # (passing one costs time)
        self.grad = torch.is_grad_enabled()
        self.nfe, self.booked = 0, 0
        self.pending: list = []                       # iterates since the last booking
        self.g = None                          # f(z) − z of the last evaluation
        self.abs_res: list = []                # (batch,) ‖f(z) − z‖ per evaluation not booked
        self.size: list = []                   # (batch,) ‖f(z)‖ per evaluation not booked
        self.booked_abs: list = []             # (c, batch) the same, per booked chunk
        self.booked_size: list = []
        self.unmet = torch.ones(batch, dtype=torch.bool, device=z0.device)   # not met tol yet
        self.done, self.failed = torch.zeros_like(self.unmet), torch.zeros_like(self.unmet)
        self.frozen, self.mask, self.all_frozen = torch.zeros_like(self.unmet), None, False
        self.frozen_at = torch.full((batch,), max_iter, dtype=torch.long, device=z0.device)
        self.best_z = self.z0 = z0
        self.best_crit = torch.full((batch,), float("inf"), dtype=self.acc, device=z0.device)
        self.best_k = torch.full((batch,), -1, dtype=torch.long, device=z0.device)  # its evaluation
        self.start = time.perf_counter()

    def evaluate(self, z: torch.Tensor) -> torch.Tensor:
        fz = self.apply(z)
        self.nfe += 1
        self.pending.append(z)            # (under autograd: with its graph, for the best iterate)
        if self.grad:                     # backward="unrolled": no graph for the residuals
            with torch.no_grad():
                test = self._residual(z, fz)
        else:
            test = self._residual(z, fz)
        if len(self.pending) >= self.chunk or (test and not self.unmet.any()):
            self.book()                     # (outside no_grad: the best iterate keeps its graph)
        return fz

    def evaluate_g(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(z), g)`` with g = f(z) − z: the difference ``evaluate`` computed for its test,
        reused (one operation per step fewer), or computed again under autograd, whose graph
        that one does not have."""
        fz = self.evaluate(z)
        return fz, (fz - z if self.grad else self.g)

    def _residual(self, z: torch.Tensor, fz: torch.Tensor) -> bool:
        """Record ‖f(z) − z‖ and ‖f(z)‖; every ``check_every`` evaluations, ``unmet``."""
        self.g = fz - z                                  # (kept: ``evaluate_g`` hands it on)
        r_abs = torch.linalg.vector_norm(self.g, dim=1, dtype=self.norm_dtype)
        size = torch.linalg.vector_norm(fz, dim=1, dtype=self.norm_dtype)
        self.abs_res.append(r_abs)
        self.size.append(size)
        if self.tol == 0 or self.nfe % self.check_every:
            return False
        crit = r_abs / (size + EPS) if self.rel else r_abs      # (as ``book`` computes it)
        self.unmet &= crit > self.tol          # NaN is not > tol: it counts too (it freezes)
        return True

    def running(self) -> bool:
        """Another evaluation is due: the budget is not spent and some sample is not frozen."""
        return self.nfe < self.max_iter and not self.all_frozen

    def book(self) -> None:
        """Apply the per-sample rules of the module docstring to the pending evaluations."""
        if not self.pending:
            return
        k0, pending = self.booked, self.pending
        self.pending, self.booked = [], self.nfe
        with torch.no_grad():
            r_abs, size = torch.stack(self.abs_res), torch.stack(self.size)      # (c, batch)
            self.abs_res, self.size = [], []
            self.booked_abs.append(r_abs)
            self.booked_size.append(size)
            crit = r_abs / (size + EPS) if self.rel else r_abs
            plain = (crit > self.tol) & (crit < float("inf"))     # neither converged nor lost
            if self.mask is None and self.callback is None and bool(plain.all()):
                low, at = crit.min(0)           # the common case: nothing froze, every step counts
            else:
                low, at = self._freeze(k0, r_abs, size, crit, plain)
            better = low < self.best_crit
            self.best_crit = torch.where(better, low, self.best_crit)
            self.best_k = torch.where(better, k0 + at, self.best_k)
        # The new best iterates are mostly one step of the chunk, its last: take it as it is when
        # it is every sample's, else one where per step that has any (no stack of c states).
        steps = torch.where(better, at, -1).tolist()                          # (a host sync)
        if steps == [len(pending) - 1] * len(steps):
            self.best_z = pending[-1]
            return
        for k in sorted(set(steps) - {-1}):
            self.best_z = torch.where((better & (at == k))[:, None], pending[k], self.best_z)

    def _freeze(self, k0: int, r_abs: torch.Tensor, size: torch.Tensor, crit: torch.Tensor,
                plain: torch.Tensor):
        """Freeze the samples that converged or were lost in the chunk starting at evaluation k0;
        return, per sample, the lowest residual among the chunk's steps that count and its step.
        ``crit`` and ``plain`` (c, batch) are ``book``'s: a step is plain when its crit is finite
        and above tol; any other step is an event, which freezes the sample at its first one."""
        event = plain.logical_not()                               # converged or lost, per step
        converged = event & (crit <= self.tol)
        if self.rel:                        # ‖f(z)‖ overflowed: crit is 0 or NaN, the truth NaN
            converged &= torch.isinf(size).logical_not_()
        # a step counts while no event came before it: events before k = cumsum up to k − event k
        counts = event.cumsum(0).eq(event)
        hit = event.any(0)
        if self.mask is not None:                           # samples frozen earlier: no news
            live = self.frozen.logical_not()
            counts, hit = counts & live, hit & live
        done = (converged & counts).any(0)                  # its first event was convergence
        self.done |= done
        self.failed |= hit & ~done
        self.frozen = self.done | self.failed
        self.frozen_at = torch.where(hit, counts.sum(0) + (k0 - 1), self.frozen_at)  # its first
        self.unmet.masked_fill_(self.frozen, False)
        any_frozen = bool(self.frozen.any())
        self.mask = self.frozen[:, None] if any_frozen else None
        self.all_frozen = any_frozen and bool(self.frozen.all())
        if self.callback is not None:
            r_rel = relative_residual(r_abs, size)
            for k in range(len(crit)):
                self.callback(k0 + k + 1, r_abs[k], r_rel[k])
        valid = counts & (plain | converged)     # counted, and finite (the first event may not be)
        return torch.where(valid, crit, float("inf")).min(0)          # first lowest

    def finish(self, dtype: torch.dtype) -> tuple[torch.Tensor, SolverStats]:
        """The best iterate per sample (NaN where a sample had no finite one) and the record."""
        self.book()
        with torch.no_grad():
            r_abs, size = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)
                           for chunks in (self.booked_abs, self.booked_size))
            r_rel = relative_residual(r_abs, size)
            if self.mask is not None:                  # a frozen sample's trace repeats its
                steps = torch.arange(self.nfe, device=r_abs.device)[:, None]      # last value
                rows = torch.minimum(steps, self.frozen_at[None])
                r_abs, r_rel = r_abs.gather(0, rows), r_rel.gather(0, rows)
            never = self.best_k < 0                   # lost before any finite iterate: NaN, not z0
            best = self.best_k.clamp(min=0)[None]
            best_abs = r_abs.gather(0, best)[0].masked_fill(never, float("inf"))
            best_rel = r_rel.gather(0, best)[0].masked_fill(never, float("inf"))
        if self.best_z.is_cuda:
            torch.cuda.synchronize(self.best_z.device)
        best_z = self.best_z.masked_fill(never[:, None], float("nan")) if bool(never.any()) \
            else self.best_z.clone() if self.best_z is self.z0 else self.best_z   # not z0 itself
        return best_z, SolverStats(
            solver=self.name, nfe=self.nfe, abs_residuals=r_abs, rel_residuals=r_rel,
            converged=self.done, final_abs=best_abs, final_rel=best_rel, tol=self.tol,
            stop="rel" if self.rel else "abs", wall_time=time.perf_counter() - self.start,
            nonfinite=self.failed, dtype=dtype)

