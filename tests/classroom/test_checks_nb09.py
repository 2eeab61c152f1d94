"""Notebook 09's new exercises: the checks accept correct answers written in different ways and
reject the mistakes students make, with a message that names the mistake."""
import math

import torch

from deqlite.cells import MLPCell
from deqlite.classroom import checks, references
from deqlite.deq import DEQ


# ---- phantom: correct answers

def phantom(f, z_star, x, k, tau, way="right", steps=0, first_only=False, detach=True,
            detach_each=False, return_start=False, evals=1):
    """The damped steps, and (through the options) the variations a student might write."""
    z = z_star.detach() if detach else z_star
    z0 = z
    for j in range(k + steps):
        fz = f(z.detach() if detach_each else z, x)
        for _ in range(evals - 1):
            fz = f(z, x)
        if way == "wrong":
            z = tau * z + (1 - tau) * fz
        elif way == "undamped" or (first_only and j > 0):
            z = fz
        else:
            z = (1 - tau) * (z.detach() if detach_each else z) + tau * fz
    return z0 if return_start else z


def phantom_relaxation(f, z_star, x, k, tau):
    """z + τ (f(z) − z) on a copy, with the τ = 1 step written out: must pass."""
    z = z_star.detach().clone()
    for _ in range(k):
        fz = f(z, x)
        z = fz if tau == 1 else z + tau * (fz - z)
    return z


def phantom_leaf(f, z_star, x, k, tau):
    """Start from a new leaf (the IFT habit), a while loop: must pass."""
    z, j = z_star.detach().requires_grad_(), 0
    while j < k:
        z, j = torch.lerp(z, f(z, x), tau), j + 1
    return z


# ---- phantom: wrong answers

def phantom_no_grad(f, z_star, x, k, tau):
    with torch.no_grad():                            # "the steps are like the solver's"
        return phantom(f, z_star, x, k, tau)


def phantom_last_step_only(f, z_star, x, k, tau):
    """k − 1 steps without a graph, the last one with it (a truncated backprop)."""
    z = z_star.detach()
    with torch.no_grad():
        for _ in range(k - 1):
            z = (1 - tau) * z + tau * f(z, x)
    return (1 - tau) * z + tau * f(z, x)


def phantom_in_place(f, z_star, x, k, tau):
    z = z_star.detach()                              # shares z_star's storage ...
    for _ in range(k):
        fz = f(z.clone(), x)
        z.mul_(1 - tau).add_(tau * fz)               # ... so this changes the caller's z_star
    return z


def phantom_float64(f, z_star, x, k, tau):
    z = torch.zeros_like(z_star, dtype=torch.float64) + z_star.detach()
    for _ in range(k):
        z = (1 - tau) * z + tau * f(z, x)
    return z


def phantom_with_residuals(f, z_star, x, k, tau):
    """Right value, but the residual ‖f(z_k) − z_k‖ costs one more evaluation."""
    z = phantom(f, z_star, x, k, tau)
    with torch.no_grad():
        print(f"residual {(f(z, x) - z).norm():.2e}")
    return z


# ---- neumann_terms_needed

def neumann_terms_needed(rho, tol, rounding=math.ceil, offset=0, bound=False, linear=False):
    rate = -(1 - rho) if linear else math.log(rho)
    target = tol * (1 - rho) if bound else tol
    return max(1, rounding(math.log(target) / rate)) + offset


def neumann_terms_needed_loop(rho, tol):
    """Count terms until the worst error ρᵏ is below tol: must pass."""
    k = 1
    while rho ** k > tol:
        k += 1
    return k


CASES_09 = {
    "phantom": (checks.check_phantom, [phantom, phantom_relaxation, phantom_leaf,
                                       references.phantom], [
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, way="wrong"), "wrong way round"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, detach=False), "gradient reached z_star"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, steps=1), r"k \+ 1 steps"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, steps=-1), "k − 1 steps"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, first_only=True), "Only your first step"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, return_start=True), "starting point"),
        (phantom_no_grad, "no_grad"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, way="undamped"), "τ is not used"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, detach_each=True),
         "detach z inside the loop"),
        (lambda f, z, x, k, t: phantom(f, z, x, k, t, evals=2), "one evaluation per step"),
        (phantom_last_step_only, "recorded a graph"),
        (phantom_in_place, "changed its argument `z_star` in place"),
        (phantom_float64, "dtype"),
        (phantom_with_residuals, "without a graph"),
    ]),
    "neumann_terms_needed": (checks.check_neumann_terms_needed, [
        neumann_terms_needed, neumann_terms_needed_loop, references.neumann_terms_needed,
    ], [
        (lambda r, t: neumann_terms_needed(r, t, rounding=math.floor), "too few"),
        (lambda r, t: neumann_terms_needed(r, t, offset=1), "too many"),
        (lambda r, t: neumann_terms_needed(r, t, bound=True), r"no 1/\(1 − ρ\) factor"),
        (lambda r, t: neumann_terms_needed(r, t, linear=True), r"log ρ ≈ −\(1 − ρ\)"),
        (lambda r, t: math.log(t) / math.log(r), "whole number"),
        (lambda r, t: round(math.log(t) / math.log(r)), "too few"),
        (lambda r, t: math.ceil(math.log10(t) / math.log(r)), "slowest eigenvector"),
        (lambda r, t: math.ceil(math.log(r) / math.log(t)), "slowest eigenvector"),
        (lambda r, t: torch.tensor([3.0, 4.0]), "one number"),
    ]),
}

# ---- the references against the math and against deqlite

def test_phantom_reference_is_deqlites_phantom_rule_and_the_formula_at_the_fixed_point():
    """Backpropagating through references.phantom gives DEQ(backward="phantom")'s gradient, and at
    z* the adjoint τ Σ_{j<k} ((1 − τ) I + τ Jᵀ)ʲ v of the module docstring; k = 1, τ = 1 is JFB."""
    torch.manual_seed(0)
    cell = MLPCell(3, 5, weight_scale=0.8).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    params = list(cell.parameters())
    with torch.no_grad():
        z_star = DEQ(cell, tol=1e-13, max_iter=500)(x)
    for k, tau in [(1, 1.0), (2, 1.0), (5, 1.0), (1, 0.5), (5, 0.5), (3, 0.3)]:
        x_ = x.clone().requires_grad_()
        ours = torch.autograd.grad((references.phantom(cell, z_star, cell.inject(x_), k, tau) * w)
                                   .sum(), [x_, *params])
        x_ = x.clone().requires_grad_()
        deq = DEQ(cell, tol=1e-13, max_iter=500, backward="phantom",
                  backward_options=dict(k=k, tau=tau))
        theirs = torch.autograd.grad((deq(x_) * w).sum(), [x_, *params])
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        # the formula: adjoint g = τ Σ_j ((1 − τ) I + τ Jᵀ)ʲ w, then gᵀ ∂f/∂(x, θ) at z*
        x_, z_in = x.clone().requires_grad_(), z_star.clone().requires_grad_()
        f_z = cell(z_in, cell.inject(x_))
        g, term = torch.zeros_like(w), w
        for _ in range(k):
            g = g + tau * term
            jt = torch.autograd.grad(f_z, z_in, term, retain_graph=True)[0]     # Jᵀ term
            term = (1 - tau) * term + tau * jt
        formula = torch.autograd.grad(f_z, [x_, *params], g)
        for a, b in zip(ours, formula):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_neumann_terms_needed_reference_is_what_the_series_needs_on_a_normal_jacobian():
    from deqlite.classroom.checks.nb09 import _neumann_errors, _normal_jacobian
    for seed, (rho, tol) in enumerate([(0.5, 1e-3), (0.85, 1e-2), (0.95, 1e-4), (0.3, 0.5)]):
        J, top = _normal_jacobian(seed, rho)
        assert torch.allclose(J @ J.T, J.T @ J, atol=1e-12)          # normal
        assert abs(torch.linalg.eigvals(J).abs().max().item() - rho) < 1e-12
        k = references.neumann_terms_needed(rho, tol)
        errors = _neumann_errors(J, (top - top @ J)[None], k + 2)   # the worst-case v
        assert errors[k - 1] <= tol and (k == 1 or errors[k - 2] > tol)
        v = torch.randn(20, J.shape[0], dtype=torch.float64)         # any other v needs no more
        assert _neumann_errors(J, v, k)[k - 1] <= tol * (1 + 1e-9)
