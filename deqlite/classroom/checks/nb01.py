"""Checks for notebook 01's exercises (weight-tied, input-injected layers)."""
from __future__ import annotations

from typing import Callable

import torch

from ._harness import DT, _fail, _call, _compare, _which, _numbered, _close, _passed, exercise, _tanh_problem


@exercise
def check_weight_tied_forward(fn: Callable) -> bool:
    """fn(W, U, b, x, n_layers) -> z after n_layers of z ← tanh(z Wᵀ + x Uᵀ + b), from z = 0."""
    hint = ("Start from z = 0 of shape (batch, hidden) with x's dtype; use the *same* W, U, b in "
            "every layer and add the input injection x Uᵀ + b at every layer, not only the first.")
    families = [(0, 1, {}), (1, 5, {}), (2, 30, {}), (3, 0, {}),
                (4, 7, dict(batch=1, d=5, d_in=2)), (5, 4, dict(dtype=torch.float32))]
    for seed, n, shape in families:
        W, U, b, x = _tanh_problem(seed, **shape)
        z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
        for _ in range(n):
            z = torch.tanh(z @ W.T + x @ U.T + b)
        what = (f"weight_tied_forward with n_layers={n} (batch {x.shape[0]}, hidden {W.shape[0]}, "
                f"input {x.shape[1]}, {str(x.dtype).removeprefix('torch.')})")
        got = _call(fn, "weight_tied_forward", W, U, b, x, n)
        z_w, z_first = torch.zeros_like(z), torch.zeros_like(z)
        for k in range(n):
            z_w = torch.tanh(z_w @ W + x @ U.T + b)
            z_first = torch.tanh(z_first @ W.T + (x @ U.T + b if k == 0 else 0))
        specific = _which(got, {
            "z @ W multiplies by Wᵀ: a batch of row vectors needs z @ W.T (and x @ U.T).": z_w,
            "The input injection x Uᵀ + b goes into every layer, not only the first: that is "
            "what makes the fixed point depend on x.": z_first}, hint)
        _compare(got, z, what, specific if n else "With n_layers = 0 no layer runs: z is still "
                 "the zero state.", rtol=1e-5 if x.dtype == torch.float32 else 1e-10, atol=1e-7)
    return _passed("weight_tied_forward", "matches the weight-tied network for 0 to 30 layers, "
                   "other shapes and float32")


@exercise
def check_lipschitz_bound(fn: Callable) -> bool:
    """fn(W) -> the Lipschitz constant bound ‖W‖₂ of z ↦ tanh(W z + u)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    families = [("a random 7×7 matrix", torch.randn(7, 7, generator=g, dtype=DT)),
                ("a random 4×4 matrix", torch.randn(4, 4, generator=g, dtype=DT)),
                ("a non-normal matrix (ρ(W) = 0.5 but ‖W‖₂ ≫ 1)",
                 torch.tensor([[0.5, 3.0], [0.0, 0.5]], dtype=DT)),
                ("a symmetric matrix with a negative top eigenvalue",
                 Q @ torch.diag(torch.tensor([-2.0, 1.5, 1.0, 0.3, -0.2, 0.1], dtype=DT)) @ Q.T)]
    for what, W in families:
        expected = torch.linalg.matrix_norm(W, ord=2).item()
        got = _call(fn, "lipschitz_bound", W.clone(), convert=_numbered("lipschitz_bound"))
        if not _close(got, expected, 1e-10):
            hint = ("tanh' ≤ 1, so the bound is the largest singular value of W (the spectral "
                    "norm, torch.linalg.matrix_norm(W, ord=2)).")
            if _close(got, torch.linalg.matrix_norm(W).item(), 1e-10):
                hint = "That is the Frobenius norm, a looser bound: " + hint
            elif _close(got, torch.linalg.eigvals(W).abs().max().item(), 1e-10):
                hint = ("That is the spectral radius max|λ|: for a non-normal W it is smaller "
                        "than ‖W‖₂, so it does not bound how far one step can stretch. " + hint)
            raise _fail(f"lipschitz_bound on {what}", f"expected {expected!r}, got {got!r}.", hint)
    return _passed("lipschitz_bound", "equals the spectral norm ‖W‖₂, non-normal and negative-"
                   "eigenvalue matrices included")


@exercise
def check_linear_fixed_point(fn: Callable) -> bool:
    """fn(W, b) -> z* of z = z Wᵀ + b for a batch b of shape (batch, d)."""
    hint = ("z = W z + b  ⇔  (I − W) z = b; solve that system (torch.linalg.solve) for every row "
            "of b, mind the transposes for a batch of row vectors, and make the identity with "
            "W's dtype. Iterating z ← z Wᵀ + b only approaches z*; the check wants it exactly.")
    families = [(0, dict(d_in=6)), (1, dict(d_in=6, scale=0.95)), (2, dict(batch=1, d=3, d_in=3)),
                (3, dict(d_in=6, dtype=torch.float32))]
    for seed, shape in families:
        W, _, _, b = _tanh_problem(seed, **shape)
        eye = torch.eye(W.shape[0], dtype=DT)
        expected = torch.linalg.solve(eye - W.double(), b.double().T).T.to(b.dtype)
        got = _call(fn, "linear_fixed_point", W, b)
        _compare(got, expected, f"linear_fixed_point (batch {b.shape[0]}, d {W.shape[0]}, "
                 f"‖W‖₂ {shape.get('scale', 0.7)}, {str(b.dtype).removeprefix('torch.')})", hint,
                 rtol=1e-4 if b.dtype == torch.float32 else 1e-10, atol=1e-5 if b.dtype ==
                 torch.float32 else 1e-12)
    return _passed("linear_fixed_point", "(I − W)⁻¹ b exactly, batches of 1 and 4, float32 too")
