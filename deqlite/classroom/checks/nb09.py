"""Checks for notebook 09's exercises (gradient shortcuts)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import references
from ._harness import (_call, _compare, _Counted, DT, exercise, _fail, _jacobians, _numbered,
                       _passed, _TooManyCalls, _vjp_of, _which)


@exercise
def check_neumann_adjoint(fn: Callable) -> bool:
    """fn(vjp, grad, k) -> g = Σ_{i<k} (Jᵀ)ⁱ grad, the first k terms of the Neumann series of
    (I − Jᵀ)⁻¹ grad, where vjp(y) = Jᵀ y (per sample)."""
    g_ = torch.Generator().manual_seed(0)
    J = torch.randn(4, 6, 6, generator=g_, dtype=DT)                 # not symmetric: Jᵀ ≠ J
    J *= 0.8 / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    grad = torch.randn(4, 6, generator=g_, dtype=DT)
    vjp = lambda y: (y[:, None, :] @ J).squeeze(1)  # noqa: E731  (yᵀ J, i.e. Jᵀ y, per sample)
    hint = ("k terms: i = 0, …, k − 1. The first term is grad itself (i = 0, no product), and "
            "each next term is vjp of the previous *term* (not of the running sum): "
            "term ← vjp(term), g ← g + term. With k = 1 the answer is grad (that is JFB).")
    for k in (1, 2, 3, 10):
        expected, term = torch.zeros_like(grad), grad
        for _ in range(k):
            expected, term = expected + term, vjp(term)
        counted = _Counted(vjp, "vjp", 10 * k * k + 10)
        got = _call(fn, "neumann_adjoint", counted, grad.clone(), k)
        _compare(got, expected, f"neumann_adjoint with k={k} on a batch of 4 random 6×6 Jacobians",
                 hint, rtol=1e-10, atol=1e-12)
        if counted.calls > k:
            raise _fail(f"neumann_adjoint with k={k}", f"the value is right, but it took "
                        f"{counted.calls} vector–Jacobian products; k − 1 are enough (k if you "
                        f"compute one term too many and drop it).", "Keep the last term and apply "
                        "vjp to it once per step (term ← vjp(term)), instead of recomputing "
                        "(Jᵀ)ⁱ grad from grad for every i: that costs i products for term i.")
    J4, grad4 = _jacobians(5, batch=2, d=8)
    grad4 = grad4.reshape(2, 2, 2, 2)
    vjp4 = _vjp_of(J4, grad4.shape)
    expected, term = torch.zeros_like(grad4), grad4
    for _ in range(4):
        expected, term = expected + term, vjp4(term)
    _compare(_call(fn, "neumann_adjoint", vjp4, grad4, 4), expected, "neumann_adjoint with k=4 "
             "on image-shaped gradients (2, 2, 2, 2)", hint, rtol=1e-10, atol=1e-12)
    exact = torch.linalg.solve(torch.eye(6, dtype=DT) - J.transpose(1, 2), grad[..., None])[..., 0]
    got = _call(fn, "neumann_adjoint", vjp, grad.clone(), 200)
    _compare(got, exact, "neumann_adjoint with k=200 against the exact adjoint (I − Jᵀ)⁻¹ grad",
             hint, rtol=1e-8, atol=1e-10)
    return _passed("neumann_adjoint", "the truncated series for k = 1, 2, 3, 10; the exact adjoint "
                   "for k = 200")


class _PhantomCell(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Uᵀ + b) on the flattened state, returned in z's shape; counts its
    evaluations (``calls``) and those that record a graph (``graph_calls``), and stops a loop that
    calls it more than ``limit`` times."""

    def __init__(self, seed: int, d: int, d_in: int, dtype: torch.dtype, scale: float = 0.8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=DT)
        W *= scale / torch.linalg.matrix_norm(W, ord=2)               # a contraction, Wᵀ ≠ W
        self.W = nn.Parameter(W.to(dtype))
        self.U = nn.Parameter(torch.randn(d, d_in, generator=g, dtype=DT).to(dtype))
        self.b = nn.Parameter(torch.randn(d, generator=g, dtype=DT).to(dtype))
        self.calls = self.graph_calls = 0
        self.limit, self.why = None, ""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise _TooManyCalls(f"called f more than {self.limit} times{self.why}, so this "
                                f"check stopped it.")
        out = torch.tanh(z.flatten(1) @ self.W.T + x @ self.U.T + self.b).reshape(z.shape)
        self.graph_calls += bool(out.requires_grad)
        return out


_CASES = [(3, 0.3), (1, 1.0), (2, 1.0), (5, 1.0), (1, 0.5), (2, 0.5), (5, 0.5)]
_PHANTOM_HINT = ("From z_0 = z* (detached from the solver), take k steps z_{j+1} = (1 − τ) z_j + "
                 "τ f(z_j, x), each recorded by autograd (no torch.no_grad(), no .detach() inside "
                 "the loop), and return z_k: k evaluations of f in all.")


def _phantom_variants(f, z0, x, k, tau) -> dict[str, torch.Tensor]:
    """What the typical mistakes return, each keyed by the hint that names it."""
    def run(step):
        z = z0.detach()
        for j in range(k):
            z = step(j, z)
        return z

    return {
        "You damp the wrong way round: the step is (1 − τ) z_j + τ f(z_j, x) (τ weighs the new "
        "value f), not τ z_j + (1 − τ) f(z_j, x).":
            run(lambda j, z: tau * z + (1 - tau) * f(z, x)),
        "Only your first step is damped: every step is z_{j+1} = (1 − τ) z_j + τ f(z_j, x), the "
        "same τ on each of the k steps.":
            run(lambda j, z: (1 - tau) * z + tau * f(z, x) if j == 0 else f(z, x)),
        "τ is not used: your steps are z_{j+1} = f(z_j, x); the damped step is (1 − τ) z_j + "
        "τ f(z_j, x).":
            run(lambda j, z: f(z, x)),
        "You detach z inside the loop: then only the last step's ∂f/∂θ reaches the gradient and "
        "J never enters it (JFB scaled by τ, whatever k). Detach z* once, before the loop, and "
        "let autograd record all k steps.":
            run(lambda j, z: (1 - tau) * z.detach() + tau * f(z.detach(), x)),
    }


def _grads(out: torch.Tensor, w: torch.Tensor, inputs: list[torch.Tensor]) -> list:
    return list(torch.autograd.grad((out * w).sum(), inputs, allow_unused=True,
                                    retain_graph=True))


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def _check_phantom_case(fn, what, f, z_star, x, k, tau, w, at_fixed_point, z_star_grad):
    f32 = z_star.dtype == torch.float32
    rtol, atol = (1e-5, 1e-6) if f32 else (1e-10, 1e-12)
    where = f"{what}, k = {k}, τ = {tau}"
    params = list(f.parameters())
    expected = references.phantom(f, z_star, x, k, tau)
    expected_grads = _grads(expected, w, [x, *params])
    if k == 1 and tau == 1.0 and at_fixed_point:     # the JFB gradient, computed as such
        expected_grads = _grads(f(z_star.detach(), x), w, [x, *params])
    variants = _phantom_variants(f, z_star, x, k, tau)
    variant_grads = {h: _flat(_grads(v, w, [x, *params])) for h, v in variants.items()
                     if v.requires_grad}
    f.calls = f.graph_calls = 0
    f.limit, f.why = 10 * (k + 1), f" for k = {k} (k steps take k evaluations)"
    got = _call(fn, "phantom", f, z_star, x, k, tau)
    f.limit = None
    if f.calls == 0:
        raise _fail(f"phantom on {where}", "it never evaluated f.", _PHANTOM_HINT)
    if isinstance(got, torch.Tensor) and got.grad_fn is None:
        if f.graph_calls == 0:
            raise _fail(f"phantom on {where}", "z_k carries no graph: f was evaluated only "
                        "without one (under torch.no_grad(), or on detached parameters), so "
                        "backpropagating through z_k gives no gradient at all.",
                        "The phantom gradient *is* backpropagation through the k steps: let "
                        "autograd record them (no torch.no_grad()); only z* is detached.")
        raise _fail(f"phantom on {where}", "the result carries no graph although f was "
                    f"evaluated {f.graph_calls} time(s) with one: you returned the starting point "
                    "z_0 = z* (or a detached z), not z_k.",
                    "Return the last iterate z_k, and keep the steps (1 − τ) z_j + τ f(z_j, x) "
                    "on the graph (with τ = 1 a step is f(z_j, x), not z_j).")
    if f.graph_calls != k or f.calls != k:
        if f.graph_calls == k + 1:
            detail = (f"it evaluated f {f.graph_calls} times with a graph for k = {k}: one step "
                      f"too many (k + 1 steps). z_0 = z* costs no evaluation; the k steps "
                      f"z_0 → z_1 → … → z_k are k evaluations.")
        elif f.graph_calls == k - 1 and f.calls == k - 1:
            detail = (f"it evaluated f {f.graph_calls} times for k = {k}: one step too few "
                      f"(k − 1 steps). The k steps z_0 → z_1 → … → z_k are k evaluations.")
        elif f.graph_calls < k and f.calls >= k:
            detail = (f"only {f.graph_calls} of its {f.calls} evaluations of f recorded a graph "
                      f"(the others ran under torch.no_grad() or on detached inputs): the "
                      f"phantom gradient backpropagates through all k = {k} steps, so each of "
                      f"them must be recorded.")
        elif f.graph_calls == k:
            detail = (f"it evaluated f {f.calls} times for k = {k} ({f.calls - k} without a "
                      f"graph): k evaluations are enough (a residual ‖f(z_j) − z_j‖, if you want "
                      f"it, comes from the f(z_j, x) the step already computed).")
        else:
            detail = (f"it evaluated f {f.calls} times ({f.graph_calls} with a graph) for "
                      f"k = {k}: one evaluation per step, k in all (compute f(z_j, x) once per "
                      f"step and reuse it).")
        raise _fail(f"phantom on {where}", detail, _PHANTOM_HINT)
    value_hint = _which(got, variants, _PHANTOM_HINT)
    if at_fixed_point:
        value_hint = ("At a fixed point every damped step leaves z* where it is, so z_k = z* in "
                      "value (only the gradient differs from the identity): " + value_hint)
    _compare(got, expected, f"phantom's value on {where}", value_hint, rtol=rtol, atol=atol)
    inputs = [x, *params] + ([z_star] if z_star_grad else [])
    got_grads = _grads(got, w, inputs)
    if z_star_grad and got_grads[-1] is not None:
        raise _fail(f"phantom on {where}, with a z_star that requires grad (as the solver's "
                    f"output would if the solve were recorded)", "a gradient reached z_star: "
                    "your graph runs back into the solver.", "Start the steps from "
                    "z_star.detach(): the phantom gradient treats z* as a constant starting "
                    "point, so nothing flows into the (possibly huge) graph of the solve.")
    names = ["x", "W", "U", "b"]
    for name, g_got in zip(names, got_grads):
        if g_got is None:
            raise _fail(f"phantom's gradient on {where}", f"no gradient reaches {name}: z_k does "
                        f"not depend on it.", "Call f(z_j, x) with the x and the f you were "
                        "given, on the graph (no .detach() of x or of f's output).")
    grad_hint = _which(_flat(got_grads[:4]), variant_grads,
                       "The values are right but the gradient is not: " + _PHANTOM_HINT)
    if k == 1 and tau == 1.0 and at_fixed_point:
        grad_hint = ("With k = 1 and τ = 1, z_1 = f(z*, x) and its gradient is JFB's. "
                     + grad_hint)
    f_rtol, f_atol = (1e-4, 1e-5) if f32 else (1e-10, 1e-12)
    for name, g_got, g_exp in zip(names, got_grads, expected_grads):
        _compare(g_got, g_exp, f"phantom's gradient with respect to {name} on {where}"
                 + (" (JFB's gradient)" if k == 1 and tau == 1.0 and at_fixed_point else ""),
                 grad_hint, rtol=f_rtol, atol=f_atol)


@exercise
def check_phantom(fn: Callable) -> bool:
    """fn(f, z_star, x, k, tau) -> z_k after k damped steps z_{j+1} = (1 − τ) z_j + τ f(z_j, x)
    from z_0 = z* (detached), with the graph through them: k evaluations of f."""
    families = [  # what, seed, state shape, d_in, dtype, at the fixed point, z_star requires grad
        ("a batch of 3 states away from the fixed point", 0, (3, 5), 2, DT, False, False, _CASES),
        ("a batch of 4 states at the fixed point", 1, (4, 6), 3, DT, True, True, _CASES),
        ("one image-shaped state (1, 3, 2, 2) at the fixed point", 2, (1, 3, 2, 2), 3, DT, True,
         False, [(3, 0.3), (1, 1.0), (2, 0.5), (5, 0.5)]),
        ("image-shaped float32 states (2, 2, 2, 2) away from the fixed point", 3, (2, 2, 2, 2), 3,
         torch.float32, False, False, [(3, 0.3), (2, 0.5), (5, 1.0)]),
    ]
    for what, seed, shape, d_in, dtype, at_fp, z_star_grad, cases in families:
        f = _PhantomCell(seed, math.prod(shape[1:]), d_in, dtype)
        g = torch.Generator().manual_seed(seed + 100)
        x = torch.randn(shape[0], d_in, generator=g, dtype=DT).to(dtype).requires_grad_()
        z = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        if at_fp:
            with torch.no_grad():
                for _ in range(300):                      # ‖J‖ ≤ 0.8: exact to rounding
                    z = f(z, x)
        w = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        for k, tau in cases:
            z_star = z.clone().requires_grad_(z_star_grad)
            _check_phantom_case(fn, what, f, z_star, x, k, tau, w, at_fp, z_star_grad)
    return _passed("phantom", "the damped iterate's value (z* at a fixed point) and its gradient "
                   "for k = 1, 2, 3, 5 and τ = 1, 0.5, 0.3 (k = 1, τ = 1: JFB's), k evaluations "
                   "of f, nothing flows into z*; one sample, image shapes, float32")


def _normal_jacobian(seed: int, rho: float, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A normal J = Q B Qᵀ with spectral radius ρ (B block-diagonal: the eigenvalue ±ρ, a complex
    pair of modulus 0.9ρ, smaller real ones) and its eigenvector for |λ| = ρ."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]
    B = torch.zeros(d, d, dtype=DT)
    B[0, 0] = rho if seed % 2 == 0 else -rho
    angle = 1.0 + seed
    B[1:3, 1:3] = 0.9 * rho * torch.tensor([[math.cos(angle), -math.sin(angle)],
                                            [math.sin(angle), math.cos(angle)]], dtype=DT)
    B[3:, 3:] = torch.diag(rho * (2 * torch.rand(d - 3, generator=g, dtype=DT) - 1) * 0.8)
    return Q @ B @ Q.T, Q[:, 0]


def _neumann_errors(J: torch.Tensor, v: torch.Tensor, k_max: int) -> list[float]:
    """Largest relative error over the batch v (n, d) of the k-term Neumann adjoint, k = 1..k_max,
    against the solved adjoint (I − Jᵀ) g = v: the series summed term by term, as in practice."""
    exact = torch.linalg.solve(torch.eye(J.shape[0], dtype=DT) - J.T, v.T).T
    g, term, errors = torch.zeros_like(v), v, []
    for _ in range(k_max):
        g, term = g + term, term @ J                       # (row vectors) term ← Jᵀ term
        errors.append(((g - exact).norm(dim=1) / exact.norm(dim=1)).max().item())
    return errors


@exercise
def check_neumann_terms_needed(fn: Callable) -> bool:
    """fn(rho, tol) -> the fewest Neumann terms k ≥ 1 whose adjoint has relative error ≤ tol
    for every v, for a normal J of spectral radius ρ."""
    hint = ("The dropped tail Σ_{i≥k} (Jᵀ)ⁱ v is (Jᵀ)ᵏ g (g the exact adjoint), so the relative "
            "error is ‖(Jᵀ)ᵏ g‖ / ‖g‖, at most ρᵏ for a normal J and equal to it when g lies "
            "along the slowest eigenvector. Return the smallest whole k ≥ 1 with ρᵏ ≤ tol.")
    cases = [(0.6, 1e-3), (0.85, 1e-2), (0.9, 1e-6), (0.3, 0.5), (0.99, 1e-3), (0.6, 0.2),
             (0.2, 1e-8)]
    measured = []
    for seed, (rho, tol) in enumerate(cases):
        J, top = _normal_jacobian(seed, rho)
        g = torch.Generator().manual_seed(seed + 50)
        u = torch.cat([top[None], torch.randn(3, J.shape[0], generator=g, dtype=DT)])
        v = u - u @ J                                       # v = (I − Jᵀ) u: the adjoint is u
        k_ref = references.neumann_terms_needed(rho, tol)
        errors = _neumann_errors(J, v, k_ref + 3)
        k_measured = next(k for k, e in enumerate(errors, 1) if e <= tol)
        measured.append(k_measured)
        got = _call(fn, "neumann_terms_needed", rho, tol, convert=_numbered("neumann_terms_needed"))
        where = f"neumann_terms_needed(rho={rho}, tol={tol:g})"
        if got != round(got):
            raise _fail(where, f"returned {got!r}, not a whole number of terms.",
                        "Round up: k is the smallest integer with ρᵏ ≤ tol (math.ceil), and at "
                        "least 1.")
        got = int(round(got))
        if got == k_measured:
            continue
        seen = (f"; after your {got}: {errors[got - 1]:.3g}" if 1 <= got <= len(errors) else "")
        near = ", ".join(f"{e:.3g}" for e in errors[max(0, k_measured - 2):k_measured + 1])
        detail = (f"returned {got}; summing the series on a normal J with ρ = {rho} and the "
                  f"worst-case v, the relative error first drops to tol after {k_measured} terms "
                  f"(error after k terms: {near} for k = {max(1, k_measured - 1)} to "
                  f"{k_measured + 1}{seen}).")
        specific = hint
        if got < 1:
            specific = ("k counts terms and the series has at least one (k = 1 is JFB, g = v, "
                        "error ρ): when tol ≥ ρ, one term is enough. " + hint)
        elif got == k_measured - 1:
            specific = ("One term too few: round *up* (the error after your k terms, ρᵏ, is "
                        "still above tol). " + hint)
        elif got == k_measured + 1:
            specific = ("One term too many: after k terms the error is ρᵏ (the tail starts at "
                        "(Jᵀ)ᵏ v), not ρᵏ⁻¹; k terms take k − 1 products. " + hint)
        elif got == max(1, math.ceil(math.log(tol * (1 - rho)) / math.log(rho))):
            specific = ("That is the absolute bound ‖J‖ᵏ ‖v‖ / (1 − ‖J‖) set to tol: the "
                        "question is the *relative* error ‖g_k − g‖ / ‖g‖, which has no "
                        "1/(1 − ρ) factor. " + hint)
        elif got == max(1, math.ceil(math.log(1 / tol) / (1 - rho))):
            specific = ("That uses log ρ ≈ −(1 − ρ), good only for ρ close to 1 (and always an "
                        "overestimate): use log ρ itself. " + hint)
        raise _fail(where, detail, specific)
    return _passed("neumann_terms_needed", "the measured number of terms on normal Jacobians "
                   f"with ρ from {min(r for r, _ in cases)} to {max(r for r, _ in cases)} "
                   f"(k = {', '.join(map(str, measured))})")
