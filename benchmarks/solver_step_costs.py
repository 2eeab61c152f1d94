"""What one step of deqlite's Anderson and Broyden costs, operation by operation, and what the
alternatives to each operation cost: the figures behind "what is left" in the overhead section
of ``benchmarks/README.md``.

    .venv/bin/python benchmarks/solver_step_costs.py        # ~1 minute, 1 thread

Shapes of the overhead table's width-256 cell: batch 64, state 256, Anderson's m = 6, Broyden
with 15 pairs in use (the average at memory 30). Each figure is the median over 7 rounds of the
mean over 1000 calls, in µs. The pieces are timed one by one, out of the solver, so their sum
leaves out the Python between them.
"""
from __future__ import annotations

import time

import torch

from deqlite.solvers import AndersonMixer, _low_rank

B, D, M, PAIRS = 64, 256, 6, 15


def microseconds(fn, calls: int = 1000, rounds: int = 7) -> float:
    for _ in range(30):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[rounds // 2]


def main():
    torch.set_num_threads(1)
    x, fx = torch.randn(B, D), torch.randn(B, D)
    mixer = AndersonMixer(B, D, m=M, beta=1.0, lam=1e-4, like=x)
    g, G, F = fx - x, torch.randn(B, M, D), torch.randn(B, M, D)
    H = torch.randn(B, M, M, dtype=torch.float64)
    H = H @ H.mT + torch.eye(M, dtype=torch.float64)
    ones = torch.ones(B, M, 1, dtype=torch.float64)
    y = torch.linalg.solve_ex(H, ones)[0]
    alpha = (y / y.sum(1, keepdim=True)).float().mT
    LU, pivots, _ = torch.linalg.lu_factor_ex(H)
    U, V = torch.randn(B, 30, D), torch.randn(B, 30, D)
    rows = {
        "Anderson: one whole step (AndersonMixer.step)": lambda: mixer.step(x, fx),
        "  residual f − x": lambda: fx - x,
        "  write f into the history": lambda: mixer.F.__setitem__((slice(None), 2), fx),
        "  Gram row: bmm(g, Gᵀ)": lambda: torch.bmm(g[:, None], G.mT),
        "    instead: vecdot": lambda: torch.linalg.vecdot(g[:, None], G),
        "    instead: einsum (Gram row)": lambda: torch.einsum("bd,bmd->bm", g, G),
        "    instead: (G * g).sum": lambda: (G * g[:, None]).sum(-1),
        "  regularizer H + λ s I": lambda: torch.addcmul(
            H, (H.diagonal(dim1=1, dim2=2).sum(-1) * 1e-4)[:, None, None], mixer.eye),
        "  6 × 6 solve: solve_ex (float64)": lambda: torch.linalg.solve_ex(H, ones,
                                                                           check_errors=False),
        "    instead: float32": lambda: torch.linalg.solve_ex(H.float(), ones.float(),
                                                            check_errors=False),
        "    instead: Cholesky + cholesky_solve": lambda: torch.cholesky_solve(
            ones, torch.linalg.cholesky_ex(H)[0]),
        "    instead: lu_solve on LU factors (factoring not counted)":
            lambda: torch.linalg.lu_solve(LU, pivots, ones),
        "    one 6 × 6 system alone (no batch)": lambda: torch.linalg.solve_ex(H[0], ones[0],
                                                                             check_errors=False),
        "  normalize α and cast": lambda: (y / y.sum(1, keepdim=True)).float().mT,
        "  mix: bmm(α, F)": lambda: torch.bmm(alpha, F),
        "    instead: (αᵀ * F).sum": lambda: (alpha.mT * F).sum(1),
        "    instead: einsum (mix)": lambda: torch.einsum("bm,bmd->bd", alpha[:, 0], F),
        f"Broyden: B g over {PAIRS} pairs (_low_rank, twice per step)":
            lambda: _low_rank(g, U, V, PAIRS),
        "    instead: elementwise products and sums": lambda: (
            (V[:, :PAIRS] * g[:, None]).sum(-1)[..., None] * U[:, :PAIRS]).sum(1) - g,
        "    instead: matmul": lambda: torch.matmul(
            torch.matmul(V[:, :PAIRS], g[:, :, None]).mT, U[:, :PAIRS])[:, 0] - g,
        "norm of a (64, 256) residual per sample": lambda: torch.linalg.vector_norm(g, dim=1),
    }
    print(f"torch {torch.__version__}, 1 thread; batch {B}, state {D}, m {M}\n")
    print("| operation | µs |\n| --- | --- |")
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"| {name} | {microseconds(fn):.1f} |", flush=True)


if __name__ == "__main__":
    main()
