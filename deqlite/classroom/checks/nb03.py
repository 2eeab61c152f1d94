"""Checks for notebook 03's exercises (implicit differentiation)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._harness import DT, _fail, _call, _Counted, _compare, _passed, exercise, _tanh_problem, _jacobians, _vjp_of


@exercise
def check_adjoint_solve(fn: Callable) -> bool:
    """fn(vjp, grad, tol, max_iter) -> g solving g = Jᵀ g + grad, where vjp(y) = Jᵀ y."""
    hint = ("Iterate g ← vjp(g) + grad (the upstream gradient is added at *every* step) until "
            "‖g_new − g‖ ≤ tol, at most max_iter times; starting from g = grad or g = 0 both work.")
    for what, seed, shape in [("a batch of 4 random 6×6 Jacobians", 0, (4, 6)),
                              ("one sample", 1, (1, 6)),
                              ("image-shaped gradients (2, 2, 2, 2)", 2, (2, 2, 2, 2))]:
        J, grad = _jacobians(seed, batch=shape[0], d=math.prod(shape[1:]))
        grad = grad.reshape(shape)
        expected = torch.linalg.solve(torch.eye(J.shape[1], dtype=DT) - J.transpose(1, 2),
                                      grad.flatten(1)[..., None])[..., 0].reshape(shape)
        vjp = _Counted(_vjp_of(J, shape), "vjp", 3000, " with max_iter=1000")
        got = _call(fn, "adjoint_solve", vjp, grad, tol=1e-12, max_iter=1000)
        _compare(got, expected, f"adjoint_solve on {what}", hint, rtol=1e-7, atol=1e-9)
        if vjp.calls > 1001:
            raise _fail(f"adjoint_solve on {what}", f"{vjp.calls} vector–Jacobian products for "
                        f"max_iter=1000.", "One vjp per iteration, at most max_iter of them.")
    J, grad = _jacobians(3, scale=1.5)                         # ‖J‖ > 1: the iteration diverges
    vjp = _Counted(_vjp_of(J, grad.shape), "vjp", 100, " with max_iter=20")
    _call(fn, "adjoint_solve", vjp, grad, tol=1e-12, max_iter=20)
    if vjp.calls > 21:
        raise _fail("adjoint_solve with max_iter=20 on Jacobians with ‖J‖ = 1.5 (no convergence)",
                    f"{vjp.calls} vector–Jacobian products.", "Stop after max_iter iterations even "
                    "when ‖g_new − g‖ never reaches tol.")
    return _passed("adjoint_solve", "g = (I − Jᵀ)⁻¹ ∂ℓ/∂z* for vectors, one sample and image "
                   "shapes; stops at max_iter when the iteration diverges")


@exercise
def check_linear_deq_grad(fn: Callable) -> bool:
    """fn(W, b, dl_dz) -> ∂ℓ/∂b for z* = W z* + b (batch of row vectors) given ∂ℓ/∂z*."""
    hint = ("z* = (I − W)⁻¹ b, so ∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z*: note the transpose (using (I − W)⁻¹ "
            "instead is the classic mistake), and solve exactly rather than truncating the series.")
    for seed, shape in [(0, dict(d_in=6)), (1, dict(d_in=6, scale=0.95)),
                        (2, dict(batch=1, d=3, d_in=3)), (3, dict(d_in=6, dtype=torch.float32))]:
        W, _, _, b = _tanh_problem(seed, **shape)
        dl_dz = torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 10),
                            dtype=DT).to(b.dtype)
        eye = torch.eye(W.shape[0], dtype=DT)
        expected = torch.linalg.solve(eye - W.double().T, dl_dz.double().T).T.to(b.dtype)
        got = _call(fn, "linear_deq_grad", W, b, dl_dz)
        f32 = b.dtype == torch.float32
        _compare(got, expected, f"linear_deq_grad (batch {b.shape[0]}, d {W.shape[0]}, "
                 f"{str(b.dtype).removeprefix('torch.')})", hint, rtol=1e-4 if f32 else 1e-10,
                 atol=1e-5 if f32 else 1e-12)
    return _passed("linear_deq_grad", "∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z*, batches of 1 and 4, float32 too")
