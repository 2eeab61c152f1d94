"""``bench_solvers.py --sweeps``: the measurements behind two of deqlite's solver defaults.

1. Broyden's ``memory`` (default 30): evaluations to the tolerance for memories 10 to 100, and
   with every pair kept (memory = max_iter), in each regime. Fewer pairs cost less per step
   (each application of B is a pass over the pairs in use) and restart sooner.
2. ``check_every`` (default 1): time and evaluations of forward iteration, Anderson and
   Broyden with the convergence test every 1, 2, 4 or 8 evaluations. On a CPU a test costs a
   few small operations and a sync that waits for nothing; each evaluation past the end costs
   a whole f. (On a GPU the sync stalls the queue of kernels: ``gpu_check.py`` times it there.)
3. Anderson's history ``m`` and regularizer ``lam``: evaluations to the tolerance for m = 6, 50
   and the longest useful history, min(D, max_iter) (D residuals in R^D span it: an older one
   adds nothing), at λ = 1e-4 and 1e-6, on the slow regimes; and TorchDEQ's Anderson with the
   long history once, on the hardest (it takes minutes there).
"""
from __future__ import annotations

import torch

from _solver_problems import (Counter, get_problem, reached,  # benchmarks/_solver_problems.py
                             worst_rel_residual)
from _timing import interleaved_medians  # noqa: E402  (benchmarks/_timing.py)
from deqlite import solve

try:
    from torchdeq.solver import get_solver as torchdeq_solver
except ImportError:                                   # the benchmark-only extra is not installed
    torchdeq_solver = None

MEMORIES = (10, 20, 30, 50, 100)
PERIODS = (1, 2, 4, 8)
CHECK_REGIMES = ("gaussian", "symmetric", "conv")
HISTORIES, LAMBDAS = (6, 50, "long"), (1e-4, 1e-6)
HISTORY_REGIMES = ("symmetric", "near_orthogonal_0.99_x0.01", "near_orthogonal_0.999_x0.1")


def memory_sweep(regimes, width, batch, cell_batch, tol, max_iter):
    print(f"\n## Broyden's memory: evaluations to rel. residual {tol:g} (\"!\": not there by "
          f"max_iter)\n")
    print("| regime | max_iter | " + " | ".join(f"memory {m}" for m in MEMORIES)
          + " | every pair |")
    print("| --- | --- |" + " --- |" * (len(MEMORIES) + 1))
    with torch.no_grad():
        for regime in regimes:
            problem = get_problem(regime, width, batch, cell_batch)
            n = _budget(problem, tol, max_iter)[0]
            cells = []
            for memory in (*MEMORIES, n):
                stats = solve(problem.f, problem.z0, solver="broyden", tol=tol, max_iter=n,
                              memory=memory)[1]
                cells.append(f"{stats.nfe}{'' if stats.all_converged else '!'}")
            print(f"| {regime} | {n} | " + " | ".join(cells) + " |")


def check_every_sweep(width, batch, cell_batch, tol, max_iter, repeats):
    print(f"\n## check_every: median time (ms) and evaluations to rel. residual {tol:g}\n")
    print("| regime | solver | " + " | ".join(f"every {k}" for k in PERIODS) + " |")
    print("| --- | --- |" + " --- |" * len(PERIODS))
    with torch.no_grad():
        for regime in CHECK_REGIMES:
            problem = get_problem(regime, width, batch, cell_batch)
            n = max(max_iter, problem.max_iter_for(tol))
            for solver in ("forward_iteration", "anderson", "broyden"):
                runs = {k: (lambda k=k: solve(problem.f, problem.z0, solver=solver, tol=tol,
                                              max_iter=n, check_every=k)[1]) for k in PERIODS}
                nfe = {k: run().nfe for k, run in runs.items()}
                times = interleaved_medians(runs, repeats)
                print(f"| {regime} | {solver} | " + " | ".join(
                    f"{times[k] * 1e3:.1f} ({nfe[k]})" for k in PERIODS) + " |")


def _budget(problem, tol, max_iter):
    """A sweep's max_iter (enough for plain iteration, at most 3000) and its longest useful
    Anderson history, min(D, max_iter)."""
    n = min(max(max_iter, problem.max_iter_for(tol)), 3000)
    return n, min(problem.z0[0].numel(), n)


def _anderson_nfe(f, z0, tol, n, m, lam, theirs=False):
    """Evaluations of one Anderson solve, with "!" when the worst sample's relative residual,
    recomputed, did not reach tol."""
    counted = Counter(f)
    if theirs:
        z = torchdeq_solver("anderson")(counted, z0, max_iter=n, tol=tol, stop_mode="rel",
                                        m=m, lam=lam)[0]
    else:
        z = solve(counted, z0, solver="anderson", tol=tol, max_iter=n, m=m, lam=lam)[0]
    return f"{counted.calls}{'' if reached(worst_rel_residual(f, z), tol) else '!'}"


def history_sweep(width, batch, cell_batch, tol, max_iter, regimes=HISTORY_REGIMES):
    print(f"\n## Anderson's history m and λ: evaluations to rel. residual {tol:g} (\"!\": not "
          f"there by max_iter; long: m = min(D, max_iter))\n")
    columns = [(m, lam) for m in HISTORIES for lam in LAMBDAS]
    print("| regime | max_iter | " + " | ".join(f"m {m}, λ {lam:g}" for m, lam in columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    with torch.no_grad():
        for regime in regimes:
            problem = get_problem(regime, width, batch, cell_batch)
            n, long = _budget(problem, tol, max_iter)
            cells = [_anderson_nfe(problem.f, problem.z0, tol, n, long if m == "long" else m, lam)
                     for m, lam in columns]
            print(f"| {regime} | {n} | " + " | ".join(cells) + " |")
        if torchdeq_solver is not None:
            problem = get_problem(regimes[1], width, batch, cell_batch)
            n, long = _budget(problem, tol, max_iter)
            cells = [_anderson_nfe(problem.f, problem.z0, tol, n, long, lam, theirs=True)
                     for lam in LAMBDAS]
            print(f"\nTorchDEQ's Anderson on {regimes[1]}, m = {long}: "
                  + ", ".join(f"λ {lam:g}: {c}" for lam, c in zip(LAMBDAS, cells))
                  + " evaluations (its λ is absolute, not scaled to the residuals)")
