"""Checks for notebook 02's exercises (fixed-point solvers)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import references
from ._harness import DT, CheckFailed, _fail, _call, _Counted, _compare, _close, _passed, exercise, _tanh_problem


def _solver_problems():
    """(what, f, z0) for the solver checks: a batch of vectors, one sample, and an image-shaped
    state (batch, channels, height, width) mixed by one matrix; all contracting (‖J‖ ≤ 0.9)."""
    out = []
    for what, seed, shape in [("a batch of 4 vectors", 0, (4, 6)), ("one sample", 1, (1, 6)),
                              ("image-shaped states (2, 3, 2, 2)", 2, (2, 3, 2, 2))]:
        d = math.prod(shape[1:])
        W, U, b, x = _tanh_problem(seed, batch=shape[0], d_in=3, d=d, scale=0.9)
        injection = (x @ U.T + b).reshape(shape)

        def f(z, W=W, injection=injection):
            return torch.tanh((z.flatten(1) @ W.T).reshape(z.shape) + injection)

        out.append((what, f, torch.zeros(shape, dtype=DT)))
    return out


def _no_fixed_point():
    """f(z) = z + 1, which has no fixed point: a solver can never meet a tolerance of 0."""
    return lambda z: z + 1.0, torch.zeros(3, 2, dtype=DT)


def _solver_out(name: str) -> Callable:
    def convert(out):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"{name} should return a pair (z, residuals), got "
                              f"{type(out).__name__}.")
        z, residuals = out
        try:
            residuals = [float(r) for r in residuals]
        except (TypeError, ValueError):
            raise CheckFailed(f"{name}: `residuals` should be a list of numbers (one float per "
                              f"iteration, e.g. res.item()), got {type(residuals).__name__}.") from None
        return z, residuals
    return convert


def _residual(z: torch.Tensor, fz: torch.Tensor) -> float:
    return ((fz - z).norm() / fz.norm()).item()


def _check_solver(fn: Callable, name: str, hint: str, **kwargs) -> int:
    """The rules every solver exercise shares: the fixed point on each problem family, one
    evaluation of f per residual, residuals that are ‖f(z) − z‖ / ‖f(z)‖ of the iterates, stopping
    at the first residual ≤ tol, and at max_iter when tol is never met. Returns the most steps."""
    steps = 0
    for what, f_, z0 in _solver_problems():
        f = _Counted(f_, "f", 2000, " with max_iter=500")
        z_star = references.forward_iteration(f_, z0, tol=1e-14, max_iter=3000)[0]
        z, residuals = _call(fn, name, f, z0, tol=1e-10, max_iter=500, **kwargs,
                             convert=_solver_out(name))
        _compare(z, z_star, f"{name}'s fixed point on {what}", hint, rtol=1e-7, atol=1e-8)
        if f.calls != len(residuals):
            raise _fail(f"{name} on {what}", f"it evaluated f {f.calls} times for "
                        f"{len(residuals)} residuals.",
                        "Evaluate f once per iteration and use that one value twice: for the "
                        "residual ‖f(z) − z‖ / ‖f(z)‖ and for the next step (a solver's cost is "
                        "its number of evaluations of f).")
        if not (residuals and residuals[-1] <= 1e-10 and all(r > 1e-10 for r in residuals[:-1])):
            raise _fail(f"{name} on {what} with tol=1e-10",
                        f"the residuals end {residuals[-3:]}.", "Stop at the first residual ≤ tol, "
                        "and not before: the last residual is ≤ tol, every earlier one above it.")
        steps = max(steps, len(residuals))
    # the residuals are those of the iterates (recomputed from a second, recorded run)
    what, f_, z0 = _solver_problems()[0]
    seen = []

    def recorded(z):
        fz = f_(z)
        seen.append(_residual(z, fz))
        return fz

    _, residuals = _call(fn, name, recorded, z0, tol=1e-10, max_iter=500, **kwargs,
                         convert=_solver_out(name))
    for i, (r, expected) in enumerate(zip(residuals, seen)):
        if not _close(r, expected, 1e-6):
            raise _fail(f"{name}'s residual {i} on {what}", f"expected ‖f(z) − z‖ / ‖f(z)‖ = "
                        f"{expected!r} for the z it evaluated f at, got {r!r}.",
                        "The residual is the norm of f(z) − z over the whole batch divided by the "
                        "norm of f(z) (not of z), at the z where f was just evaluated.")
    # a map that never converges: the solver must stop after max_iter evaluations of f
    g_, z0 = _no_fixed_point()
    f = _Counted(g_, "f", 200, " with max_iter=15 on a map without a fixed point")
    _, residuals = _call(fn, name, f, z0, tol=0.0, max_iter=15, **kwargs, convert=_solver_out(name))
    if f.calls != 15 or len(residuals) != 15:
        raise _fail(f"{name} with tol=0 and max_iter=15 on a map without a fixed point",
                    f"it evaluated f {f.calls} times and returned {len(residuals)} residuals; "
                    f"expected 15 of each.", "max_iter bounds the number of evaluations of f: stop "
                    "after max_iter of them even when the residual never reaches tol.")
    return steps


@exercise
def check_forward_iteration(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter) -> (z, residuals) with plain forward iteration."""
    steps = _check_solver(fn, "forward_iteration", "Iterate z ← f(z) and stop when the relative "
                          "residual ‖f(z) − z‖ / ‖f(z)‖ is below tol (or after max_iter steps).")
    return _passed("forward_iteration", f"reaches the fixed point (≤ {steps} iterations), one f "
                   f"per iteration, stops at tol and at max_iter")


@exercise
def check_anderson(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter, m) -> (z, residuals) with Anderson acceleration."""
    hint = ("Keep the last m pairs (x_i, f(x_i)); solve for weights α with Σα = 1 minimising "
            "‖Σ α_i (f(x_i) − x_i)‖ per sample (flatten each sample's state), then step to "
            "Σ α_i f(x_i).")
    steps = _check_solver(fn, "anderson", hint, m=5)
    what, f, z0 = _solver_problems()[0]
    _, plain = _call(fn, "anderson", f, z0, tol=1e-10, max_iter=500, m=1, convert=_solver_out("anderson"))
    if steps >= len(plain):
        raise _fail("anderson with m=5 against m=1", f"{steps} iterations, no fewer than with m=1 "
                    f"({len(plain)}): the history is not being used.", hint)
    # Step by step against the reference: the same iterates, so the same residuals, for a small
    # window (where keeping one pair too many or too few shows at once).
    for what, f, z0 in _solver_problems()[::2]:
        _, expected = references.anderson(f, z0, tol=1e-10, max_iter=12, m=2)
        _, got = _call(fn, "anderson", f, z0, tol=1e-10, max_iter=12, m=2,
                       convert=_solver_out("anderson"))
        for i, (r_got, r_ref) in enumerate(zip(got, expected)):
            if not _close(r_got, r_ref, 1e-4):
                raise _fail(f"anderson with m=2 on {what}, residual {i}", f"expected {r_ref!r}, got "
                            f"{r_got!r} (the first {i} agree).",
                            "The history must hold exactly the last m pairs (drop the oldest once it "
                            "holds m: not m + 1, not m − 1), the new iterate is Σ α_i f(x_i), not "
                            "Σ α_i x_i, and the weights are solved per sample.")
    return _passed("anderson", f"reaches the fixed point in ≤ {steps} iterations (m=1: "
                   f"{len(plain)}), one f per iteration, the reference's iterates with m=2")


@exercise
def check_relative_residual(fn: Callable) -> bool:
    """fn(z, fz) -> per-sample ‖f(z) − z‖ / ‖f(z)‖, shape (batch,)."""
    g = torch.Generator().manual_seed(0)
    hint = ("One number per sample: flatten everything but the batch dimension (z.flatten(1)), "
            "take norms along dim=1, and divide by ‖f(z)‖, not by ‖z‖.")
    for shape, dtype in [((5, 3, 4), DT), ((1, 7), DT), ((2, 3, 4, 4), DT), ((6, 5), torch.float32)]:
        z = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        fz = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        expected = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
        got = _call(fn, "relative_residual", z, fz)
        _compare(got, expected, f"relative_residual on a batch of shape {shape} "
                 f"({str(dtype).removeprefix('torch.')})", hint, rtol=1e-5, atol=1e-7)
    return _passed("relative_residual", "one correct value per sample, for vector, sequence and "
                   "image states, float32 too")


@exercise
def check_anderson_weights(fn: Callable) -> bool:
    """fn(G) -> α (n,) minimising ‖αᵀ G‖ subject to Σα = 1, for G of shape (n, D)."""
    hint = ("With H = G Gᵀ, the constrained minimiser is α = H⁻¹1 / (1ᵀ H⁻¹ 1): solve H y = 1, "
            "then divide y by its *sum* (the constraint is Σα = 1, not ‖α‖ = 1).")
    g = torch.Generator().manual_seed(0)
    families = [(2, 10, DT), (4, 10, DT), (1, 5, DT), (3, 8, torch.float32)]
    for n, D, dtype in families:
        G = torch.randn(n, D, generator=g, dtype=DT)
        if n == 4:                      # residuals that point alike: some weights are negative
            G[1:] += 2 * G[0]
        y = torch.linalg.solve(G @ G.T, torch.ones(n, dtype=DT))
        expected = (y / y.sum()).to(dtype)
        got = _call(fn, "anderson_weights", G.to(dtype))
        _compare(got, expected, f"anderson_weights for n={n}, D={D} "
                 f"({str(dtype).removeprefix('torch.')})", hint,
                 rtol=1e-3 if dtype == torch.float32 else 1e-7, atol=1e-5 if dtype ==
                 torch.float32 else 1e-9)
    return _passed("anderson_weights", "the constrained least-squares weights, summing to 1 "
                   "(negative ones included), n = 1 to 4, float32 too")
