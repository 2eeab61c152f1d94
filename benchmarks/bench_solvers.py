"""deqlite against TorchDEQ 0.1.0: solver NFE and time to a tolerance, gradient rules' error and cost.

    .venv/bin/python benchmarks/bench_solvers.py                 # width 256, batch 64: ~20 s
    .venv/bin/python benchmarks/bench_solvers.py --quick         # width 64, batch 16: ~5 s
    .venv/bin/pip install -e ".[bench]"                          # TorchDEQ: torchdeq==0.1.0

One cell, f(z, x) = tanh(W z + U x + b) (``deqlite.MLPCell``, U = I, b = 0), width 256, batch 64,
in three regimes:

  (a) gaussian:   W Gaussian, rescaled to spectral norm 0.9; inputs x ~ N(0, 1)
  (b) orthogonal: W = 0.95 × a random orthogonal matrix; inputs x ~ N(0, 1)
  (c) symmetric:  W symmetric with spectrum linspace(0, 0.97); inputs 0.01 · N(0, 1) (tanh stays
                  linear, so ρ(J) ≈ 0.97: the slow case)

Both libraries get the very same f (one Python function around the same module), the same
tolerance and stopping rule (relative residual ‖f(z) − z‖ / ‖f(z)‖ ≤ tol for every sample of the
batch; both stop when the whole batch is there), the same max_iter, and Anderson the same memory
(m = 6, TorchDEQ's default; λ = 1e-4 in both, deqlite scales it to the residuals). Every f call
is counted by a wrapper around f (so NFE means the same in both), and every vector–Jacobian
product of an adjoint solve by a wrapper around ``torch.autograd.grad``.

1. Forward solves (no graph): NFE, median wall time, the worst relative residual of what each
   solver returned (recomputed here), and time ratios against TorchDEQ's same solver.
2. Gradient rules (Anderson forward solve, one training step: forward + backward of
   ℓ = ⟨c, z⟩ + ½‖z‖²): f calls, adjoint VJPs, median time, and the relative error of ∂ℓ/∂θ
   (W, U, b) and ∂ℓ/∂x against autograd through a long unrolled iteration in float64 (enough
   steps for ‖W‖₂ⁿ < 1e-13). deqlite: ift, jfb, phantom (k 5, τ 0.5), neumann (k 5), unrolled;
   TorchDEQ: ift (``ift=True``, its ``torch.autograd.Function`` version), 1-step gradient
   (``grad=1``: JFB), phantom (``grad=5, tau=0.5``). Ratios against deqlite's IFT.

Runs without TorchDEQ too (its rows are then skipped, with a note). Times are medians of
--repeats runs after one untimed run, on --threads CPU threads (default 1: on a machine shared
with other jobs a multi-threaded op waits for a descheduled thread at every barrier).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import warnings

import torch

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from deqlite import DEQ, MLPCell, solve

try:
    from torchdeq import get_deq
    from torchdeq.solver import get_solver as torchdeq_solver
    TORCHDEQ = importlib.metadata.version("torchdeq")
except ImportError:                                   # the benchmark-only extra is not installed
    TORCHDEQ = None

SOLVER_PAIRS = [("forward_iteration", {}, "fixed_point_iter", {}),
                ("anderson", {"m": 6}, "anderson", {"m": 6}),
                ("broyden", {}, "broyden", {})]
DEQLITE_RULES = [("ift", None), ("jfb", None), ("phantom", {"k": 5, "tau": 0.5}),
                 ("neumann", {"k": 5}), ("unrolled", None)]
TORCHDEQ_RULES = [("ift", dict(ift=True)), ("jfb", dict(grad=1, tau=1.0)),
                  ("phantom", dict(grad=5, tau=0.5))]


def make_problem(regime: str, width: int, batch: int, dtype=torch.float32, seed: int = 0):
    """``(cell, x, c)`` for the regime: the tanh cell, its input and the loss' direction c."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if regime == "gaussian":
        W = randn(width, width)
        W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
        x = randn(batch, width)
    elif regime == "orthogonal":
        W = 0.95 * torch.linalg.qr(randn(width, width))[0]
        x = randn(batch, width)
    elif regime == "symmetric":
        Q = torch.linalg.qr(randn(width, width))[0]
        W = (Q * torch.linspace(0, 0.97, width, dtype=torch.float64)) @ Q.T
        x = 0.01 * randn(batch, width)
    else:
        raise ValueError(f"unknown regime {regime!r}")
    cell = MLPCell(width, width).to(dtype)
    with torch.no_grad():
        cell.W.weight.copy_(W)
        cell.U.weight.copy_(torch.eye(width))
        cell.U.bias.zero_()
    return cell, x.to(dtype), randn(batch, width).to(dtype)


class Counter:
    """f wrapped so that every call on the batch is counted."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@contextlib.contextmanager
def counting_vjps():
    """Count ``torch.autograd.grad`` calls (the adjoint solves' vector–Jacobian products)."""
    count, original = [0], torch.autograd.grad

    def grad(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)
    torch.autograd.grad = grad
    try:
        yield count
    finally:
        torch.autograd.grad = original


def worst_rel_residual(f, z) -> float:
    with torch.no_grad():
        fz = f(z)
        return ((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)).max().item()


# ----------------------------------------------------------------------------- forward solves

def forward_rows(regime, width, batch, tol, max_iter, repeats):
    cell, x, _ = make_problem(regime, width, batch)
    with torch.no_grad():
        inj = cell.inject(x)
    f = lambda z: cell(z, inj)                                            # noqa: E731
    z0 = torch.zeros(batch, width)
    rows = []
    for ours, our_opts, theirs, their_opts in SOLVER_PAIRS:
        def run_ours(f, name=ours, opts=our_opts):
            return solve(f, z0, solver=name, tol=tol, max_iter=max_iter, stop="rel", **opts)[0]
        rows.append(measure("deqlite", ours, run_ours, f, repeats))
        if TORCHDEQ is None:
            continue

        def run_theirs(f, solver=torchdeq_solver(theirs), opts=their_opts):
            return solver(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel", **opts)[0]
        rows.append(measure("TorchDEQ", theirs, run_theirs, f, repeats))
    return rows


def measure(library, solver, run, f, repeats):
    """NFE (counted), the returned z's worst residual, and the median time of ``run(f)``."""
    counter = Counter(f)
    with torch.no_grad():
        z = run(counter)
        t = median_time(lambda: run(f), repeats)
    return dict(library=library, solver=solver, nfe=counter.calls, residual=worst_rel_residual(f, z),
                t=t)


def print_forward(regime, rows, tol):
    print(f"\n### ({regime}) forward solve to rel. residual {tol:g}\n")
    print("| library | solver | NFE | worst rel. residual | reached tol | median (ms) | time vs "
          "TorchDEQ's same solver | NFE vs TorchDEQ's best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    theirs = {r["solver"]: r for r in rows if r["library"] == "TorchDEQ"}
    pair = {ours: theirs_name for ours, _, theirs_name, _ in SOLVER_PAIRS}
    their_best = min((r["nfe"] for r in theirs.values() if r["residual"] <= tol * (1 + 1e-3)),
                     default=None)                      # TorchDEQ's fewest NFE among its solves that got there
    for r in rows:
        ref = theirs.get(pair.get(r["solver"], r["solver"])) if r["library"] == "deqlite" else r
        vs = f"{r['t'] / ref['t']:.2f}" if ref else "-"
        best = f"{r['nfe'] / their_best:.2f}" if their_best else "-"
        reached = "yes" if r["residual"] <= tol * (1 + 1e-3) else "NO"
        print(f"| {r['library']} | {r['solver']} | {r['nfe']} | {r['residual']:.1e} | {reached} | "
              f"{r['t'] * 1e3:.1f} | {vs} | {best} |")


# ----------------------------------------------------------------------------- gradients

def loss_fn(z, c):
    return (c * z).sum() + 0.5 * (z ** 2).sum()


def reference_grads(regime, width, batch, seed=0):
    """∂ℓ/∂θ and ∂ℓ/∂x by autograd through n explicit steps z ← f(z, x) in float64."""
    cell, x, c = make_problem(regime, width, batch, dtype=torch.float64, seed=seed)
    x.requires_grad_()
    n = math.ceil(math.log(1e-13) / math.log(torch.linalg.matrix_norm(cell.W.weight, ord=2).item()))
    inj = cell.inject(x)
    z = torch.zeros_like(inj)
    for _ in range(n):
        z = cell(z, inj)
    grads = torch.autograd.grad(loss_fn(z, c), [*cell.parameters(), x])
    return torch.cat([g.flatten() for g in grads[:-1]]), grads[-1], n


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def gradient_rows(regime, width, batch, tol, max_iter, repeats):
    ref_theta, ref_x, n_unrolled = reference_grads(regime, width, batch)
    cell, x, c = make_problem(regime, width, batch)
    x.requires_grad_()
    rows = []
    for rule, options in DEQLITE_RULES:
        deq = DEQ(cell, solver="anderson", solver_options={"m": 6}, tol=tol, max_iter=max_iter,
                  backward=rule, backward_options=options, backward_tol=tol, on_fail="ignore")
        rows.append(step_row("deqlite", rule, options, lambda deq=deq: deq(x), cell, x, c,
                             repeats, ref_theta, ref_x))
    if TORCHDEQ is not None:
        for rule, options in TORCHDEQ_RULES:
            deq = get_deq(core="sliced", f_solver="anderson", f_max_iter=max_iter, f_tol=tol,
                          f_stop_mode="rel", b_solver="anderson", b_max_iter=max_iter, b_tol=tol,
                          b_stop_mode="rel", **options)
            deq.train()

            def forward(deq=deq):
                inj = cell.inject(x)
                return deq(lambda z: cell(z, inj), torch.zeros_like(inj),
                           solver_kwargs={"m": 6})[0][-1]
            label = {k: v for k, v in options.items() if k != "ift"}
            rows.append(step_row("TorchDEQ", rule, label or None, forward, cell, x, c, repeats,
                                 ref_theta, ref_x))
    return rows, n_unrolled


def step_row(library, rule, options, forward, cell, x, c, repeats, ref_theta, ref_x):
    original_forward, calls = cell.forward, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original_forward(*args, **kwargs)

    def step():
        cell.zero_grad(set_to_none=True)
        x.grad = None
        loss_fn(forward(), c).backward()

    cell.forward = counted
    try:
        with counting_vjps() as vjps:
            step()
    finally:
        del cell.forward
    grad_theta = torch.cat([p.grad.flatten() for p in cell.parameters()])
    err_theta, err_x = rel(grad_theta, ref_theta), rel(x.grad, ref_x)
    t = median_time(step, repeats)
    opts = ", ".join(f"{k} {v}" for k, v in (options or {}).items())
    return dict(library=library, rule=rule + (f" ({opts})" if opts else ""), f_calls=calls[0],
                vjps=vjps[0], t=t, err_theta=err_theta, err_x=err_x)


def print_gradients(regime, rows, n_unrolled):
    base = next(r for r in rows if r["library"] == "deqlite" and r["rule"] == "ift")
    theirs = {r["rule"].split(" ")[0]: r for r in rows if r["library"] == "TorchDEQ"}
    print(f"\n### ({regime}) one training step, Anderson forward solve; error against autograd "
          f"through {n_unrolled} unrolled steps (float64)\n")
    print("| library | rule | f calls | adjoint VJPs | median (ms) | rel. error ∂ℓ/∂θ | "
          "rel. error ∂ℓ/∂x | time vs deqlite ift | time vs TorchDEQ's same rule |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        same = theirs.get(r["rule"].split(" ")[0]) if r["library"] == "deqlite" else r
        vs = f"{r['t'] / same['t']:.2f}" if same else "-"
        print(f"| {r['library']} | {r['rule']} | {r['f_calls']} | {r['vjps']} | {r['t'] * 1e3:.1f} | "
              f"{r['err_theta']:.1e} | {r['err_x']:.1e} | {r['t'] / base['t']:.2f} | {vs} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 64, batch 16, 3 repeats")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--regimes", nargs="+", default=["gaussian", "orthogonal", "symmetric"],
                        choices=["gaussian", "orthogonal", "symmetric"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--skip-gradients", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, batch, repeats = (64, 16, 3) if args.quick else (256, 64, args.repeats)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchdeq")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, float32; "
          f"TorchDEQ {TORCHDEQ or 'NOT INSTALLED: its rows are skipped (pip install torchdeq==0.1.0)'}")
    print(f"tanh cell, width {width}, batch {batch}, tol {args.tol:g} (rel), max_iter "
          f"{args.max_iter}, medians of {repeats}")
    print("\n## Forward solves")
    for regime in args.regimes:
        print_forward(regime, forward_rows(regime, width, batch, args.tol, args.max_iter, repeats),
                      args.tol)
    if args.skip_gradients:
        return
    print("\n## Gradient rules")
    for regime in args.regimes:
        rows, n = gradient_rows(regime, width, batch, args.tol, args.max_iter, repeats)
        print_gradients(regime, rows, n)


if __name__ == "__main__":
    main()
