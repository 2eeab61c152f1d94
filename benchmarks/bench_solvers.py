"""deqlite against TorchDEQ 0.1.0: solver NFE and time to a tolerance, per-step overhead, and the
gradient rules' error and cost.

    .venv/bin/python benchmarks/bench_solvers.py --repeats 9 --sweeps   # everything: ~50 min
    .venv/bin/python benchmarks/bench_solvers.py --quick         # smoke run, small sizes: ~30 s
    .venv/bin/python benchmarks/bench_solvers.py --overhead      # the overhead table only: ~2 min
    .venv/bin/python benchmarks/bench_solvers.py --regimes conv multiscale --skip-gradients
    .venv/bin/pip install -e ".[bench]"                          # TorchDEQ: torchdeq==0.1.0

The problems (``benchmarks/_solver_problems.py``). The tanh cell f(z, x) = tanh(W z + U x + b)
(``deqlite.MLPCell``, U = I, b = 0), width 256, batch 64, in seven regimes:

  (a) gaussian:   W Gaussian, rescaled to spectral norm 0.9; inputs x ~ N(0, 1)
  (b) orthogonal: W = 0.95 × a random orthogonal matrix; inputs x ~ N(0, 1)
  (c) symmetric:  W symmetric with spectrum linspace(0, 0.97); inputs 0.01 · N(0, 1) (tanh stays
                  linear, so ρ(J) ≈ 0.97: the slow case)
  (d) near_orthogonal_<ρ>_x<s>, ρ ∈ {0.99, 0.999}, s ∈ {0.01, 0.1}: W = ρ Q, Q random orthogonal,
      inputs s · N(0, 1). With small inputs tanh stays nearly linear and J ≈ ρ Q has every
      eigenvalue on the circle of radius ρ: no eigenvalue is small, none is real-and-close-to-1
      that an extrapolation could single out: the hardest case for every solver. These get
      max_iter ≥ 1.2 · ln(tol) / ln(ρ) (11 047 for ρ = 0.999), enough for plain iteration.

and two convolutional cells, scaled to be contractions (at PyTorch's default init they are
barely or not at all): ``ConvCell(3, 16)`` on 16×16 maps (ρ(J) ≈ 0.8), and
``MultiscaleCell(3, [16, 32])`` on 16×16 + 8×8 (ρ(J) ≈ 0.85), whose list state both libraries
solve as one flat tensor through the same flatten/unflatten wrapper; batch 16 for both.

Both libraries get the very same f (one Python function around the same module), the same
tolerance and stopping rule (relative residual ‖f(z) − z‖ / ‖f(z)‖ ≤ tol for every sample of the
batch; both stop when the whole batch is there), the same max_iter, and Anderson the same memory
(m = 6, TorchDEQ's default; λ = 1e-4 in both, deqlite scales it to the residuals). One more
deqlite row, "anderson, m = min(D, max_iter), λ = 1e-6", keeps every residual that can be
independent (on a linear map: GMRES), the fewest evaluations on the slow regimes. Every f call
is counted by a wrapper around f (so NFE means the same in both), and every vector–Jacobian
product of an adjoint solve by a wrapper around ``torch.autograd.grad``.

1. Forward solves (no graph), every regime: NFE, median wall time, the worst relative residual
   of what each solver returned (recomputed here), time ratios against TorchDEQ's same solver,
   NFE against TorchDEQ's fewest (among its solves that reached tol).
2. Overhead (``--overhead`` alone, or part of the default run): each solver with tol = 0 and
   max_iter N (``--overhead-steps``, 200), against a bare Python loop ``z = f(z)`` N times (the
   physical limit: the f evaluations alone), on the symmetric tanh cell at width 64 and 256
   (batch 64) and on the conv cell. The ratio to the bare loop and the µs per step beyond it are
   each solver's own cost. TorchDEQ's broyden evaluates f N + 1 times (one before its loop),
   which the NFE column shows; the "beyond the loop" column charges the bare loop's per-f cost
   for each extra evaluation. TorchDEQ's broyden also keeps all N rank-one pairs (memory =
   max_iter), so its cost per step grows with the step; deqlite's keeps 30 and restarts
   (the row "broyden, memory = max_iter" keeps them all, for a like-for-like comparison).
3. Gradient rules (Anderson forward solve, one training step: forward + backward of
   ℓ = ⟨c, z⟩ + ½‖z‖²), regimes (a)–(c) only: f calls, adjoint VJPs, median time, and the
   relative error of ∂ℓ/∂θ (W, U, b) and ∂ℓ/∂x against autograd through a long unrolled
   iteration in float64 (enough steps for ‖W‖₂ⁿ < 1e-13). deqlite: ift, jfb, phantom (k 5,
   τ 0.5), neumann (k 5), unrolled; TorchDEQ: ift (``ift=True``, its ``torch.autograd.Function``
   version), 1-step gradient (``grad=1``: JFB), phantom (``grad=5, tau=0.5``). Ratios against
   deqlite's IFT.

Every timing comparison is interleaved: one warm-up call of each contestant, then --repeats
rounds in which each runs once, in round-robin order (the starting contestant rotates from round
to round), and the median per contestant; so a burst of load from another job hits every column
alike. Runs without TorchDEQ too (its rows are then skipped, with a note). On --threads CPU
threads (default 1: on a machine shared with other jobs a multi-threaded op waits for a
descheduled thread at every barrier). ``--quick`` (a smoke run of every code path): width 64,
batch 16, the conv cells at batch 2, 3 repeats, regimes gaussian, near_orthogonal_0.99_x0.1,
conv and multiscale (so gradients on gaussian only), the overhead table at width 64 and on the
conv cell with 30 steps.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import time
import warnings

import torch

from _solver_problems import (CELL_REGIMES, GRADIENT_REGIMES, REGIMES, Counter,  # benchmarks/
                              conv_problem, get_problem, make_problem, mlp_problem, reached,
                              spectral_radius, worst_rel_residual)
from _solver_sweeps import (HISTORY_REGIMES, check_every_sweep, history_sweep,  # benchmarks/
                            memory_sweep)
from _timing import interleaved_medians  # noqa: E402  (benchmarks/_timing.py)
from deqlite import DEQ, solve

try:
    from torchdeq import get_deq
    from torchdeq.solver import get_solver as torchdeq_solver
    TORCHDEQ = importlib.metadata.version("torchdeq")
except ImportError:                                   # the benchmark-only extra is not installed
    TORCHDEQ = None

SOLVER_PAIRS = [("forward_iteration", {}, "fixed_point_iter", {}),
                ("anderson", {"m": 6}, "anderson", {"m": 6}),
                ("broyden", {}, "broyden", {}),
                ("broyden", {"memory": "max_iter"}, None, None),   # all pairs, as TorchDEQ's
                ("anderson", {"m": "long", "lam": 1e-6}, None, None)]  # every residual: GMRES
FULL_MEMORY = "broyden, memory = max_iter"
LONG_HISTORY = "anderson, m = min(D, max_iter), λ = 1e-6"


def label(ours, opts):
    """A deqlite row's name: the solver's, FULL_MEMORY for Broyden keeping every pair, or
    LONG_HISTORY for Anderson keeping every residual (up to D, the state's size: more cannot be
    independent), with a regularizer small enough not to swamp the late, small residuals."""
    if opts.get("m") == "long":
        return LONG_HISTORY
    return FULL_MEMORY if opts.get("memory") == "max_iter" else ours


# the TorchDEQ solver each deqlite row is timed against (None: no like-for-like row)
THEIRS = {label(ours, opts): theirs or ("broyden" if label(ours, opts) == FULL_MEMORY else None)
          for ours, opts, theirs, _ in SOLVER_PAIRS}
DEQLITE_RULES = [("ift", None), ("jfb", None), ("phantom", {"k": 5, "tau": 0.5}),
                 ("neumann", {"k": 5}), ("unrolled", None)]
TORCHDEQ_RULES = [("ift", dict(ift=True)), ("jfb", dict(grad=1, tau=1.0)),
                  ("phantom", dict(grad=5, tau=0.5))]
QUICK_REGIMES = ["gaussian", "near_orthogonal_0.99_x0.1", "conv", "multiscale"]


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


def solver_runs(z0, tol, max_iter):
    """``[(library, solver, run)]``: each solver as ``run(f) -> z``, deqlite's and TorchDEQ's
    alternating (TorchDEQ's only where it is installed)."""
    runs = []
    for ours, our_opts, theirs, their_opts in SOLVER_PAIRS:
        resolve = {"max_iter": max_iter, "long": min(z0[0].numel(), max_iter)}
        opts = {k: resolve.get(v, v) if isinstance(v, str) else v for k, v in our_opts.items()}

        def run_ours(f, name=ours, opts=opts):
            return solve(f, z0, solver=name, tol=tol, max_iter=max_iter, stop="rel", **opts)[0]
        runs.append(("deqlite", label(ours, our_opts), run_ours))
        if TORCHDEQ is not None and theirs is not None:
            def run_theirs(f, solver=torchdeq_solver(theirs), opts=their_opts):
                return solver(f, z0, max_iter=max_iter, tol=tol, stop_mode="rel", **opts)[0]
            runs.append(("TorchDEQ", theirs, run_theirs))
    return runs


# ----------------------------------------------------------------------------- forward solves

def forward_rows(problem, tol, max_iter, repeats):
    """One row per solver: NFE (counted), the returned z's worst residual, the median time
    (interleaved over all six solvers)."""
    f, rows, runs = problem.f, [], {}
    with torch.no_grad():
        for library, solver, run in solver_runs(problem.z0, tol, max_iter):
            counter = Counter(f)
            z = run(counter)
            rows.append(dict(library=library, solver=solver, nfe=counter.calls,
                             residual=worst_rel_residual(f, z)))
            runs[library, solver] = lambda run=run: run(f)
        steps = next(r["nfe"] for r in rows if r["solver"] == "forward_iteration")

        def bare_loop():                  # plain iteration's own iterates, f and nothing else
            z = problem.z0
            for _ in range(steps):
                z = f(z)
        runs["python", "bare loop"] = bare_loop
        times = interleaved_medians(runs, repeats)
    per_f = times["python", "bare loop"] / steps
    for r in rows:
        r["t"] = times[r["library"], r["solver"]]
        r["floor"] = r["nfe"] * per_f                        # NFE f calls and nothing else
    return rows


def print_forward(problem, rows, tol, max_iter, rho=None):
    extra = f", ρ(J) ≈ {rho:.2f} at the solution (power iteration)" if rho else ""
    print(f"\n### ({problem.name}) forward solve to rel. residual {tol:g}: {problem.description}, "
          f"max_iter {max_iter}{extra}\n")
    print("| library | solver | NFE | worst rel. residual | reached tol | median (ms) | time vs "
          "TorchDEQ's same solver | floor of that ratio at this NFE | NFE vs TorchDEQ's best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    theirs = {r["solver"]: r for r in rows if r["library"] == "TorchDEQ"}
    pair = THEIRS
    their_best = min((r["nfe"] for r in theirs.values() if reached(r["residual"], tol)),
                     default=None)
    for r in rows:
        ref = theirs.get(pair.get(r["solver"], r["solver"])) if r["library"] == "deqlite" else r
        vs = f"{r['t'] / ref['t']:.2f}" if ref else "-"
        floor = f"{r['floor'] / ref['t']:.2f}" if ref else "-"
        best = f"{r['nfe'] / their_best:.2f}" if their_best else "-"
        there = "yes" if reached(r["residual"], tol) else "NO"
        print(f"| {r['library']} | {r['solver']} | {r['nfe']} | {r['residual']:.1e} | {there} | "
              f"{r['t'] * 1e3:.1f} | {vs} | {floor} | {best} |")
    print("\nThe floor is NFE × one f's time (a bare loop z = f(z) as long as plain iteration's "
          "solve, divided by its length) over TorchDEQ's time: what a solver with no cost of its "
          "own would reach at that NFE. (An f's time depends a little on its iterate, so the floor "
          "is exact for forward iteration and close for the others.)")
    broyden = theirs.get("broyden")
    if broyden and max_iter > 1000:
        pairs_gb = 2 * problem.z0[0].numel() * len(problem.z0) * max_iter * 4 / 1e9
        print(f"\nTorchDEQ's broyden keeps every rank-one pair (its LBFGS_thres defaults to "
              f"max_iter) and allocates them up front: {pairs_gb:.2f} GB of zeros per solve here, "
              f"part of its time; deqlite's keeps 30 and restarts (its row '{FULL_MEMORY}' "
              f"keeps them all, allocated as it goes).")


def forward_section(regimes, width, batch, cell_batch, tol, max_iter, repeats):
    print("\n## Forward solves")
    for regime in regimes:
        problem = get_problem(regime, width, batch, cell_batch)
        n = max(max_iter, problem.max_iter_for(tol))
        rows = forward_rows(problem, tol, n, repeats)
        rho = None
        if regime in CELL_REGIMES:
            with torch.no_grad():
                z = solve(problem.f, problem.z0, solver="anderson", tol=tol, max_iter=n, m=6)[0]
            rho = spectral_radius(problem.f, z)
        print_forward(problem, rows, tol, n, rho)


# ----------------------------------------------------------------------------- overhead

def overhead_rows(problem, steps, repeats):
    """The bare loop ``z = f(z)`` ``steps`` times and every solver at tol 0, max_iter ``steps``,
    timed interleaved; NFE counted per contestant."""
    f, z0 = problem.f, problem.z0

    def bare_loop(f):
        z = z0
        for _ in range(steps):
            z = f(z)
        return z
    contestants = [("python", "bare loop z = f(z)", bare_loop),
                   *solver_runs(z0, 0.0, steps)]
    rows, runs = [], {}
    with torch.no_grad():
        for library, solver, run in contestants:
            counter = Counter(f)
            run(counter)
            rows.append(dict(cell=problem.description, library=library, solver=solver,
                             nfe=counter.calls))
            runs[library, solver] = lambda run=run: run(f)
        times = interleaved_medians(runs, repeats)
    for r in rows:
        r["t"] = times[r["library"], r["solver"]]
    return rows


def print_overhead(tables, steps):
    """One table: per cell, its bare loop first, then the solvers against it."""
    print("| cell | library | solver | NFE | median (ms) | µs per step | ratio to the bare loop | "
          "µs per step beyond the loop |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for rows in tables:
        bare = rows[0]
        per_f = bare["t"] / bare["nfe"]                              # the bare loop's cost of one f
        for r in rows:
            nfe = f"{r['nfe']}" + ("" if r["nfe"] == steps else f" (≠ {steps})")
            beyond = (r["t"] - per_f * r["nfe"]) / steps
            print(f"| {r['cell']} | {r['library']} | {r['solver']} | {nfe} | {r['t'] * 1e3:.1f} | "
                  f"{r['t'] / steps * 1e6:.0f} | {r['t'] / bare['t']:.2f} | {beyond * 1e6:.0f} |")


def overhead_section(steps, repeats, cell_batch, widths=(64, 256)):
    print(f"\n## Overhead: {steps} steps at tol 0 against a bare loop of {steps} f calls\n")
    print("Symmetric-regime tanh cell (batch 64) and the conv cell. \"µs per step\": median / "
          f"{steps}; \"beyond the loop\": (median − NFE × the bare loop's time per f) / {steps}, "
          "the solver's own cost per step.\n")
    problems = [mlp_problem("symmetric", w, 64) for w in widths] + [conv_problem(cell_batch)]
    print_overhead([overhead_rows(problem, steps, repeats) for problem in problems], steps)
    if TORCHDEQ is not None:
        print(f"\nTorchDEQ's broyden evaluates f once before its loop ({steps} + 1) and keeps all "
              f"{steps} rank-one pairs (its memory is max_iter), so its cost per step grows with "
              f"the step; deqlite's broyden keeps 30 pairs and restarts.")
    short_solves(problems[-2], repeats)


SHORT = (1, 5, 20)      # evaluations per short solve


def short_solves(problem, repeats, lengths=SHORT):
    """A DEQ's training solves take 5–30 evaluations, so a solve's fixed cost (validating its
    arguments, setting up and closing its bookkeeping) matters as much as its cost per step:
    every solver at tol 0 for exactly k evaluations against a bare loop of k f calls."""
    print(f"\n### Short solves ({problem.description}): µs per solve beyond its k f calls\n")
    print("Each solver runs exactly k evaluations (tol 0, max_iter k), timed interleaved with a "
          "bare loop of k f calls; the figure is (median − k × the bare loop's time per f), in "
          "µs: the fixed cost of a solve plus k steps of its own work.\n")
    tables = {k: overhead_rows(problem, k, repeats) for k in lengths}
    print("| library | solver | " + " | ".join(f"k = {k}" for k in lengths) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in lengths) + " |")
    for i, r in enumerate(tables[lengths[0]][1:], start=1):
        cells = []
        for k in lengths:
            bare, row = tables[k][0], tables[k][i]
            cells.append(f"{(row['t'] - bare['t'] / bare['nfe'] * row['nfe']) * 1e6:.0f}")
        print(f"| {r['library']} | {r['solver']} | " + " | ".join(cells) + " |")


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
    """One row per rule: counts and errors from one step each, then all steps timed
    interleaved (every step zeroes the gradients it accumulates first)."""
    ref_theta, ref_x, n_unrolled = reference_grads(regime, width, batch)
    cell, x, c = make_problem(regime, width, batch)
    x.requires_grad_()
    rows, steps = [], {}
    for rule, options in DEQLITE_RULES:
        deq = DEQ(cell, solver="anderson", solver_options={"m": 6}, tol=tol, max_iter=max_iter,
                  backward=rule, backward_options=options, backward_tol=tol, on_fail="ignore")
        rows.append(step_row("deqlite", rule, options, lambda deq=deq: deq(x), cell, x, c,
                             ref_theta, ref_x, steps))
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
            rows.append(step_row("TorchDEQ", rule, label or None, forward, cell, x, c,
                                 ref_theta, ref_x, steps))
    times = interleaved_medians(steps, repeats)
    for r in rows:
        r["t"] = times[r["library"], r["rule"]]
    return rows, n_unrolled


def step_row(library, rule, options, forward, cell, x, c, ref_theta, ref_x, steps):
    """Run one training step with f calls and VJPs counted and its gradients checked; add the
    step to ``steps`` for the timing."""
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
    opts = ", ".join(f"{k} {v}" for k, v in (options or {}).items())
    label = rule + (f" ({opts})" if opts else "")
    steps[library, label] = step
    return dict(library=library, rule=label, f_calls=calls[0], vjps=vjps[0],
                err_theta=rel(grad_theta, ref_theta), err_x=rel(x.grad, ref_x))


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


# ----------------------------------------------------------------------------- command line

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def tolerance(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a relative tolerance must be in (0, 1), got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: width 64, batch 16, conv cells at batch 2, 30 overhead "
                             "steps, 3 repeats, fewer slow regimes")
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--tol", type=tolerance, default=1e-4)
    parser.add_argument("--max-iter", type=positive_int, default=500,
                        help="max_iter of every solve (the near-orthogonal regimes get more)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=None,
                        help="forward-solve regimes (default: all; with --quick a subset); the "
                             "gradient section runs on those of " + ", ".join(GRADIENT_REGIMES))
    parser.add_argument("--overhead", action="store_true",
                        help="only the overhead table (the default run includes it)")
    parser.add_argument("--overhead-steps", type=positive_int, default=None,
                        help="f evaluations per overhead run (default 200; 30 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--skip-gradients", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--sweeps", action="store_true",
                        help="also the sweeps of Broyden's memory, check_every and Anderson's "
                             "m and λ (_solver_sweeps.py)")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be 0 (torch's default) or positive, got {args.threads}")
    if args.overhead and args.skip_overhead:
        parser.error("--overhead and --skip-overhead exclude each other")
    if args.regimes is None:
        args.regimes = QUICK_REGIMES if args.quick else REGIMES
    if args.overhead_steps is None:
        args.overhead_steps = 30 if args.quick else 200
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, batch, cell_batch, repeats = (64, 16, 2, 3) if args.quick else (256, 64, 16, args.repeats)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchdeq")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, float32; "
          f"TorchDEQ {TORCHDEQ or 'NOT INSTALLED: its rows are skipped (pip install torchdeq==0.1.0)'}")
    print(f"tol {args.tol:g} (rel), max_iter {args.max_iter}, medians of {repeats} interleaved "
          f"rounds")
    start = time.perf_counter()
    if not args.overhead:
        forward_section(args.regimes, width, batch, cell_batch, args.tol, args.max_iter, repeats)
    if not args.skip_overhead:
        overhead_section(args.overhead_steps, repeats, cell_batch,
                         widths=(64,) if args.quick else (64, 256))
    gradient_regimes = [r for r in args.regimes if r in GRADIENT_REGIMES]
    if not (args.overhead or args.skip_gradients) and gradient_regimes:
        print(f"\n## Gradient rules (tanh cell, width {width}, batch {batch})")
        for regime in gradient_regimes:
            rows, n = gradient_rows(regime, width, batch, args.tol, args.max_iter, repeats)
            print_gradients(regime, rows, n)
    if args.sweeps:
        memory_sweep(args.regimes, width, batch, cell_batch, args.tol, args.max_iter)
        check_every_sweep(width, batch, cell_batch, args.tol, args.max_iter, repeats)
        history_sweep(width, batch, cell_batch, args.tol, args.max_iter,
                      regimes=QUICK_REGIMES[:2] if args.quick else HISTORY_REGIMES)
    print(f"\n(run time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
