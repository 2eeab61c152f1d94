"""Checks for notebook 02's exercises (fixed-point solvers)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import references
from ._harness import (_call, CheckFailed, _close, _compare, _Counted, DT, exercise, _fail,
                       _pair_of, _passed, _tanh_problem, _which)


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
        z, residuals = _pair_of(name, "z, residuals")(out)
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


# -- iterations_to_tol

def _whole_number(name: str) -> Callable[[Any], float]:
    """A result that should be a whole number of iterations: an int, or an integer-valued float
    or one-element tensor (returned as a float, so that the check can say it is not whole)."""
    def convert(x):
        if isinstance(x, bool) or x is None:
            raise CheckFailed(f"{name} should return a whole number of iterations, got {x!r}.")
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise CheckFailed(f"{name} should return one number, got a tensor of shape "
                                  f"{tuple(x.shape)}.")
            x = x.item()
        try:
            value = float(x)
        except (TypeError, ValueError):
            raise CheckFailed(f"{name} should return a whole number of iterations, got "
                              f"{type(x).__name__}.") from None
        if not math.isfinite(value):
            raise CheckFailed(f"{name} should return a whole number of iterations, got {value!r}.")
        return value
    return convert


def _orthogonal(seed: int, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]


def _first_below(A: torch.Tensor, c: torch.Tensor, tol: float, limit: int = 5000):
    """Forward iteration z ← A z + c from z = 0: the first k with ‖g_k‖ ≤ tol ‖g_0‖
    (g_k = f(z_k) − z_k), and the ratios ‖g_k‖ / ‖g_0‖ up to it."""
    z, ratios = torch.zeros_like(c), []
    for k in range(limit + 1):
        g = A @ z + c - z
        ratios.append((g.norm() / c.norm()).item())          # z₀ = 0, so g₀ = c
        if ratios[-1] <= tol:
            return k, ratios
        z = z + g
    raise RuntimeError(f"no convergence in {limit} iterations")   # pragma: no cover


def _iteration_hints(rho: float, tol: float) -> dict[int, str]:
    """What a student's answer means when it is one of the usual wrong formulas (if two formulas
    give the same number, the later one's hint wins)."""
    L = math.log(tol) / math.log(rho)
    float32 = torch.tensor(tol).log() / torch.tensor(rho).log()
    return {
        math.ceil(L) + 1: "One too many: one iteration fewer already brings the residual to ≤ tol "
                          "times the first (the first residual is z₀'s, after 0 iterations).",
        math.ceil(2 * L): "That is twice the answer: the residual shrinks by ρ per step, not by "
                          "√ρ.",
        math.ceil(L / 2): "That is half the answer: the residual (not its square) shrinks by ρ per "
                          "step.",
        math.ceil(math.log(1 / tol) / (1 - rho)):
            "That is the rule of thumb ln(1/tol)/(1 − ρ), from ln ρ ≈ −(1 − ρ): good only for ρ "
            "close to 1. Use ln ρ itself.",
        math.ceil(math.log(tol) / math.log10(rho)):
            "The two logarithms are in different bases (ln on one side, log10 on the other): use "
            "the same for both.",
        math.ceil(math.log10(tol) / math.log(rho)):
            "The two logarithms are in different bases (log10 on one side, ln on the other): use "
            "the same for both.",
        math.ceil(math.log(tol) / math.log(1 - rho)):
            "The residual shrinks by the factor ρ per step, not by 1 − ρ.",
        math.ceil(math.log(rho) / math.log(tol)):
            "ρ and tol are swapped: ρᵏ ≤ tol gives k ≥ ln tol / ln ρ.",
        int(torch.ceil(float32)):
            "That is ⌈ln tol / ln ρ⌉ computed in float32 (torch.tensor(0.9999) is float32, 7 "
            "digits): for ρ close to 1, ln ρ needs more. Use math.log, or float64 tensors.",
        math.floor(L):
            "That is rounded down (int() and round() can both do that): after that many "
            "iterations ρᵏ is still above tol. The answer is the smallest whole k with ρᵏ ≤ tol: "
            "round *up* (math.ceil).",
    }


def _check_iterations_on_orthogonal(got: float, rho: float, tol: float, seed: int, hint: str):
    """got against forward iteration on z ↦ ρ Q z + c, Q orthogonal, where ‖g_k‖ = ρᵏ ‖g_0‖
    exactly: step by step, or (for a count too long to run here) by (ρQ)ᵏ g₀ at k and k − 1."""
    A = rho * _orthogonal(seed)
    c = torch.randn(6, generator=torch.Generator().manual_seed(100 + seed), dtype=DT)
    L = math.log(tol) / math.log(rho)
    call, where = f"iterations_to_tol({rho!r}, {tol!r})", f"on z ↦ {rho}·Q z + c, Q orthogonal"
    if got != int(got):
        raise _fail(call, f"returned {got!r}, not a whole number of iterations.",
                    "Round up (math.ceil) to a whole number: the smallest k with ρᵏ ≤ tol."
                    if abs(got - L) < 1e-6 * abs(L) + 1e-9 else hint)
    got = int(got)
    if got < 0:
        raise _fail(call, f"returned {got}, a negative number of iterations.",
                    "ln ρ and ln tol are both negative (ρ and tol are below 1), so their ratio is "
                    "positive: one of your logarithms has the wrong sign (ln(1/ρ) = −ln ρ).")
    specific = _iteration_hints(rho, tol).get(got, hint)
    if L < 3000:
        measured, ratios = _first_below(A, c, tol)
        if got != measured:
            shown = (f" (after {got} it was {ratios[got]:.4g} × the first, above tol)"
                     if got < measured else "")
            raise _fail(call, f"returned {got}; {where}, forward iteration's residual first fell "
                        f"to {tol:g} × its first value after {measured} iterations{shown}.",
                        specific)
        return
    if got > 10 * L + 100:
        raise _fail(call, f"returned {got}, more than ten times the iterations needed.", specific)

    def ratio(k: int) -> float:                              # ‖g_k‖ / ‖g_0‖ with g_k = (ρQ)ᵏ c
        return (torch.linalg.matrix_power(A, k) @ c).norm().item() / c.norm().item()

    if not (got >= 1 and ratio(got) <= tol < ratio(got - 1)):
        raise _fail(call, f"returned {got}; {where}, the residual after {got} iterations is "
                    f"{ratio(got):.4g} × the first (it has to be ≤ {tol:g}, and above it one "
                    f"iteration before).", specific)


@exercise
def check_iterations_to_tol(fn: Callable) -> bool:
    """fn(rho, tol) -> the smallest whole k with ρᵏ ≤ tol: the forward iterations a contraction of
    rate ρ needs to shrink its residual by the factor tol; compared with real runs."""
    hint = ("Each forward iteration multiplies the residual by ρ (exactly, on these maps), so "
            "after k of them it is ρᵏ times the first. Find the smallest whole k with ρᵏ ≤ tol: take "
            "logarithms (ln ρ and ln tol are both negative: dividing by a negative number flips "
            "the inequality), and round up.")
    convert = _whole_number("iterations_to_tol")
    # none of these ln tol / ln ρ is near a whole number, so the rounding decides; the first pair
    # tells the usual wrong formulas apart; the last is 138 149 iterations
    families = [(0.9, 1e-6), (0.97, 1e-8), (0.5, 1e-3), (0.2, 1e-10), (0.999, 0.5), (0.05, 0.3),
                (0.99, 1e-6), (0.9999, 1e-6)]
    for seed, (rho, tol) in enumerate(families):
        got = _call(fn, "iterations_to_tol", rho, tol, convert=convert)
        _check_iterations_on_orthogonal(got, rho, tol, seed, hint)
    # symmetric maps of spectral radius ρ (top eigenvalue −ρ: an oscillating mode), started
    # mostly along that mode: the count is ρ's, give or take an iteration or two
    Q = _orthogonal(20)
    eigenvalues = torch.tensor([-1.0, 0.9, 0.6, 0.3, -0.5, 0.1], dtype=DT)
    for rho, tol in [(0.95, 1e-7), (0.8, 1e-4)]:
        A = rho * Q @ torch.diag(eigenvalues) @ Q.T
        measured, _ = _first_below(A, Q[:, 0] + 0.05 * Q[:, 1:].sum(1), tol)
        got = _call(fn, "iterations_to_tol", rho, tol, convert=convert)
        if not abs(got - measured) <= max(2, 0.05 * measured):
            raise _fail(f"iterations_to_tol({rho!r}, {tol!r})", f"returned {got!r}; on z ↦ A z + c "
                        f"with A symmetric of spectral radius {rho} (top eigenvalue −{rho}), "
                        f"forward iteration needed {measured} iterations.", hint)
    return _passed("iterations_to_tol", "matches real forward-iteration runs on maps of rate ρ "
                   "from 0.05 to 0.9999 (1 to 138149 iterations), orthogonal and symmetric")


# -- broyden_update

def _broyden_case(seed: int, batch: int, d: int, dtype=DT, scale: float = 1.0):
    """(B, dz, dg): non-symmetric estimates near −I, random steps; dz, dg of size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=DT)
    B = -eye + 0.4 * torch.randn(batch, d, d, generator=g, dtype=DT) / d ** 0.5
    dz = scale * torch.randn(batch, d, generator=g, dtype=DT)
    J = 0.5 * torch.randn(batch, d, d, generator=g, dtype=DT) / d ** 0.5 - eye
    dg = (J @ dz[..., None])[..., 0]                            # Δg ≈ J_g Δz
    return B.to(dtype), dz.to(dtype), dg.to(dtype)


def _broyden_zero_case():
    """Three samples: an ordinary one; Δz = Δg = 0 (a sample that stopped moving; 0/0); and
    Δz ≠ 0 with Δzᵀ B Δg exactly 0 (B = −I, Δz = e₁, Δg = e₂: a finite numerator over 0)."""
    B, dz, dg = _broyden_case(7, 3, 5)
    eye = torch.eye(5, dtype=DT)
    B[2] = -eye
    dz[1], dg[1] = 0.0, 0.0
    dz[2], dg[2] = eye[0], eye[1]
    return B, dz, dg


def _broyden_wrong(B, dz, dg) -> dict[str, torch.Tensor]:
    """Updates a student may write instead, each under the hint that names it."""
    B, dz, dg, dtype = B.double(), dz.double(), dg.double(), B.dtype
    B_dg, B_dz = (B @ dg[..., None])[..., 0], (B @ dz[..., None])[..., 0]
    dzT_B = (dz[:, None, :] @ B)[:, 0]
    denom = (dzT_B * dg).sum(-1)[:, None, None]
    col = (dz - B_dg)[:, :, None]
    per_sample = lambda a, b: (a * b).sum(-1)[:, None, None]  # noqa: E731
    wrong = {
        "That is the *bad* Broyden update, with Δgᵀ / (Δgᵀ Δg) as the row: it meets the secant "
        "condition too, but the good update's row is Δzᵀ B, divided by Δzᵀ B Δg.":
            B + col * dg[:, None, :] / per_sample(dg, dg),
        "Δzᵀ B is the row vector (Bᵀ Δz)ᵀ: per sample `dz @ B`, not `B @ dz` (B is not "
        "symmetric).":
            B + col * B_dz[:, None, :] / denom,
        "The outer product is the wrong way round: the column is Δz − B Δg and the row is Δzᵀ B, "
        "so the change is (Δz − B Δg)[:, :, None] * (Δzᵀ B)[:, None, :].":
            B + dzT_B[:, :, None] * (dz - B_dg)[:, None, :] / denom,
        "The denominator is Δzᵀ B Δg (with B in the middle), not Δzᵀ Δg.":
            B + col * dzT_B[:, None, :] / per_sample(dz, dg),
        "The correction is *added*: B + (Δz − B Δg)(Δzᵀ B) / (Δzᵀ B Δg).":
            B - col * dzT_B[:, None, :] / denom,
        "That is the update of a *Jacobian* estimate (it maps Δz to Δg). Here B estimates the "
        "inverse J_g⁻¹, which maps Δg to Δz: B + (Δz − B Δg)(Δzᵀ B) / (Δzᵀ B Δg).":
            B + (dg - B_dz)[:, :, None] * dz[:, None, :] / per_sample(dz, dz),
        "The denominator must be each sample's own Δzᵀ B Δg (sum over the state, dim=-1), not a "
        "sum over the whole batch.":
            B + col * dzT_B[:, None, :] / (dzT_B * dg).sum(),
    }
    return {hint: value.to(dtype) for hint, value in wrong.items()}


def _check_broyden_sample_rules(got, B, dz, dg, where: str, specific: str) -> None:
    """Per sample: finite; B unchanged where Δzᵀ B Δg = 0; the secant condition B_new Δg = Δz
    and a rank-one change elsewhere."""
    f32 = B.dtype == torch.float32
    denom = ((dz[:, None, :] @ B)[:, 0] * dg).sum(-1)
    skip = denom == 0
    bad = ~torch.isfinite(got).flatten(1).all(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _fail(where, f"sample {i}'s B_new holds NaN or inf.",
                    "A sample whose denominator Δzᵀ B Δg is 0 (Δz = 0: it has stopped moving) "
                    "would divide by zero: keep that sample's B as it is (torch.where on a mask "
                    "of the samples whose denominator is not 0, with a safe denominator such as "
                    "1 where it is)." if bool(skip[i]) else specific)
    for i in skip.nonzero().flatten().tolist():
        if not torch.equal(got[i], B[i]):
            kind = "Δz = 0" if not dz[i].any() else "Δz ≠ 0, Δz ⟂ B Δg"
            raise _fail(where, f"sample {i} has Δzᵀ B Δg = 0 ({kind}), and its B changed "
                        f"(largest change {(got[i] - B[i]).abs().max().item():.3g}).",
                        "Where the denominator is 0 the update is undefined: leave that sample's "
                        "B exactly as it is. (Adding a small eps to the denominator, or "
                        "nan_to_num, turns 0/0 into 0 but a finite numerator over 0 into a huge "
                        "change.)")
    B_new, dz64, dg64 = got.detach().double(), dz.double(), dg.double()
    secant = ((B_new @ dg64[..., None])[..., 0] - dz64).norm(dim=1)
    size = dz64.norm(dim=1) + B_new.flatten(1).norm(dim=1) * dg64.norm(dim=1)
    off = ~skip & (secant > (1e-4 if f32 else 1e-9) * size)
    if off.any():
        i = int(off.nonzero()[0])
        raise _fail(where, f"sample {i}: ‖B_new Δg − Δz‖ = {secant[i].item():.3g} (relative "
                    f"{secant[i].item() / size[i].item():.1e}); the secant condition B_new Δg = Δz "
                    f"does not hold.",
                    f"Your update left B unchanged here, where Δzᵀ B Δg = {denom[i].item():.1e} "
                    f"is small but not 0: skip a sample only when its denominator is exactly 0. "
                    f"An absolute threshold (|Δzᵀ B Δg| < 1e-10) switches the updates off near "
                    f"convergence, where steps are tiny and the updates matter."
                    if torch.equal(got[i], B[i]) else specific)
    change = (B_new - B.double())[~skip]
    if change.numel():
        sv = torch.linalg.svdvals(change)
        off = sv[:, 1] > (1e-4 if f32 else 1e-9) * sv[:, 0]
        if off.any():
            shown = [round(v, 6) for v in sv[int(off.nonzero()[0])].tolist()[:3]]
            raise _fail(where, f"B_new − B has rank > 1 (its largest singular values {shown}).",
                        "Broyden's update changes B by one outer product u vᵀ per sample: "
                        "u = (Δz − B Δg) / (Δzᵀ B Δg), v = Bᵀ Δz.")


@exercise
def check_broyden_update(fn: Callable) -> bool:
    """fn(B, dz, dg) -> B + (Δz − B Δg)(Δzᵀ B) / (Δzᵀ B Δg) per sample, B (batch, D, D) and
    dz, dg (batch, D); a sample whose denominator is zero keeps its B."""
    hint = ("Per sample: B_new = B + (Δz − B Δg)(Δzᵀ B) / (Δzᵀ B Δg); the change is an outer "
            "product, column Δz − B Δg and row Δzᵀ B, computed for the whole batch at once with "
            "batched products (@ with a None axis, or einsum).")
    families = [("a batch of 4, D = 6", _broyden_case(0, 4, 6)),
                ("one sample, D = 5", _broyden_case(1, 1, 5)),
                ("a batch of 3, D = 9", _broyden_case(2, 3, 9)),
                ("B₀ = −I for every sample (an expanded tensor, as in the notebook's loop)",
                 (-torch.eye(5, dtype=DT).expand(4, 5, 5), *_broyden_case(3, 4, 5)[1:])),
                ("float32, a batch of 3, D = 6", _broyden_case(4, 3, 6, dtype=torch.float32)),
                ("tiny steps (‖Δz‖ ≈ 1e-9, so Δzᵀ B Δg ≈ 1e-18), a batch of 2, D = 4",
                 _broyden_case(5, 2, 4, scale=1e-9)),
                ("a batch whose sample 1 has Δz = Δg = 0 and sample 2 has Δzᵀ B Δg = 0",
                 _broyden_zero_case())]
    for what, (B, dz, dg) in families:
        f32 = B.dtype == torch.float32
        expected = references.broyden_update(B.double(), dz.double(), dg.double()).to(B.dtype)
        got = _call(fn, "broyden_update", B, dz, dg)
        where = f"broyden_update on {what}"
        if not isinstance(got, torch.Tensor) or got.shape != B.shape or got.dtype != B.dtype:
            _compare(got, expected, where, hint)                   # names the shape or dtype
        specific = _which(got, _broyden_wrong(B, dz, dg), hint)
        _check_broyden_sample_rules(got, B, dz, dg, where, specific)
        _compare(got, expected, where, specific, rtol=1e-4 if f32 else 1e-9,
                 atol=1e-5 if f32 else 1e-12)
    return _passed("broyden_update", "the secant condition, a rank-one change, equal to the "
                   "formula for batches of 1 to 4, D = 4 to 9, float32 and tiny steps; a sample "
                   "with a zero denominator keeps its B")


# -- anderson_fixed

def _anderson_with_a_bug(f, z0, tol=1e-6, max_iter=100, m=5, lam=1e-4, *, fixed=False,
                         window=0, mix_x=False, fixed_lam=False):
    """The notebook's locked ``anderson_with_a_bug``: y / y.sum() over the whole batch; with
    ``fixed``, normalized per sample instead, and then (for the check's hints) a history of
    m + window pairs, the x_i mixed instead of the f_i, or a ridge lam not scaled by s."""
    Xs, Fs = [z0], [f(z0)]
    residuals = [((Fs[0] - Xs[0]).norm() / Fs[0].norm()).item()]
    while len(residuals) < max_iter and residuals[-1] > tol:
        R = torch.stack(Fs, 1).flatten(2) - torch.stack(Xs, 1).flatten(2)
        H = torch.einsum("bid,bjd->bij", R, R)
        ridge = (1.0 if fixed_lam else H.diagonal(dim1=1, dim2=2).mean(1)) * lam + 1e-30
        ridge = ridge * torch.ones_like(H[:, 0, 0])
        eye = torch.eye(len(Xs), dtype=H.dtype, device=H.device)
        w = torch.linalg.solve(H + ridge[:, None, None] * eye, torch.ones_like(H[:, :, 0]))
        alpha = w / w.sum(1, keepdim=True) if fixed else w / w.sum()
        x = (alpha[:, :, None] * torch.stack(Xs if mix_x else Fs, 1).flatten(2)).sum(1)
        x = x.reshape(z0.shape)
        Xs, Fs = (Xs + [x])[-(m + window):], (Fs + [f(x)])[-(m + window):]
        residuals.append(((Fs[-1] - Xs[-1]).norm() / Fs[-1].norm()).item())
    return Xs[-1], residuals


def _mixable_problem(seed: int = 11, batch: int = 3, d: int = 6):
    """f for a batch, f for each sample alone (tanh(z Wᵀ + u) with that sample's u), and z0."""
    W, U, b, x = _tanh_problem(seed, batch=batch, d_in=3, d=d, scale=0.9)
    u = x @ U.T + b

    def f_of(rows):
        return lambda z: torch.tanh(z @ W.T + u[rows])
    alone = [f_of(slice(i, i + 1)) for i in range(batch)]
    return f_of(slice(None)), alone, torch.zeros(batch, d, dtype=DT)


_ANDERSON_VARIANTS = {
    "The history must hold exactly the last m pairs: drop the oldest once it holds m (not "
    "m + 1).": dict(window=1),
    "The history must hold exactly the last m pairs, not m − 1.": dict(window=-1),
    "The new iterate is Σ α_i f(x_i), not Σ α_i x_i.": dict(mix_x=True),
    "The ridge is lam · s, with s each sample's mean ‖g_i‖² (section 3: a fixed ridge turns "
    "Anderson into averaging).": dict(fixed_lam=True),
}


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(_close(p, q, 1e-9) for p, q in zip(a, b))


@exercise
def check_anderson_fixed(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter, m, lam) -> (z, residuals): Anderson acceleration without the bug
    of notebook 02's anderson_with_a_bug; the rules of check_anderson, and a sample's iterates
    that do not depend on the rest of its batch."""
    name = "anderson_fixed"
    if fn is references.anderson:
        raise CheckFailed("anderson_fixed is deqlite's reference anderson, not your fix: write the "
                          "fixed function yourself (it may call your own anderson).")
    hint = ("Anderson's weights are per sample: every sum and mean that builds them runs over a "
            "sample's own history and state, never over the batch; then Σα = 1 for each sample.")

    def run(f, z0, max_iter, **options):
        counted = _Counted(f, "f", 4 * max_iter + 20, f" with max_iter={max_iter}")
        return _call(fn, name, counted, z0, max_iter=max_iter, **options, convert=_solver_out(name))

    # the given bug, still there?
    what, f, z0 = _solver_problems()[0]
    _, got = run(f, z0, 12, tol=1e-10, m=5)
    if _same(got, _anderson_with_a_bug(f, z0, tol=1e-10, max_iter=12, m=5)[1]):
        raise _fail(f"{name} on {what}", f"it takes the very same steps as anderson_with_a_bug "
                    f"(residuals {', '.join(f'{r:.3g}' for r in got[:4])}, …): the bug is still "
                    f"in it.", "The notebook showed that the given function is right on one "
                    "sample and wrong on a batch: look for the line where the samples meet.")
    # a sample's iterates must not depend on the rest of the batch
    f_batch, f_alone, z0 = _mixable_problem()
    z_batch, _ = run(f_batch, z0, 8, tol=0.0, m=3)
    for i, f_i in enumerate(f_alone):
        z_i, _ = run(f_i, z0[i:i + 1], 8, tol=0.0, m=3)
        _compare(z_batch[i:i + 1], z_i, f"{name}, 8 evaluations with m=3: sample {i} of a batch of "
                 f"3 against sample {i} solved alone", "A sample's iterates must not depend on the "
                 "other samples in the batch. " + hint, rtol=1e-8, atol=1e-10)
    # step by step against the reference (as check_anderson), with the default ridge and another
    for (what, f, z0), lam in [(p, 1e-4) for p in _solver_problems()[::2]] + \
                               [(_solver_problems()[0], 1e-2)]:
        _, expected = references.anderson(f, z0, tol=1e-10, max_iter=12, m=2, lam=lam)
        _, got = run(f, z0, 12, tol=1e-10, m=2, lam=lam)
        for i, (r_got, r_ref) in enumerate(zip(got, expected)):
            if not _close(r_got, r_ref, 1e-4):
                specific = next(
                    (text for text, variant in _ANDERSON_VARIANTS.items() if _same(got, (
                        _anderson_with_a_bug(f, z0, 1e-10, 12, 2, lam, fixed=True, **variant)[1]))),
                    "Fix the one bug and change nothing else: the history holds exactly the last "
                    "m pairs, the new iterate is Σ α_i f(x_i), and the ridge is lam · s with s "
                    "each sample's mean ‖g_i‖² (use the argument lam).")
                raise _fail(f"{name} with m=2, lam={lam:g} on {what}, residual {i}",
                            f"expected {r_ref!r}, got {r_got!r} (the first {i} agree).", specific)
    # the rules every solver exercise shares, and the history must pay off (as check_anderson)
    steps = _check_solver(fn, name, hint, m=5)
    what, f, z0 = _solver_problems()[0]
    _, plain = run(f, z0, 500, tol=1e-10, m=1)
    if steps >= len(plain):
        raise _fail(f"{name} with m=5 against m=1", f"{steps} iterations, no fewer than with m=1 "
                    f"({len(plain)}): the history is not being used.", hint)
    # float32 in, float32 out
    W, U, b, x = _tanh_problem(12, batch=2, d=5, scale=0.8, dtype=torch.float32)
    u32 = x @ U.T + b
    f32 = lambda z: torch.tanh(z @ W.T + u32)  # noqa: E731
    z32 = torch.zeros(2, 5, dtype=torch.float32)
    z_ref, _ = references.anderson(f32, z32, tol=1e-6, max_iter=100, m=3)
    z_got, _ = run(f32, z32, 100, tol=1e-6, m=3)
    _compare(z_got, z_ref, f"{name} on a float32 problem (batch 2, D = 5)", hint, rtol=1e-4,
             atol=1e-5)
    return _passed(name, f"samples solved independently, the reference's iterates, the fixed "
                   f"point in ≤ {steps} iterations (m=1: {len(plain)}), one f per iteration, "
                   f"float32")
