"""Problems shared by the benchmark scripts (``tests/conftest.py``'s ``symmetric_tanh_problem``
is the same problem in float64, for the tests)."""
from __future__ import annotations

import torch


def symmetric_tanh(width, batch, top=0.97, input_scale=0.01, dtype=torch.float32, seed=0):
    """f(z) = tanh(z Wᵀ + u), W symmetric with spectrum linspace(0, top), small inputs u: slow for
    plain iteration (ρ(J) close to `top`), the regime where the solvers differ most."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    W = ((Q * torch.linspace(0, top, width, dtype=torch.float64)) @ Q.T).to(dtype)
    u = (input_scale * torch.randn(batch, width, generator=g, dtype=torch.float64)).to(dtype)
    return (lambda z: torch.tanh(z @ W.T + u)), torch.zeros(batch, width, dtype=dtype)
