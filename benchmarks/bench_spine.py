"""Benchmark of the DEQ spine: solver NFE and time, Broyden's cost per step, IFT gradient error.

    .venv/bin/python benchmarks/bench_spine.py            # full sizes (width 256, batch 64)
    .venv/bin/python benchmarks/bench_spine.py --quick    # small sizes, a few seconds

Everything is measured in one process; times are medians of --repeats runs after one untimed
run, and are also given as ratios to a baseline measured in the same run (forward iteration;
Broyden at max_iter 50).
"""
from __future__ import annotations

import argparse

import torch

from _problems import symmetric_tanh  # noqa: E402  (benchmarks/_problems.py)
from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from deqlite import DEQ, MLPCell
from deqlite.solvers import SOLVERS, solve


def bench_solvers(width, batch, repeats, tol=1e-4):
    f, z0 = symmetric_tanh(width, batch)
    print(f"\n## NFE and time to rel. residual {tol:g}: tanh cell, width {width}, batch {batch}, "
          f"symmetric W with spectrum [0, 0.97], inputs 0.01·N(0,1)\n")
    print("| solver | NFE | converged | median time (ms) | NFE ratio | time ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = None
    for name in SOLVERS:
        run = lambda: solve(f, z0, solver=name, tol=tol, max_iter=5000)  # noqa: E731
        t, (_, stats) = median_time(run, repeats), run()
        base = base or (stats.nfe, t)
        print(f"| {name} | {stats.nfe} | {int(stats.converged.sum())}/{batch} | {t * 1e3:.1f} | "
              f"{stats.nfe / base[0]:.2f} | {t / base[1]:.2f} |")


def bench_broyden_cost(width, batch, repeats):
    """tol=0 forces every solve to run exactly max_iter steps."""
    f, z0 = symmetric_tanh(width, batch, top=0.999)
    print(f"\n## Broyden: time per step at max_iter 50 vs 2000 (tol 0, width {width}, batch {batch}); "
          f"unlimited memory only up to 500 steps (it grows too slow)\n")
    print("| memory | max_iter | median time (ms) | time per step (ms) | per-step ratio to max_iter 50 |")
    print("| --- | --- | --- | --- | --- |")
    for memory, lengths in ((50, (50, 2000)), (2000, (50, 500))):
        base = None
        for max_iter in lengths:
            t = median_time(lambda: solve(f, z0, solver="broyden", tol=0.0, max_iter=max_iter,
                                          memory=memory), max(1, repeats // 2))
            per_step = t / max_iter
            base = base or per_step
            label = f"{memory}" + (" (unlimited: the growth the restart avoids)" if memory == 2000 else "")
            print(f"| {label} | {max_iter} | {t * 1e3:.1f} | {per_step * 1e3:.3f} | "
                  f"{per_step / base:.2f} |")


def bench_ift_error(width, batch, unrolled_iters=2000):
    torch.manual_seed(0)
    cell = MLPCell(8, width, weight_scale=0.9).double()
    x = torch.randn(batch, 8, dtype=torch.float64, requires_grad=True)
    inj = cell.inject(x)
    z = torch.zeros_like(inj)
    for _ in range(unrolled_iters):
        z = cell(z, inj)
    ref = torch.autograd.grad(z.pow(2).sum(), [x, cell.W.weight])
    print(f"\n## IFT gradient vs autograd through {unrolled_iters} unrolled iterations "
          f"(float64, width {width}, batch {batch}, ‖W‖₂ = 0.9, tol 1e-12)\n")
    print("| backward solver | adjoint NFE | rel. error dℓ/dx | rel. error dℓ/dW |")
    print("| --- | --- | --- | --- |")
    for name in SOLVERS:
        deq = DEQ(cell, solver="anderson", tol=1e-12, max_iter=500, backward_solver=name,
                  backward_max_iter=2000)
        got = torch.autograd.grad(deq(x).pow(2).sum(), [x, cell.W.weight])
        errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]
        print(f"| {name} | {deq.backward_stats.nfe} | {errs[0]:.1e} | {errs[1]:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, batch = (64, 16) if args.quick else (256, 64)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    bench_solvers(width, batch, args.repeats)
    bench_broyden_cost(width, batch, args.repeats)
    bench_ift_error(32 if args.quick else 64, 8)


if __name__ == "__main__":
    main()
