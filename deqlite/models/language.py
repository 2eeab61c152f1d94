"""The DEQ-Transformer language model (Bai, Kolter, Koltun, "Deep Equilibrium Models",
NeurIPS 2019).

A Transformer language model stacks L different blocks over the embedded tokens. The DEQ version
keeps ONE block f, feeds the embedded input into it at every application ("input injection"), and
takes as its output the equilibrium of that block, the sequence of states z* = f(z*, x):

    x_t  = √d · E[token_t] + P_t                      token embedding and position t     (inject)
    u    = W_u x + b_u                                the injection, computed once per input
    h    = z + u                                      the state, with the input added
    post-LN:  y = LN₁(h + m₁ ⊙ Attn(h))               causal multi-head self-attention
              f(z, x) = LN₂(y + m₂ ⊙ FFN(y))          FFN(y) = W₂ ReLU(W₁ y + b₁) + b₂
    pre-LN:   y = LN₂(h + m₁ ⊙ Attn(LN₁(h)))
              f(z, x) = y + m₂ ⊙ FFN(y)
    logits_t = W_out LN(z*_t) + b_out                 (W_out = E with tied weights)

The block f is ``deqlite.cells.TransformerCell`` (its docstring: causal attention, variational
dropout fixed within a solve, post- and pre-LN).

How the input enters. The DEQ paper injects x into the attention's projections, QKV = W z + U x;
here u is added to the state, so the attention sees W(z + u) = W z + (W W_u) x, the same kind of
injection, and u also enters the residual stream. Causality of the equilibrium: position t of
f(z, x) depends on z and x at positions ≤ t only, so the first t positions of z* solve their own
equation z*_{≤t} = f(z*_{≤t}, x_{≤t}), and (when that fixed point is unique) the output at t
does not depend on later tokens. A solver's iterates are causal only up to its tolerance: Anderson
mixes all positions with one set of weights and stops on the residual of the whole sequence.

Models (keyword-only options, validated):

* ``DEQTransformerLM``: embedding + positions → DEQ over a ``TransformerCell`` → LayerNorm →
  output layer. Character level by default; with ``cutoffs`` a word-level model with adaptive
  input embeddings (``AdaptiveInput``; Baevski & Auli, ICLR 2019) and torch's
  ``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al., ICML 2017).
* ``TransformerLM``: the explicit baseline, ``n_layers`` *untied* copies of the same block,
  z_k = f_k(z_{k−1}, x) from z_0 = 0: the network that the DEQ's unrolled warm-up runs, with
  different weights per layer. Its activation memory grows with n_layers; the DEQ's does not
  grow with the number of solver iterations (``deqlite.memory.saved_tensor_bytes``).

Every model has ``forward(tokens) -> logits (batch, T, V)`` (log-probabilities for the adaptive
softmax), ``loss(tokens, targets)`` (mean negative log-likelihood per token, in nats) and
``generate(prompt, n_new)``. Not here: Transformer-XL's memory of the previous segment
(``mem_len``) and its relative positional encoding; every window is modelled on its own.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int_list, check_positive_ints, check_range, check_tensor, lookup
from ..cells import TransformerCell, check_dropout
from ..deq import DEQ

POSITIONS = ("learned", "sinusoidal")


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017), §3.5: P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(...)."""
    t = torch.arange(max_len, dtype=torch.float32)[:, None]
    i2 = torch.arange(0, d_model, 2, dtype=torch.float32)
    freq = torch.exp(-math.log(10000.0) * i2 / d_model)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(t * freq)
    table[:, 1::2] = torch.cos(t * freq)[:, : d_model // 2]
    return table


def _check_cutoffs(cutoffs: Sequence[int], vocab_size: int) -> list:
    cutoffs = check_int_list(cutoffs, "cutoffs", high=vocab_size - 1,
                             example="[20000, 40000, 200000]")
    if cutoffs != sorted(set(cutoffs)):
        raise ValueError(f"cutoffs must increase strictly, e.g. [20000, 40000, 200000], got "
                         f"{cutoffs}.")
    return cutoffs


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings (Baevski & Auli, "Adaptive Input Representations for Neural
    Language Modeling", ICLR 2019). The vocabulary, sorted by frequency, is cut into clusters
    [0, c₁), [c₁, c₂), ..., [c_n, V); cluster i has its own table E_i of width d_i = d / k^i
    (k = ``div_value``) and a projection P_i (d_i × d) up to the model width, so that rare words
    get few parameters:  e(w) = E_i[w − c_i] P_i  (P_0 = I, d_0 = d).

    torch has no adaptive input layer, but its adaptive softmax (``nn.AdaptiveLogSoftmaxWithLoss``,
    Grave et al., ICML 2017) holds exactly these weights: its head scores the shortlist words w < c₁
    by h · H[w], and its tail cluster i scores the words of the cluster by (h P_iᵀ) · E_i[w − c_i]
    = h · e(w) (``tail[i−1]`` is Linear(d → d_i) with weight P_i, then Linear(d_i → |cluster|)
    with weight E_i). So the embedding here *reads* an adaptive softmax's weights,
    e(w) = H[w] or E_i[w − c_i] P_i: pass the model's output layer as ``weights`` to tie the input
    and output embeddings (Press & Wolf 2017; the DEQ-Transformer does), or let it make its own.
    """

    def __init__(self, vocab_size: int, d_model: int, cutoffs: Sequence[int],
                 div_value: float = 4.0, *,
                 weights: Optional[nn.AdaptiveLogSoftmaxWithLoss] = None):
        super().__init__()
        self.d_model = d_model
        self.weights = weights if weights is not None else nn.AdaptiveLogSoftmaxWithLoss(
            d_model, vocab_size, list(cutoffs), div_value=div_value)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, T) token ids → (batch, T, d_model) embeddings."""
        table = self.weights
        bounds = [0, *table.cutoffs]                    # table.cutoffs ends with vocab_size
        out = table.head.weight.new_zeros(*tokens.shape, self.d_model)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            inside = (tokens >= lo) & (tokens < hi)
            ids = tokens[inside] - lo
            if i == 0:                                  # rows ≥ c₁ of H score clusters: unused
                out[inside] = F.embedding(ids, table.head.weight)
            else:
                projection, cluster = table.tail[i - 1]
                out[inside] = F.embedding(ids, cluster.weight) @ projection.weight
        return out


class _LanguageModel(nn.Module):
    """What both LMs share: tokens → x = √d·e(token) + P_t → ``_body`` → LayerNorm → output."""

    def __init__(self, *, vocab_size: int, d_model: int, max_len: int, dropout: float,
                 positions: str, tie_weights: bool, cutoffs: Optional[Sequence[int]],
                 div_value: float):
        super().__init__()
        check_positive_ints(vocab_size=vocab_size, d_model=d_model, max_len=max_len)
        check_dropout(dropout)
        lookup(POSITIONS, positions, "positions")
        if not isinstance(tie_weights, bool):
            raise TypeError(f"tie_weights must be True or False, got {tie_weights!r}.")
        check_range(div_value, "div_value", low=1)
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        if cutoffs is None:
            self.embed = nn.Embedding(vocab_size, d_model)
            nn.init.normal_(self.embed.weight, std=d_model ** -0.5)   # √d·e(w) ~ N(0, 1)
            self.head = nn.Linear(d_model, vocab_size)
            if tie_weights:                      # Press & Wolf 2017: logits = h · e(w) + b_w
                self.head.weight = self.embed.weight
            self.adaptive = None
        else:
            cutoffs = _check_cutoffs(cutoffs, vocab_size)
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, cutoffs,
                                                          div_value=div_value)
            self.embed = AdaptiveInput(vocab_size, d_model, cutoffs, div_value,
                                       weights=self.adaptive if tie_weights else None)
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(max_len, d_model))
        else:
            self.register_buffer("positions", sinusoidal_positions(max_len, d_model),
                                 persistent=False)
        self.drop = nn.Dropout(dropout)          # on x and on z*: outside the solve
        self.norm = nn.LayerNorm(d_model)

    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError(f"{name} must be a LongTensor of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}.")
        if tokens.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(tokens.shape)}; expected (batch, T). For "
                             f"one sequence use {name}.unsqueeze(0).")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{name} has {tokens.shape[1]} positions, more than max_len="
                             f"{self.max_len}: cut the text into windows of at most {self.max_len} "
                             f"tokens, or build the model with a larger max_len.")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{name} holds ids in [{tokens.min().item()}, {tokens.max().item()}], "
                             f"outside the vocabulary [0, {self.vocab_size}).")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """x_t = √d · e(token_t) + P_t, (batch, T, d_model) (Vaswani et al. 2017, §3.4)."""
        self._check_tokens(tokens)
        x = self.embed(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.shape[1]]
        return self.drop(x)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last states before the output layer, LN(z*): (batch, T, d_model)."""
        return self.drop(self.norm(self._body(self.embed_tokens(tokens))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, vocab_size) for the next token at every position (with ``cutoffs``:
        log-probabilities, which are logits too)."""
        h = self.hidden(tokens)
        if self.adaptive is None:
            return self.head(h)
        return self.adaptive.log_prob(h.reshape(-1, self.d_model)).view(*h.shape[:2], -1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` (batch, T) per token, in nats."""
        self._check_tokens(targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, tokens "
                             f"{tuple(tokens.shape)}; they must match (targets: the next tokens).")
        if self.adaptive is None:
            return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        h = self.hidden(tokens)
        return self.adaptive(h.reshape(-1, self.d_model), targets.flatten()).loss

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, *, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample ``n_new`` tokens after ``prompt`` (1, T0), each from softmax(logits / temperature)
        given the last ``max_len`` tokens (temperature 0: the most likely token). Runs in eval
        mode (no dropout) and restores the model's mode. Returns (1, T0 + n_new)."""
        self._check_tokens(prompt, "prompt")
        if prompt.shape[0] != 1 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must have shape (1, T0) with T0 ≥ 1, got "
                             f"{tuple(prompt.shape)}.")
        check_range(n_new, "n_new", low=0, integer=True)
        check_range(temperature, "temperature", low=0)
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            for _ in range(n_new):
                logits = self(tokens[:, -self.max_len:])[:, -1].double()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device)
                tokens = torch.cat([tokens, nxt], dim=1)
        finally:
            self.train(was_training)
        return tokens


class DEQTransformerLM(_LanguageModel):
    """The DEQ-Transformer language model: embedding → DEQ over a ``TransformerCell`` → LN → output.

    Args:
        vocab_size: number of token ids (the trainer passes the data's).
        d_model, n_heads, d_ff: the block's width, heads and feed-forward width.
        max_len: the longest context (positions beyond it are an error).
        dropout: rate of the variational dropout inside the block and of plain dropout on the
            embedded input and on z* (both outside the solve).
        norm: ``"post"`` or ``"pre"`` LayerNorm placement (see the module docstring).
        positions: ``"learned"`` (a trained table) or ``"sinusoidal"`` (Vaswani et al.).
        tie_weights: share the input embedding with the output layer.
        cutoffs: word-level: cluster boundaries of the adaptive input and adaptive softmax
            (e.g. [20000, 40000, 200000] on WikiText-103); None: a full softmax.
        div_value: with cutoffs, cluster i has width d_model / div_value^i.
        deq: keyword arguments of ``deqlite.DEQ`` (solver, tol, max_iter, backward, ...).
    """

    def __init__(self, *, vocab_size: int = 256, d_model: int = 128, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 128, dropout: float = 0.0, norm: str = "post",
                 positions: str = "learned", tie_weights: bool = True,
                 cutoffs: Optional[Sequence[int]] = None, div_value: float = 4.0,
                 deq: Optional[Mapping[str, Any]] = None):
        super().__init__(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
                         positions=positions, tie_weights=tie_weights, cutoffs=cutoffs,
                         div_value=div_value)
        self.cell = TransformerCell(d_model, n_heads, d_ff, dropout=dropout, norm=norm)
        self.deq = DEQ.from_options(self.cell, deq)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self.deq(x)


class TransformerLM(_LanguageModel):
    """The explicit baseline: ``n_layers`` untied ``TransformerCell`` blocks, z_k = f_k(z_{k−1}, x)
    from z_0 = 0, in place of the equilibrium. Same options as ``DEQTransformerLM`` (no ``deq``)."""

    def __init__(self, *, vocab_size: int = 256, d_model: int = 128, n_heads: int = 4,
                 d_ff: int = 512, max_len: int = 128, n_layers: int = 4, dropout: float = 0.0,
                 norm: str = "post", positions: str = "learned", tie_weights: bool = True,
                 cutoffs: Optional[Sequence[int]] = None, div_value: float = 4.0):
        super().__init__(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
                         positions=positions, tie_weights=tie_weights, cutoffs=cutoffs,
                         div_value=div_value)
        check_range(n_layers, "n_layers", low=1, integer=True)
        self.layers = nn.ModuleList(TransformerCell(d_model, n_heads, d_ff, dropout=dropout,
                                                    norm=norm) for _ in range(n_layers))

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x")
        z = None
        for layer in self.layers:
            injection = layer.inject(x)
            z = layer(layer.init_state(injection) if z is None else z, injection)
        return z
