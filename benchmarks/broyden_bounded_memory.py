"""An experiment, not a solver of deqlite: two ways for Broyden to keep a bounded memory without
restarting from B = −I when it is full, against deqlite's restart.

    .venv/bin/python benchmarks/broyden_bounded_memory.py                  # ~40 s
    .venv/bin/python benchmarks/broyden_bounded_memory.py --regimes symmetric
    .venv/bin/python benchmarks/broyden_bounded_memory.py --timed 3         # and ms per solve

deqlite's ``broyden`` keeps B = −I + Σ_i u_i v_iᵀ as at most ``memory`` pairs and restarts when
they are used up. On slow near-orthogonal problems a restart throws away what B learned about
the slow directions, and a solve takes about twice the evaluations of Broyden keeping every pair
(``bench_solvers.py --sweeps``), or ten times as many. The two alternatives:

*Rank reduction* (van de Rotten & Verduyn Lunel, 2003): when the memory is full, replace the
correction C = Uᵀ V (U, V: (n, D), one row per pair) by its best rank-``keep`` approximation.
With QR factorizations Uᵀ = Q₁R₁, Vᵀ = Q₂R₂, C = Q₁ (R₁R₂ᵀ) Q₂ᵀ, and with the SVD of the small
n × n core R₁R₂ᵀ = W Σ Xᵀ, the best rank-q part is (Q₁ W Σ)[:, :q] (Q₂ X)[:, :q]ᵀ: q pairs that
replace the n. Each reduction costs two QR factorizations of D × n matrices per sample.

*A sliding window* (limited-memory Broyden): keep the last ``memory`` steps s_i = Δz and
y_i = Δg, and use the B that Broyden's updates would build from B₀ = −I over exactly those pairs,
so that dropping the oldest pair is exact instead of leaving the other pairs inconsistent (the
fault of dropping one pair (u, v) of the product form, which the DEQ research code does). That B
has a compact form (Byrd, Nocedal & Schnabel 1994, for the "good" update; checked against the
recursion in ``tests/test_broyden_bounded_memory.py``):

    B = −I + (S + Y)ᵀ M⁻¹ S,   M = S Yᵀ + L,   L = the part of S Sᵀ below the diagonal,

with the rows of S and Y in the order the steps were taken (L couples each step to the ones
before it). A step costs a few products with the window and one memory × memory solve.

This script compares the three on the regimes of ``bench_solvers.py``
(``benchmarks/_solver_problems.py``), counting evaluations to rel. residual 1e-4. It reuses the
solver's private pieces (``_start``, ``_low_rank``, ``_write``, ``_finish``) so that the only
difference from ``deqlite.solvers.broyden`` is how the memory is bounded.
"""
from __future__ import annotations

import argparse
import time

import torch

from _solver_problems import MLP_REGIMES, get_problem  # noqa: E402  (benchmarks/)
from deqlite.solvers import _finish, _low_rank, _start, _write, broyden

# (strategy, memory, keep): what happens when `memory` pairs are used up
SETTINGS = [("restart", 30, 0), ("reduce", 30, 15), ("reduce", 30, 20), ("reduce", 20, 10),
            ("reduce", 50, 25), ("reduce", 50, 40), ("window", 15, 0), ("window", 30, 0),
            ("window", 50, 0)]


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
    n, g = 0, tr.evaluate_g(z)[1]
    Bg = -g
    dot = lambda a, b: torch.linalg.vecdot(a, b)[:, None]        # noqa: E731
    while tr.running():
        z_new = z - Bg if tr.mask is None else torch.where(tr.mask, z, z - Bg)
        g_new = tr.evaluate_g(z_new)[1]
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


def broyden_window(f, z0, *, tol=1e-4, max_iter=50, memory=30):
    """Broyden (stop="rel", no callback) whose B is built from B₀ = −I by the updates of the last
    ``memory`` steps only, in the compact form of the module docstring. The window is a ring of
    slots; ``step_of[i]`` is the step slot i holds (−1: empty), which orders the rows for L."""
    z, apply, tr = _start("broyden", f, z0, tol, max_iter, "rel", None, 1)
    batch, dim = z.shape
    memory = min(memory, max_iter)
    S, Y, P = (z.new_zeros(batch, memory, dim) for _ in range(3))   # rows: s_i, y_i, s_i + y_i
    SY, SS = (torch.zeros(batch, memory, memory, dtype=torch.float64) for _ in range(2))
    eye = torch.eye(memory, dtype=torch.float64)
    step_of = torch.full((memory,), -1)
    g = tr.evaluate_g(z)[1]
    d, k = g, 0                                                       # −B₀ g = g
    while tr.running():
        z_new = z + d if tr.mask is None else torch.where(tr.mask, z, z + d)
        g_new = tr.evaluate_g(z_new)[1]
        slot = k % memory                                             # the oldest slot
        s, y = z_new - z, g_new - g
        S, Y, P = (_write(W, (slice(None), slot), v) for W, v in ((S, s), (Y, y), (P, s + y)))
        step_of[slot], k = k, k + 1
        SY[:, slot] = torch.bmm(S[:, slot, None], Y.mT)[:, 0].double()    # s_new · y_j
        SY[:, :, slot] = torch.bmm(Y[:, slot, None], S.mT)[:, 0].double()  # s_i · y_new
        SS[:, slot] = SS[:, :, slot] = torch.bmm(S[:, slot, None], S.mT)[:, 0].double()
        filled = step_of >= 0
        below = (step_of[:, None] > step_of[None, :]) & filled[None, :]   # L: s_i · s_j, j before i
        M = torch.where(filled[:, None] & filled[None, :], SY + SS * below, eye)
        if tr.mask is not None:                   # frozen samples: no step, any regular M will do
            M = torch.where(tr.mask[..., None], eye, M)
        Sg = torch.bmm(g_new[:, None], S.mT).mT.double()                  # S g, (batch, memory, 1)
        coeff, info = torch.linalg.solve_ex(M, Sg, check_errors=False)
        lost = (info != 0) | ~torch.isfinite(coeff).all(1)[:, 0]          # singular M: step −B₀ g
        coeff = coeff.masked_fill(lost[:, None, None], 0.0).to(z.dtype).mT
        d = g_new - torch.bmm(coeff, P)[:, 0]                             # −B g
        z, g = z_new, g_new
    return _finish(tr, apply)


def run(strategy: str, f, z0, *, tol: float, max_iter: int, memory: int, keep: int):
    if strategy == "window":
        return broyden_window(f, z0, tol=tol, max_iter=max_iter, memory=memory)
    return broyden_reduced(f, z0, tol=tol, max_iter=max_iter, memory=memory, keep=keep)


def label(strategy: str, memory: int, keep: int) -> str:
    return {"restart": f"memory {memory}, restart (deqlite)", "reduce": f"{memory}, keep {keep}",
            "window": f"window {memory}"}[strategy]


def cell(solve, rounds: int) -> str:
    """"NFE" of one solve, or with ``rounds`` > 0 "NFE (median ms of that many solves)"."""
    times = []
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        stats = solve()[1]
        times.append(time.perf_counter() - start)
    text = f"{stats.nfe}{'' if stats.all_converged else '!'}"
    return f"{text} ({1e3 * sorted(times)[len(times) // 2]:.0f} ms)" if rounds else text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", choices=MLP_REGIMES,
                        default=["symmetric", "near_orthogonal_0.99_x0.01",
                                 "near_orthogonal_0.99_x0.1", "near_orthogonal_0.999_x0.01"])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--timed", type=int, default=0, metavar="ROUNDS",
                        help="also the median wall time of ROUNDS solves per cell (1 thread)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"Evaluations to rel. residual {args.tol:g} (\"!\": not there by max_iter), tanh cell "
          f"width 256, batch 64, float32; keep q: reduced to q pairs; window m: the last m steps\n")
    print("| regime | max_iter | " + " | ".join(label(*setting) for setting in SETTINGS)
          + " | every pair (deqlite, memory = max_iter) |")
    print("| --- | --- |" + " --- |" * (len(SETTINGS) + 1))
    start = time.perf_counter()
    with torch.no_grad():
        for regime in args.regimes:
            problem = get_problem(regime, 256, 64, 16)
            n = min(max(500, problem.max_iter_for(args.tol)), 3000)   # as bench_solvers.py
            solves = [lambda s=setting: run(s[0], problem.f, problem.z0, tol=args.tol,
                                            max_iter=n, memory=s[1], keep=s[2])
                      for setting in SETTINGS]
            solves.append(lambda: broyden(problem.f, problem.z0, tol=args.tol, max_iter=n,
                                          memory=n))
            cells = [cell(solve, args.timed) for solve in solves]
            print(f"| {regime} | {n} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(run time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
