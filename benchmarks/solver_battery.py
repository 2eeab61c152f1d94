"""Run a battery of solves whose every output is dumped, to show that a rewrite of the solvers'
bookkeeping (``deqlite._tracker``) returns exactly what the code before it returned:

    .venv/bin/python benchmarks/solver_battery.py dump after.pkl           # this checkout
    PYTHONPATH=/path/to/old/worktree .venv/bin/python benchmarks/solver_battery.py dump before.pkl
    .venv/bin/python benchmarks/solver_battery.py compare before.pkl after.pkl

The battery: three solvers × float32/float64 × with and without samples lost to NaN and to an
overflowing ‖f(z)‖ × stop abs / rel / tol 0 × chunks of 1, 3, 32 × check_every 1, 2, 5 × with and
without a callback (648 solves, ~10 s). ``compare`` requires bit-identical z, traces, flags,
NFE and callback arguments (NaN equal to NaN).
"""
from __future__ import annotations

import argparse
import pickle

import torch

import deqlite._tracker as tracker
from deqlite.solvers import SOLVERS, solve


def problem(dtype, extreme):
    """Eight samples: fast, slow, lost to NaN at the 7th call, oscillating, near-rotating; with
    ``extreme``, one whose ‖f(z)‖ overflows from the 4th call and one that goes inf at the 9th."""
    rates = torch.tensor([0.1, 0.5, 0.8, 0.9, 0.95, 0.6, 0.7, 0.3], dtype=dtype)[:, None]
    b = torch.linspace(0.5, 1.5, 8, dtype=dtype).repeat(8, 1)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = rates * torch.tanh(z) + b
        out[4] = -1.02 * z[4] + b[4]
        out[5] = torch.roll(z[5], 1) * 0.999 + 0.01
        if calls[0] >= 7:
            out[2] = float("nan")
        if extreme and calls[0] >= 4:
            out[6] = torch.finfo(dtype).max / 2
        if extreme and calls[0] >= 9:
            out[7] = float("inf")
        return out
    return f, torch.zeros(8, 8, dtype=dtype)


def dump(path):
    results, chunk0 = {}, tracker.MAX_CHUNK
    for name in SOLVERS:
        for dtype in (torch.float64, torch.float32):
            for extreme in (False, True):
                abs_tol = 1e-9 if dtype == torch.float64 else 1e-5
                for stop, tol in (("abs", abs_tol), ("rel", 1e-6), ("rel", 0.0)):
                    for chunk in (1, 3, 32):
                        for every in (1, 2, 5):
                            for with_callback in (False, True):
                                tracker.MAX_CHUNK = chunk
                                f, z0 = problem(dtype, extreme)
                                log = []
                                callback = (lambda k, a, r: log.append((k, a.clone(), r.clone()))) \
                                    if with_callback else None
                                z, s = solve(f, z0, solver=name, tol=tol, max_iter=40, stop=stop,
                                             check_every=every, callback=callback)
                                key = (name, str(dtype), extreme, stop, tol, chunk, every,
                                       with_callback)
                                results[key] = (z, s.nfe, s.abs_residuals, s.rel_residuals,
                                                s.converged, s.final_abs, s.final_rel,
                                                s.nonfinite, str(s.dtype), log)
    tracker.MAX_CHUNK = chunk0
    with open(path, "wb") as file:
        pickle.dump(results, file)
    print(f"{len(results)} solves written to {path}")


def same(x, y):
    if isinstance(x, torch.Tensor):
        return (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.isnan(), y.isnan())
                and torch.equal(x.nan_to_num(nan=0.0), y.nan_to_num(nan=0.0)))
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
    return x == y


def compare(path_a, path_b):
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        before, after = pickle.load(a), pickle.load(b)
    if before.keys() != after.keys():
        raise SystemExit("the two files hold different batteries")
    differ = [key for key in before if not same(before[key], after[key])]
    for key in differ[:5]:
        print("differs:", key)
    print(f"{len(before)} solves compared, {len(differ)} differ")
    raise SystemExit(1 if differ else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("path")
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    dump(args.path) if args.command == "dump" else compare(args.before, args.after)


if __name__ == "__main__":
    main()
