"""Weight-tied, input-injected cells f(z, x): the layer a DEQ repeats "infinitely often".

An explicit deep network applies different layers z_{k+1} = σ(W_k z_k + U_k x + b_k). A DEQ ties
the weights (W_k = W, U_k = U for every k) and feeds the input into every layer ("input
injection"); its output is the fixed point z* = f(z*, x) of that one layer (Bai, Kolter,
Koltun, "Deep Equilibrium Models", NeurIPS 2019).

Every cell has two methods:

* ``inject(x)``: the part of f that depends only on the input, computed *once* per input;
* ``forward(z, injection)``: one application of the layer, called at every solver iteration;

and ``init_state(injection)``, the starting point z0 of a solve (zeros).
"""
from __future__ import annotations

import torch
from torch import nn

from ._validate import check_range, check_tensor


def spectral_rescale_(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale `weight` in place so that its largest singular value is `scale`.

    For f(z) = tanh(W z + u), |tanh'| ≤ 1, so ‖J_f‖₂ ≤ ‖W‖₂: a spectral norm below 1 makes f a
    contraction and forward iteration converges; above 1 it may not.
    """
    with torch.no_grad():
        weight.mul_(scale / torch.linalg.matrix_norm(weight, ord=2))
    return weight


class MLPCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), with the injection U x + b computed once per input.

    Args:
        d_in: size of the input x (its last dimension).
        d_hidden: size of the state z.
        weight_scale: if given, W starts with spectral norm exactly ``weight_scale``
            (< 1 guarantees a contraction); otherwise PyTorch's default ``nn.Linear`` init.
    """

    def __init__(self, d_in: int, d_hidden: int, *, weight_scale: float | None = None):
        super().__init__()
        check_range(d_in, "d_in", low=1, integer=True)
        check_range(d_hidden, "d_hidden", low=1, integer=True)
        self.d_in, self.d_hidden = d_in, d_hidden
        self.W = nn.Linear(d_hidden, d_hidden, bias=False)   # weight-tied: one W for every step
        self.U = nn.Linear(d_in, d_hidden)                   # input injection U x + b
        if weight_scale is not None:
            check_range(weight_scale, "weight_scale", low=0, low_open=True)
            spectral_rescale_(self.W.weight, weight_scale)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """U x + b for a batch x of shape (batch, d_in)."""
        check_tensor(x, "x")
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MLPCell(d_in={self.d_in}) expects x of shape (batch, {self.d_in}), got "
                             f"{tuple(x.shape)}. Flatten images first, e.g. x.flatten(1).")
        return self.U(x)

    def init_state(self, injection: torch.Tensor) -> torch.Tensor:
        """z0 = 0, of shape (batch, d_hidden)."""
        return torch.zeros_like(injection)

    def forward(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        """One step of the layer: tanh(W z + injection)."""
        if z.shape != injection.shape:
            raise ValueError(f"state z has shape {tuple(z.shape)} but the injection has shape "
                             f"{tuple(injection.shape)}; they must match (batch, {self.d_hidden}).")
        return torch.tanh(self.W(z) + injection)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_hidden={self.d_hidden}"
