"""Checks for notebook 04's exercises (training a DEQ)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ...gradients import IFT
from ...solvers import SolverSpec
from ...stats import SolverStats
from ._harness import (_call, CheckFailed, _compare, DT, exercise, _fail, _pair_of, _passed,
                       _tanh_problem, _TooManyCalls, _which)


class _RecordedMap:
    """f(z) = tanh(z Wᵀ + x Uᵀ + b) on states of ``shape`` (an image-shaped state is mixed as one
    flat vector per sample), with W, U, b and x leaves that require grad. Counts its calls, and
    those that autograd recorded (the output has a graph): a DEQ's forward pass records one."""

    def __init__(self, seed: int, shape: tuple, dtype: torch.dtype = DT, scale: float = 0.9,
                 limit: int = 1000):
        d = math.prod(shape[1:])
        W, U, b, x = _tanh_problem(seed, batch=shape[0], d_in=3, d=d, scale=scale, dtype=dtype)
        self.params = [t.clone().requires_grad_() for t in (W, U, b, x)]
        self.W = W
        self.shape, self.limit = shape, limit
        self.calls = self.recorded = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.limit:
            raise _TooManyCalls(f"called f more than {self.limit} times (a solve here needs "
                                f"under 100), so this check stopped it.")
        W, U, b, x = self.params
        out = torch.tanh((z.flatten(1) @ W.T + x @ U.T + b).reshape(z.shape))
        if out.requires_grad:
            self.recorded += 1
        return out

    def fresh(self) -> "_RecordedMap":
        """The same map with its own counters (for the check's own computations)."""
        other = _RecordedMap.__new__(_RecordedMap)
        other.__dict__.update(self.__dict__, calls=0, recorded=0, limit=10 ** 9)
        return other


def _grads(z: Any, params: list, weight: torch.Tensor) -> list:
    """∂(Σ weight · z)/∂params, zeros where z does not depend on a parameter."""
    grads = torch.autograd.grad((z * weight).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _ift_gradients(f: _RecordedMap, z_star: torch.Tensor, weight: torch.Tensor):
    """The exact IFT gradient of Σ weight · z* (adjoint g = (I − Jᵀ)⁻¹ weight, by a linear solve,
    J = diag(1 − f(z*)²) W per sample), and the JFB one (g = weight)."""
    g_ = f.fresh()
    with torch.no_grad():
        s = 1 - g_(z_star).flatten(1) ** 2
        J = s[:, :, None] * f.W.to(s.dtype)
        eye = torch.eye(J.shape[1], dtype=DT)
        adjoint = torch.linalg.solve((eye - J.double().transpose(1, 2)),
                                     weight.flatten(1).double()[..., None])[..., 0]
    adjoint = adjoint.to(z_star.dtype).reshape(z_star.shape)
    ift = _grads(g_(z_star), f.params, adjoint)
    jfb = _grads(g_(z_star), f.params, weight)
    return ift, jfb


def _solve_families():
    return [("a batch of 4 vectors", 0, (4, 6), DT), ("one sample", 1, (1, 5), DT),
            ("image-shaped states (2, 3, 2, 2)", 2, (2, 3, 2, 2), DT),
            ("a batch of 3 vectors in float32", 3, (3, 6), torch.float32)]


def _layer_call(fn: Callable, *args, **kwargs):
    """_call for deq_layer, with a hint for a solve under torch.inference_mode()."""
    try:
        return _call(fn, "deq_layer", *args, convert=_pair_of("deq_layer", "z, stats"), **kwargs)
    except _TooManyCalls:
        raise
    except CheckFailed as e:
        if "inference" not in str(e).lower():
            raise
        raise CheckFailed(f"{e}\nHint: torch.inference_mode() makes tensors that can never "
                          f"join a graph, so the attach cannot apply f to z* with one; solve "
                          f"under torch.no_grad() instead.") from None


@exercise
def check_deq_layer(fn: Callable) -> bool:
    """fn(f, z0, solver, ift, pretrain_depth=0) -> (z, stats): solve without a graph, then one
    application of f with a graph through ``ift.attach``; in warm-up, pretrain_depth applications
    of f recorded by autograd and no solve, (z_k, None)."""
    name = "deq_layer"
    names = ["W", "U", "b", "x"]
    hint = ("Solve with the solver you are given under torch.no_grad() (z_star, stats = "
            "solver(f, z0)), then return (ift.attach(z_star, f), stats): the attach applies f "
            "once more with a graph and turns the incoming gradient into the IFT adjoint.")
    for what, seed, shape, dtype in _solve_families():
        f32 = dtype == torch.float32
        tol = 1e-5 if f32 else 1e-11
        spec = SolverSpec("anderson", tol=tol, max_iter=100)
        ift = IFT(SolverSpec("anderson", tol=tol, max_iter=100))
        f = _RecordedMap(seed, shape, dtype)
        z0 = torch.zeros(shape, dtype=dtype)
        with torch.no_grad():
            z_star, _ = SolverSpec("anderson", tol=1e-14 if not f32 else 1e-7, max_iter=200)(
                f.fresh(), z0)
        z, stats = _layer_call(fn, f, z0, spec, ift)
        what = f"{name} on {what}"
        if not isinstance(stats, SolverStats):
            raise _fail(what, f"the second result should be the solver's SolverStats, got "
                        f"{type(stats).__name__}.", "Return the stats the solver gave you: "
                        "z_star, stats = solver(f, z0) (the notebook plots their NFE).")
        _compare(z, z_star, f"{what}: the equilibrium z", hint, rtol=1e-4 if f32 else 1e-8,
                 atol=1e-5 if f32 else 1e-10)
        unrecorded = f.calls - f.recorded
        if f.recorded != 1 or unrecorded != stats.nfe:
            if f.recorded == 0:
                detail, tip = ("no application of f was recorded by autograd, so z has no graph "
                               "and the loss cannot train the cell.",
                               "After the solve, return ift.attach(z_star, f): one application of "
                               "f with a graph (not under torch.no_grad()).")
            elif f.recorded >= stats.nfe:
                detail, tip = (f"autograd recorded {f.recorded} applications of f for a solve of "
                               f"{stats.nfe} iterations: the graph (and the memory) grows with "
                               f"the solver's iterations.",
                               "Run the solver under torch.no_grad(): a DEQ keeps a graph of one "
                               "application of f at z*, whatever the number of iterations.")
            else:
                detail, tip = (f"f was evaluated {f.calls} times ({f.recorded} with a graph) "
                               f"for a solve of {stats.nfe} iterations.",
                               "Call the solver once and ift.attach once; apply f nowhere else "
                               "(the attach is the one application with a graph).")
            raise _fail(what, detail, tip)
        if not (isinstance(z, torch.Tensor) and z.requires_grad):
            raise _fail(what, "z carries no graph, so the loss cannot train the cell.", hint)
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 20),
                             dtype=DT).to(dtype)
        expected, jfb = _ift_gradients(f, z_star, weight)
        got = _grads(z, f.params, weight)
        for p, g, e, j in zip(names, got, expected, jfb):
            grad_hint = _which(g, {
                "That is Jacobian-free backprop (JFB): backpropagating through one plain "
                "application f(z*) treats ∂ℓ/∂z* as the adjoint. Return ift.attach(z_star, f), "
                "whose hook solves g = Jᵀ g + ∂ℓ/∂z* first.": j}, hint)
            _compare(g, e, f"{what}: the gradient of Σ c·z with respect to {p} (the IFT gradient)",
                     grad_hint, rtol=1e-3 if f32 else 1e-6, atol=1e-5 if f32 else 1e-9)
        if ift.stats is None:
            raise _fail(what, "the gradient is right, but the `ift` rule you were given did not "
                        "solve the adjoint (its .stats is still None after backward).",
                        "Attach with the given rule, ift.attach(z_star, f), not a new IFT(...): "
                        "its .stats is the backward solve's record the notebook plots.")
    # warm start: from z0 = z* the solve is done at its first evaluation
    what, seed, shape, dtype = _solve_families()[2]
    f = _RecordedMap(seed, shape, dtype)
    with torch.no_grad():
        z_star, _ = SolverSpec("anderson", tol=1e-14, max_iter=200)(f.fresh(),
                                                                    torch.zeros(shape, dtype=DT))
    spec = SolverSpec("anderson", tol=1e-10, max_iter=100)
    _, stats = _layer_call(fn, f, z_star.clone(), spec, IFT(spec))
    if not isinstance(stats, SolverStats) or stats.nfe != 1:
        raise _fail(f"{name} started at z0 = z* (a warm start) on {what}",
                    f"the solve took {getattr(stats, 'nfe', stats)} evaluations instead of 1.",
                    "Start the solver from the z0 you are given (solver(f, z0)), not from zeros: "
                    "a warm start is how a DEQ reuses an equilibrium it already knows.")
    # a map without a fixed point: the solve stops at max_iter, the layer still returns
    f = _RecordedMap(4, (2, 3), DT)
    shift = _CountedShift(f)
    spec = SolverSpec("forward_iteration", tol=1e-12, max_iter=15)
    _, stats = _layer_call(fn, shift, torch.zeros(2, 3, dtype=DT), spec, IFT(spec))
    if shift.calls != 16 or getattr(stats, "nfe", None) != 15:
        raise _fail(f"{name} with max_iter=15 on f(z) = z + 1 (no fixed point)",
                    f"f was evaluated {shift.calls} times; expected 16 (15 by the solver, 1 by "
                    f"the attach).", "Call the solver once: it stops at max_iter by itself, and "
                    "its stats say that the solve did not converge. Do not solve again.")
    # warm-up: exactly pretrain_depth applications, recorded, no solve
    for depth, (what, seed, shape, dtype) in ((3, _solve_families()[0]), (1, _solve_families()[2])):
        f = _RecordedMap(seed, shape, dtype)
        z0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 30), dtype=dtype)
        spec = SolverSpec("anderson", tol=1e-11, max_iter=100)
        z, stats = _layer_call(fn, f, z0, spec, IFT(spec), pretrain_depth=depth)
        what = f"{name} in warm-up (pretrain_depth={depth}) on {what}"
        g_ = f.fresh()
        unrolled = [z0]
        for _ in range(depth + 1):
            unrolled.append(g_(unrolled[-1]))
        expected = unrolled[depth]
        from_zeros = torch.zeros_like(z0)
        for _ in range(depth):
            from_zeros = g_(from_zeros)
        if stats is not None or f.calls > depth:
            raise _fail(what, f"f was evaluated {f.calls} times and the second result is "
                        f"{type(stats).__name__}.",
                        f"During the warm-up there is no solve: apply f "
                        f"exactly pretrain_depth = {depth} times from z0 and return (z, None).")
        _compare(z, expected.detach(), f"{what}: z", _which(z, {
            "One application too few: the warm-up applies f exactly pretrain_depth times.":
                unrolled[depth - 1].detach(),
            "One application too many: the warm-up applies f exactly pretrain_depth times.":
                unrolled[depth + 1].detach(),
            "Start from the z0 you are given, not from zeros.": from_zeros.detach()},
            f"Apply f exactly pretrain_depth = {depth} times, starting from z0."),
            rtol=1e-10, atol=1e-12)
        if f.recorded != depth or not z.requires_grad:
            raise _fail(what, f"autograd recorded {f.recorded} of the {depth} applications.",
                        "The warm-up trains the cell unrolled: backpropagate through all its "
                        "applications (no torch.no_grad() around them, no detach between them).")
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 40), dtype=DT)
        for p, g, e in zip(names, _grads(z, f.params, weight),
                           _grads(expected, f.params, weight)):
            _compare(g, e, f"{what}: the gradient with respect to {p}",
                     "Backpropagate through every one of the applications.", rtol=1e-8, atol=1e-10)
    return _passed(name, "the equilibrium with one recorded application of f and the IFT "
                   "gradient (vectors, one sample, images, float32); warm starts; stops at "
                   "max_iter; warm-up unrolled exactly pretrain_depth times")


class _CountedShift:
    """f(z) = z + 1 + 0 · b (no fixed point), counting calls, with a parameter to attach to."""

    def __init__(self, f: _RecordedMap):
        self.b, self.calls = f.params[2], 0

    def __call__(self, z):
        self.calls += 1
        if self.calls > 200:
            raise _TooManyCalls("called f more than 200 times with max_iter=15 on a map without "
                                "a fixed point, so this check stopped it.")
        return z + 1.0 + 0.0 * self.b[: z.shape[1]]


def _warm_families():
    """(what, state shape, the batch's sample indices, the cached indices, dtype)."""
    return [("a batch of 5 vectors, 3 of them seen before", (5, 6), [7, 3, 12, 0, 4],
             [7, 12, 99, 3], DT),
            ("image-shaped states (3, 2, 2, 2), 2 of them seen", (3, 2, 2, 2), [2, 0, 5],
             [0, 2, 6], DT),
            ("one sample, seen before", (1, 4), [2], [2], DT),
            ("a batch of 4, the cache empty", (4, 3), [0, 1, 2, 3], [], DT),
            ("a batch of 4 float32 vectors, all seen", (4, 5), [9, 8, 7, 6], [6, 7, 8, 9],
             torch.float32)]


@exercise
def check_warm_start(fn: Callable) -> bool:
    """fn(cache, index, cold) -> z0 with row r = cache[int(index[r])] where cached, else cold[r]."""
    name = "warm_start"
    for seed, (what, shape, index, cached, dtype) in enumerate(_warm_families()):
        g = torch.Generator().manual_seed(seed)
        cold = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        cache = {i: torch.randn(shape[1:], generator=g, dtype=DT).to(dtype) for i in cached}
        index = torch.tensor(index)
        before = dict(cache)
        rows = [r for r, i in enumerate(index.tolist()) if i in cache]
        expected, by_row, zeros = cold.clone(), cold.clone(), torch.zeros_like(cold)
        for r in rows:
            expected[r] = zeros[r] = cache[int(index[r])]
        for r in range(len(index)):
            if r in cache:
                by_row[r] = cache[r]
        got = _call(fn, name, cache, index, cold)
        what = f"{name} on {what}"
        if set(cache) != set(before) or any(cache[k] is not v for k, v in before.items()):
            raise _fail(what, f"the cache held the samples {sorted(before)} and now holds "
                        f"{sorted(cache)} (or other tensors).", "Only read the cache: the training "
                        "loop stores the new equilibria after the solve.")
        known = {
            "None of the cached states was used. Look them up with Python ints (index.tolist(), "
            "or int(index[r])): a tensor element is never found as a key of a dict of ints. And "
            "per sample: a seen sample starts from its cached state even when others in the batch "
            "were not seen.": cold,
            "The key is the sample's index index[r], not its row r in the batch.": by_row,
            "A sample that is not in the cache starts from cold[r], the cold start you are given, "
            "not from zeros.": zeros}
        hint = _which(got, {h: v for h, v in known.items() if not torch.equal(v, expected)},
                      "Row r is cache[int(index[r])] when that sample is in the cache, else "
                      "cold[r].")
        _compare(got, expected, what, hint, rtol=0, atol=0)
    return _passed(name, "cached states for the samples seen, the cold start for the others, "
                   "by sample index; vectors, images, one sample, an empty cache, float32; "
                   "cache and cold start left alone")
