"""An experiment, not a solver of deqlite: Broyden whose memory, when full, is *reduced* to its
``keep`` strongest directions instead of restarted from B = −I.

    .venv/bin/python benchmarks/broyden_rank_reduction.py                  # ~3 minutes
    .venv/bin/python benchmarks/broyden_rank_reduction.py --regimes symmetric

deqlite's ``broyden`` keeps B = −I + Σ_i u_i v_iᵀ as at most ``memory`` pairs and restarts when
they are used up. On slow near-orthogonal problems a restart throws away what B learned about
the slow directions, and a solve takes about twice the evaluations of Broyden keeping every pair
(``bench_solvers.py --sweeps``). The Broyden rank reduction (van de Rotten & Verduyn Lunel, 2003)
keeps a bounded memory without throwing everything away: write the correction as
C = Uᵀ V (U, V: (n, D), one row per pair), take QR factorizations Uᵀ = Q₁R₁, Vᵀ = Q₂R₂, so that
C = Q₁ (R₁R₂ᵀ) Q₂ᵀ, and the SVD of the small n × n core R₁R₂ᵀ = W Σ Xᵀ; then C's best rank-q
approximation is (Q₁ W Σ)[:, :q] (Q₂ X)[:, :q]ᵀ, q pairs that replace the n. Each reduction
costs two QR factorizations of D × n matrices per sample, every n − q steps.

This script compares restart and reduction (memory, keep) on the regimes of ``bench_solvers.py``
(``benchmarks/_solver_problems.py``), counting evaluations to rel. residual 1e-4. It reuses the
solver's private pieces (``_start``, ``_low_rank``, ``_write``, ``_finish``) so that the only
difference from ``deqlite.solvers.broyden`` is what happens when the memory is full.
"""
from __future__ import annotations

import argparse
import time

import torch

from _solver_problems import MLP_REGIMES, get_problem  # noqa: E402  (benchmarks/)
from deqlite.solvers import _finish, _low_rank, _start, _write

SETTINGS = [(30, 0), (30, 15), (30, 20), (20, 10), (50, 25), (50, 40)]   # (memory, keep); 0: restart


def reduce_rank(U: torch.Tensor, V: torch.Tensor, n: int, q: int):
    """The q pairs of the best rank-q approximation of Σ_{i<n} u_i v_iᵀ (per sample, computed in
    float64), in the first q rows of copies of U and V; the other rows zero."""
    Q1, R1 = torch.linalg.qr(U[:, :n].mT.double())                # (batch, D, n), (batch, n, n)
    Q2, R2 = torch.linalg.qr(V[:, :n].mT.double())
    W, S, Xt = torch.linalg.svd(R1 @ R2.mT)                       # the n × n core
    U, V = torch.zeros_like(U), torch.zeros_like(V)
    U[:, :q] = (Q1 @ (W[:, :, :q] * S[:, None, :q])).mT.to(U.dtype)
    V[:, :q] = (Q2 @ Xt.mT[:, :, :q]).mT.to(V.dtype)
    return U, V


def broyden_reduced(f, z0, *, tol=1e-4, max_iter=50, memory=30, keep=15):
    """``deqlite.solvers.broyden`` (stop="rel", no callback), except that a full memory is
    reduced to ``keep`` pairs (0: restarted, as deqlite does)."""
    z, apply, tr = _start("broyden", f, z0, tol, max_iter, "rel", None, 1)
    memory = min(memory, max_iter)
    U, V = (z.new_zeros(len(z), memory, z.shape[1]) for _ in range(2))
    n, g = 0, tr.evaluate(z) - z
    Bg = -g
    dot = lambda a, b: torch.linalg.vecdot(a, b)[:, None]        # noqa: E731
    while tr.running():
        z_new = z - Bg if tr.mask is None else torch.where(tr.mask, z, z - Bg)
        g_new = tr.evaluate(z_new) - z_new
        if n == memory:
            if keep:
                U, V = reduce_rank(U, V, n, keep)
                n, Bg = keep, _low_rank(g, U, V, keep)            # B changed: so did B g
            else:
                n, Bg = 0, -g
        dz, Bg_new = z_new - z, _low_rank(g_new, U, V, n)
        dzT_B = _low_rank(dz, V, U, n)
        inv = torch.nan_to_num(dot(dzT_B, g_new - g).reciprocal(), nan=0.0, posinf=0.0,
                               neginf=0.0)
        if tr.mask is not None:
            inv = inv.masked_fill(tr.mask, 0.0)
        u = dz - (Bg_new - Bg)
        Bg_new = torch.addcmul(Bg_new, u, dot(dzT_B, g_new) * inv)
        U, V = _write(U, (slice(None), n), u * inv), _write(V, (slice(None), n), dzT_B)
        n += 1
        z, g, Bg = z_new, g_new, Bg_new
    return _finish(tr, apply)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", choices=MLP_REGIMES,
                        default=["symmetric", "near_orthogonal_0.99_x0.01",
                                 "near_orthogonal_0.99_x0.1", "near_orthogonal_0.999_x0.01"])
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Evaluations to rel. residual {args.tol:g} (\"!\": not there by max_iter), tanh cell "
          f"width 256, batch 64, float32; keep 0 = restart (deqlite's broyden)\n")
    print("| regime | max_iter | " + " | ".join(
        f"memory {m}, {'restart' if k == 0 else f'keep {k}'}" for m, k in SETTINGS) + " |")
    print("| --- | --- |" + " --- |" * len(SETTINGS))
    start = time.perf_counter()
    with torch.no_grad():
        for regime in args.regimes:
            problem = get_problem(regime, 256, 64, 16)
            n = min(max(500, problem.max_iter_for(args.tol)), 3000)   # as bench_solvers.py
            cells = []
            for memory, keep in SETTINGS:
                stats = broyden_reduced(problem.f, problem.z0, tol=args.tol, max_iter=n,
                                        memory=memory, keep=keep)[1]
                cells.append(f"{stats.nfe}{'' if stats.all_converged else '!'}")
            print(f"| {regime} | {n} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(run time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
