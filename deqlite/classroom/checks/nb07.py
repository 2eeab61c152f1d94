"""Checks for notebook 07's exercises (a DEQ-Transformer language model)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._harness import DT, CheckFailed, _call, _compare, _numbered, _passed, exercise


@exercise
def check_causal_attention(fn: Callable) -> bool:
    """fn(q, k, v) -> softmax(q kᵀ / √d with the future masked out) v, for (batch, T, d) inputs."""
    g = torch.Generator().manual_seed(0)
    for T, d in [(5, 4), (9, 8)]:
        q, k, v = (torch.randn(2, T, d, generator=g, dtype=DT) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = _call(fn, "causal_attention", q, k, v)
        _compare(got, expected, f"causal_attention on (batch 2, T {T}, d {d})",
                 "Scores q kᵀ / √d (shape (batch, T, T)); set the entries above the diagonal "
                 "(key position > query position) to -inf, so position t sees positions ≤ t "
                 "(itself included); softmax over the last dimension (the keys); multiply by v.",
                 rtol=1e-8, atol=1e-10)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        k2[:, -1], v2[:, -1] = 100.0, 100.0                  # change only the last position
        again = _call(fn, "causal_attention", q2, k2, v2)
        if not torch.allclose(again[:, :-1].detach().to(DT), got[:, :-1].detach().to(DT)):
            raise CheckFailed("causal_attention: changing the key and value of the *last* position "
                              "changed the outputs of earlier positions: the future leaks.")
    return _passed("causal_attention", "matches PyTorch's causal attention; no future leaks")


@exercise
def check_unigram_bits(fn: Callable) -> bool:
    """fn(counts) -> entropy in bits of the distribution counts / counts.sum() (zeros allowed)."""
    cases = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([8.0, 0.0, 4.0, 2.0, 2.0]),
             torch.tensor([5.0])]
    for counts in cases:
        p = counts / counts.sum()
        p = p[p > 0]
        expected = float(-(p * p.log2()).sum())
        got = _call(fn, "unigram_bits", counts.clone(), convert=_numbered("unigram_bits"))
        if not abs(got - expected) < 1e-6:
            hint = ("A symbol with count 0 contributes 0 (p log p → 0), not NaN: drop the zero "
                    "counts first." if got != got else
                    "H = −Σ p log₂ p with p = counts / counts.sum(): base 2 for bits, and "
                    "normalize the counts to probabilities first.")
            raise CheckFailed(f"unigram_bits({counts.tolist()}): expected {expected:.6f} bits, got "
                              f"{got}. {hint}")
    return _passed("unigram_bits", "right for uniform, skewed (with a zero count) and one-symbol counts")
