"""Checks for notebook 09's exercises (gradient shortcuts)."""
from __future__ import annotations

from typing import Callable

import torch

from ._harness import DT, _fail, _call, _Counted, _compare, _passed, exercise, _jacobians, _vjp_of


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
