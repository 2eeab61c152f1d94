"""The DEQ-TrellisNet language model (Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019,
the paper's second instantiation) and the explicit TrellisNet it comes from (Bai, Kolter, Koltun,
"Trellis Networks for Sequence Modeling", ICLR 2019).

::

    x_t  = √d · e(token_t)                         token embedding, no positions (see below)
    z*   = f(z*, x),  z = [h; c]                   DEQ over a ``deqlite.trellis.TrellisCell``
    y_t  = h*_t[d_hidden − d_model :]              the last d_model features of h* (locuslab's
                                                   ``get_output``)
    logits_t = W_out y_t + b_out                   (W_out = E with tied weights)

The cell (its docstring has the math) is a causal convolution over [x; h] followed by an
LSTM-style gate, so z*_t depends on tokens ≤ t only. No position table: a convolution knows the
order of the positions already (each output reads the k positions just before it).

Dropout as in locuslab: variational masks of shape (batch, 1, width), the same at every position,
on the embedded input and on the output y (``dropout``; outside the solve) and on h inside the
cell (``dropout_hidden``; one mask per input, fixed within the solve).

Models (keyword-only options, validated):

* ``DEQTrellisNetLM``: embedding → DEQ over a ``TrellisCell`` → output layer. Character level by
  default; with ``cutoffs`` a word-level model with adaptive input and adaptive softmax
  (``deqlite.models.language.AdaptiveInput``; ``div_value=1`` gives every word a full-width
  embedding, as locuslab's split softmax does).
* ``TrellisNetLM``: the explicit TrellisNet of depth ``n_layers``: the same weight-tied layer
  computed layer by layer from h⁽⁰⁾ = c⁽⁰⁾ = 0 with ONE ``nn.Conv1d`` over the concatenation
  [x; h⁽ⁱ⁾] (channels first, as in the ICLR paper), written without the DEQ machinery. With the
  same weights (its conv = [W_x, W_h], bias b_x + b_h) it computes exactly what the DEQ's
  unrolled warm-up ``deq.options(pretrain_steps=L)`` computes; its activation memory grows with
  L, the DEQ's does not grow with the number of solver iterations.

Both have the transformer LMs' API (``deqlite.models.language``): ``forward(tokens)`` → logits
(batch, T, V), ``loss(tokens, targets)`` in nats per token, ``generate(prompt, n_new)``. Not here:
locuslab's memory of the previous segment (its z0 "history padding": here every window starts
from zeros), weight drop, embedding dropout and the mixture of softmaxes (the last three are off
in its WikiText-103 run).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .._validate import check_positive_ints, check_range
from ..cells import check_dropout, variational_mask
from ..deq import DEQ
from ..trellis import HIDDEN_INIT_STD, TrellisCell
from .language import _LanguageModel


class _TrellisLM(_LanguageModel):
    """What both TrellisNet LMs share: the embedding and output layer of ``_LanguageModel``
    (its ``forward``, ``loss`` and ``generate``), without its positions and final LayerNorm,
    with variational dropout on the input and the output."""

    def __init__(self, *, vocab_size: int, d_model: int, d_hidden: int, kernel_size: int,
                 max_len: int, dropout: float, dropout_hidden: float, weight_norm: bool,
                 tie_weights: bool, cutoffs: Optional[Sequence[int]], div_value: float):
        super().__init__(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
                         positions="sinusoidal", tie_weights=tie_weights, cutoffs=cutoffs,
                         div_value=div_value)
        del self.positions, self.norm, self.drop        # none of them in TrellisNet
        check_positive_ints(d_hidden=d_hidden, kernel_size=kernel_size)
        if d_hidden < d_model:
            raise ValueError(f"d_hidden={d_hidden} is smaller than d_model={d_model}: the output "
                             f"is the last d_model features of h, so h needs at least d_model "
                             f"(locuslab's h has nhid + nout features, its output the last nout).")
        check_dropout(dropout_hidden)
        if not isinstance(weight_norm, bool):
            raise TypeError(f"weight_norm must be True or False, got {weight_norm!r}.")
        self.d_hidden, self.kernel_size, self.dropout = d_hidden, kernel_size, dropout
        self.dropout_hidden = dropout_hidden

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Variational dropout: one mask (batch, 1, width) for every position (training only)."""
        if self.training and self.dropout:
            x = x * variational_mask(x, self.dropout, (1,))
        return x

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """x_t = √d · e(token_t), (batch, T, d_model), with input dropout."""
        self._check_tokens(tokens)
        return self._drop(self.embed(tokens) * math.sqrt(self.d_model))

    def hidden(self, tokens: torch.Tensor, memory: None = None) -> torch.Tensor:
        """The output features: the last d_model features of h* (batch, T, d_model). No memory
        of earlier segments (module docstring): ``memory`` must be None."""
        if memory is not None:
            raise ValueError(f"{type(self).__name__} has no memory of earlier segments; call it "
                             f"without memory= (every window starts from zeros).")
        self.next_memory = None
        z = self._body(self.embed_tokens(tokens))
        return self._drop(z[..., self.d_hidden - self.d_model: self.d_hidden])


class DEQTrellisNetLM(_TrellisLM):
    """DEQ-TrellisNet: embedding → DEQ over a ``TrellisCell`` (state [h; c]) → output layer.

    Args:
        vocab_size: number of token ids (the trainer passes the data's).
        d_model: width of the embedding and of the output features (locuslab: d_embed = nout).
        d_hidden: width of h and of c (locuslab: nhid + nout); the output is h's last d_model.
        kernel_size: positions each causal convolution reads (locuslab: 2).
        max_len: the longest window (``generate`` keeps this many tokens of context).
        dropout: variational dropout on the embedded input and on the output (outside the solve).
        dropout_hidden: variational dropout on h inside the cell (fixed within a solve).
        weight_norm: weight normalization on the cell's two convolutions.
        tie_weights: share the input embedding with the output layer.
        cutoffs, div_value: word level: the adaptive input and softmax (None: a full softmax).
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, vocab_size: int = 256, d_model: int = 64, d_hidden: int = 256,
                 kernel_size: int = 2, max_len: int = 128, dropout: float = 0.0,
                 dropout_hidden: float = 0.0, weight_norm: bool = True, tie_weights: bool = True,
                 cutoffs: Optional[Sequence[int]] = None, div_value: float = 4.0,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__(vocab_size=vocab_size, d_model=d_model, d_hidden=d_hidden,
                         kernel_size=kernel_size, max_len=max_len, dropout=dropout,
                         dropout_hidden=dropout_hidden, weight_norm=weight_norm,
                         tie_weights=tie_weights, cutoffs=cutoffs, div_value=div_value)
        self.cell = TrellisCell(d_model, d_hidden, kernel_size=kernel_size, dropout=dropout_hidden,
                                weight_norm=weight_norm)
        self.deq = DEQ.from_options(self.cell, deq)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.deq(x)


class TrellisNetLM(_TrellisLM):
    """The explicit TrellisNet of depth ``n_layers``: one weight-tied layer applied L times,
    layer by layer, from h⁽⁰⁾ = c⁽⁰⁾ = 0, the input re-read by every layer. Same options as
    ``DEQTrellisNetLM`` (no ``deq``); the one convolution over [x; h] (``conv``) holds
    [W_x, W_h] along its input channels, and its h columns start at N(0, 0.01) as the cell's do."""

    def __init__(self, *, vocab_size: int = 256, d_model: int = 64, d_hidden: int = 256,
                 kernel_size: int = 2, max_len: int = 128, n_layers: int = 8,
                 dropout: float = 0.0, dropout_hidden: float = 0.0, weight_norm: bool = True,
                 tie_weights: bool = True, cutoffs: Optional[Sequence[int]] = None,
                 div_value: float = 4.0):
        super().__init__(vocab_size=vocab_size, d_model=d_model, d_hidden=d_hidden,
                         kernel_size=kernel_size, max_len=max_len, dropout=dropout,
                         dropout_hidden=dropout_hidden, weight_norm=weight_norm,
                         tie_weights=tie_weights, cutoffs=cutoffs, div_value=div_value)
        check_range(n_layers, "n_layers", low=1, integer=True)
        self.n_layers = n_layers
        # padding k−1 on both sides; keeping the first T outputs drops the ones that look ahead
        conv = nn.Conv1d(d_model + d_hidden, 4 * d_hidden, kernel_size, padding=kernel_size - 1)
        with torch.no_grad():
            conv.weight[:, d_model:].normal_(0, HIDDEN_INIT_STD)
        self.conv = nn.utils.parametrizations.weight_norm(conv, dim=0) if weight_norm else conv

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)                                   # (batch, d_model, T)
        (n, _, length), d = x.shape, self.d_hidden
        h = c = x.new_zeros(n, d, length)
        keep = 1.0
        if self.training and self.dropout_hidden:                # one mask for every layer
            keep = torch.bernoulli(x.new_full((n, d, 1), 1 - self.dropout_hidden))
            keep = keep / (1 - self.dropout_hidden)
        with nn.utils.parametrize.cached():      # the weight-normed W once, not once per layer
            for _ in range(self.n_layers):
                a = self.conv(torch.cat([x, keep * h], dim=1))[:, :, :length]
                gate_i, gate_o, gate_g, gate_f = a.split(d, dim=1)
                c_before = torch.cat([c.new_zeros(n, d, 1), c[:, :, :-1]], dim=2)   # c_{t−1}
                c = torch.sigmoid(gate_f) * c_before + torch.sigmoid(gate_i) * torch.tanh(gate_g)
                h = torch.sigmoid(gate_o) * torch.tanh(c)
        return torch.cat([h, c], dim=1).transpose(1, 2)         # (batch, T, 2·d_hidden)
