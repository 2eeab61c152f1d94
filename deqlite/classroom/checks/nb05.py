"""Checks for notebook 05's exercises (Jacobian regularization)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import references
from ._harness import DT, CheckFailed, _fail, _call, _Counted, _compare, _numbered, _passed, exercise, _tanh_problem


def _tanh_state(seed: int):
    """A tanh cell's f_z = f(z) with a graph to z (z requires grad), and its exact ‖J‖²_F / d."""
    W, U, b, x = _tanh_problem(seed, scale=1.2)
    injection = x @ U.T + b
    z = torch.randn(injection.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=DT)
    J = (1 - torch.tanh(z @ W.T + injection) ** 2)[:, :, None] * W       # diag(tanh') W per sample
    z = z.requires_grad_()
    return torch.tanh(z @ W.T + injection), z, J.square().sum((1, 2)) / W.shape[0]


@exercise
def check_hutchinson(fn: Callable) -> bool:
    """fn(f_z, z, probes) -> (batch,) estimate of ‖J‖²_F / d, kept differentiable."""
    f_z, z, exact = _tanh_state(0)
    d = z.shape[1]
    # probes √d·e_i (i = 1..d) have (1/d) Σ v vᵀ = I exactly: the estimate must be the exact value
    probes = (d ** 0.5) * torch.eye(d, dtype=DT)[:, None, :].expand(d, *z.shape).clone()
    got = _call(fn, "hutchinson", f_z, z, probes)
    _compare(got, exact, "hutchinson with the d probes √d·e_i (which make it exact)",
             "For each probe v compute vᵀJ = torch.autograd.grad(f_z, z, v, create_graph=True, "
             "retain_graph=True)[0], square and sum it per sample (over dim 1, not the batch), "
             "average over the probes, and divide by d = z.shape[1].", rtol=1e-8, atol=1e-10)
    if not got.requires_grad:
        raise CheckFailed("hutchinson: the value is right, but it carries no graph, so γ·(estimate) "
                          "in a loss would not train anything. Pass create_graph=True to autograd.grad.")
    # the gradient of the estimate, what Jacobian regularization trains with
    (grad_got,) = torch.autograd.grad(got.sum(), z, retain_graph=True, allow_unused=True)
    (grad_expected,) = torch.autograd.grad(references.hutchinson(f_z, z, probes).sum(), z)
    _compare(torch.zeros_like(z) if grad_got is None else grad_got, grad_expected, "the gradient of hutchinson's estimate with respect to z "
             "(basis probes)", "The estimate must stay a function of z all the way: no .detach(), "
             ".item() or torch.no_grad() between autograd.grad(..., create_graph=True) and the "
             "result.", rtol=1e-8, atol=1e-10)
    f_z, z, exact = _tanh_state(1)
    probes = torch.randn(4000, *z.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = _call(fn, "hutchinson", f_z, z, probes)
    if not (isinstance(got, torch.Tensor) and got.shape == exact.shape):
        raise _fail("hutchinson with 4000 Gaussian probes", f"expected a tensor of shape "
                    f"{tuple(exact.shape)}, got {type(got).__name__} "
                    f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}.")
    err = ((got.detach() - exact).abs() / exact).max().item()
    if err > 0.1:
        raise CheckFailed(f"hutchinson with 4000 Gaussian probes is off by {err:.0%} from the exact "
                          f"‖J‖²_F / d; an unbiased estimate is within a few percent.")
    return _passed("hutchinson", f"exact with basis probes; within {err:.1%} with 4000 random ones")


@exercise
def check_power_method(fn: Callable) -> bool:
    """fn(matvec, v0, n_iter) -> |λ_max| of a symmetric matrix by power iteration."""
    for seed, top in [(0, 2.0), (1, -2.0), (2, 0.9)]:
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
        rest = torch.tensor([1.2, -1.0, 0.7, 0.5, -0.3, 0.2, 0.1], dtype=DT) * (abs(top) / 2)
        eigs = torch.cat([torch.tensor([top], dtype=DT), rest])
        A = Q @ torch.diag(eigs) @ Q.T
        v0 = torch.randn(8, generator=g, dtype=DT)
        matvec = _Counted(lambda v: A @ v, "matvec", 1000, " with n_iter=300")
        got = _call(fn, "power_method", matvec, v0, 300, convert=_numbered("power_method"))
        if not 300 <= matvec.calls <= 302:
            raise _fail(f"power_method with n_iter=300 (λ = {top})", f"it called matvec "
                        f"{matvec.calls} times.", "One matrix–vector product per iteration, "
                        "n_iter iterations (and one more for the final estimate, if you need it).")
        if abs(got - abs(top)) > 1e-6 * abs(top):
            hint = ("It came out negative: the dominant eigenvalue here is negative, and the spectral "
                    "radius is its modulus |λ|." if got < 0 else
                    "Repeat v ← A v / ‖A v‖ n_iter times, then return |vᵀ A v| (v has norm 1).")
            raise CheckFailed(f"power_method on a symmetric 8×8 matrix with largest |λ| = {abs(top)} "
                              f"(λ = {top}) returned {got:.6g}. {hint}")
    return _passed("power_method", "finds |λ_max| of 3 symmetric matrices (one with λ_max < 0)")
