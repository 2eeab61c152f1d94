"""The DEQ-Transformer's block as published (locuslab's DEQ-Transformer, Bai, Kolter, Koltun,
NeurIPS 2019): Transformer-XL's relative-position attention (Dai et al., ACL 2019) with a memory
of the tokens before the segment, as a DEQ cell (``deqlite.cells`` explains cells; its
``TransformerCell`` is the plain block with absolute positions).

A text is read segment by segment; the equilibrium of a segment attends to the equilibrium states
of the tokens before it (the ``Memory``), which are held fixed during its solve: they enter the
cell's ``inject(x, memory=...)`` like the input itself (``DEQ.forward(x, memory=...)`` passes it
on). The language models around it: ``deqlite.models.language``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from ._validate import check_tensor, lookup
from .cells import NORMS, check_dropout, check_heads, variational_mask


class Memory(NamedTuple):
    """Transformer-XL's memory of the tokens before the current segment (Dai et al., ACL 2019): for
    the last M of them, the states the block reached there, ``z`` (batch, M, d), and their
    injections ``u`` (batch, M, 3d), both detached. A segment's queries attend to these keys and
    values as well as to its own; nothing is backpropagated into them."""
    z: torch.Tensor
    u: torch.Tensor


def relative_encoding(length: int, d_model: int, like: torch.Tensor) -> torch.Tensor:
    """R (length, d_model): row r encodes the distance r between a query and a key, as
    Transformer-XL does: R[r] = [sin(r ω_0), ..., sin(r ω_{d/2−1}), cos(r ω_0), ...] with
    ω_i = 10000^(−2i/d)."""
    distance = torch.arange(length, dtype=like.dtype, device=like.device)
    omega = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=like.dtype, device=like.device) / d_model)
    angle = distance[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)[:, :d_model]


class TransformerXLCell(nn.Module):
    """The DEQ-Transformer's block as locuslab's DEQ-Transformer builds it (Bai, Kolter, Koltun,
    NeurIPS 2019): Transformer-XL's relative-position attention over the segment *and* a memory of
    the previous one, with the input injected into the attention's queries, keys and values.

    Shapes: states z (batch, T, d) for the T tokens of the segment; memory (``Memory``) of M
    earlier tokens; K = M + T keys. With h = [z_mem; z] (batch, K, d)::

        inject:  u = W_u x + b_u  (batch, T, 3d)          the input injection, once per segment
                 U = [u_mem; u]   (batch, K, 3d)
        [q; k; v] = W_qkv a + U,  a = h (post-LN) or LN₁(h) (pre-LN);   q: the last T rows only
        score(i, j) = ((q_i + c)·k_j + (q_i + b)·W_r R[M + i − j]) / √d_head,   j ≤ M + i
        A = softmax over j (0 for keys after the query, i.e. j > M + i) ⊙ m_att
        o = W_o (A v) + b_o
        post-LN:  y = LN₁(z + m₁ ⊙ o),       f(z, x) = LN₂(y + m₂ ⊙ FFN(y))
        pre-LN:   n = LN₂(z + m₁ ⊙ o),       f(z, x) = n + m₂ ⊙ FFN(n)

    R[r]: the sinusoidal encoding of the distance r (``relative_encoding``); c and b (``r_w_bias``,
    ``r_r_bias``, one d_head vector per head): Transformer-XL's learned global biases, the
    content and position terms that do not depend on the query. A score depends on how far the
    key is from the query, never on where the segment starts, which is what lets a segment attend
    to the states of the previous one: the same tokens give the same scores whether they came in
    this segment or in the memory. The input enters only through U (locuslab's injection into the
    attention): z starts at 0 and the residual stream is z itself.

    Causality: query i sees keys j ≤ M + i (the memory and positions ≤ i of the segment), so
    position i of f depends on z and x at positions ≤ i: the equilibrium is causal, and with the
    memory holding the equilibrium states of the tokens before, the segment's equilibrium is the
    one the block would reach on the concatenated text (where that fixed point is unique).

    Dropout (training mode only, drawn in ``inject``, fixed within the solve so f stays one
    map): m₁, m₂ variational masks (batch, 1, d) on the attention and feed-forward outputs, and
    ``dropatt``: a mask m_att (batch, heads, T, K) on the attention probabilities.
    ``weight_norm=True``: W = g · V / ‖V‖ per output row on W_qkv, W_r, W_o and the FFN's two maps
    (locuslab's ``--wnorm``).

    Args:
        d_model, n_heads, d_ff: width, heads (d_model must be a multiple), feed-forward width.
        dropout: variational dropout rate (m₁, m₂); dropatt: attention-probability dropout.
        norm: ``"post"`` or ``"pre"``; weight_norm: see above.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, dropout: float = 0.0,
                 dropatt: float = 0.0, norm: str = "post", weight_norm: bool = False):
        super().__init__()
        check_heads(d_model, n_heads, d_ff)
        check_dropout(dropout)
        check_dropout(dropatt, "dropatt")
        if not isinstance(weight_norm, bool):
            raise TypeError(f"weight_norm must be True or False, got {weight_norm!r}.")
        self.norm_kind = lookup(NORMS, norm, "norm")
        self.d_model, self.n_heads, self.d_ff = d_model, n_heads, d_ff
        self.dropout, self.dropatt, self.weight_norm = dropout, dropatt, weight_norm
        self.d_head = d_model // n_heads
        wn = (lambda m: nn.utils.parametrizations.weight_norm(m, dim=0)) if weight_norm else (lambda m: m)
        self.injection = nn.Linear(d_model, 3 * d_model)
        self.qkv = wn(nn.Linear(d_model, 3 * d_model, bias=False))
        self.r_net = wn(nn.Linear(d_model, d_model, bias=False))
        self.out = wn(nn.Linear(d_model, d_model))
        self.r_w_bias = nn.Parameter(torch.empty(n_heads, self.d_head).uniform_(-0.05, 0.05))
        self.r_r_bias = nn.Parameter(torch.empty(n_heads, self.d_head).uniform_(-0.05, 0.05))
        self.ff = nn.Sequential(wn(nn.Linear(d_model, d_ff)), nn.ReLU(), wn(nn.Linear(d_ff, d_model)))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def empty_memory(self, like: torch.Tensor) -> Memory:
        """A memory of no tokens (the start of a text), for a batch shaped like ``like``."""
        return Memory(like.new_zeros(len(like), 0, self.d_model),
                      like.new_zeros(len(like), 0, 3 * self.d_model))

    def _check_memory(self, memory: Memory, x: torch.Tensor) -> None:
        if not (isinstance(memory, tuple) and len(memory) == 2
                and all(isinstance(t, torch.Tensor) for t in memory)):
            raise TypeError(f"memory must be a Memory(z, u) pair of tensors (what the model returned "
                            f"for the previous segment), got {type(memory).__name__}.")
        z, u = memory
        b, d = len(x), self.d_model
        if z.dim() != 3 or z.shape[0] != b or z.shape[2] != d or u.shape != (b, z.shape[1], 3 * d):
            raise ValueError(f"memory has shapes z {tuple(z.shape)}, u {tuple(u.shape)}; for this "
                             f"batch they must be (batch={b}, M, {d}) and ({b}, M, {3 * d}). A "
                             f"memory belongs to the rows of the stream it was made on.")

    def inject(self, x: torch.Tensor, memory: Optional[Memory] = None) -> list:
        """``[U, z_mem, P, masks...]`` for embedded tokens x (batch, T, d) and the memory of the
        tokens before them (None: none): U = [u_mem; W_u x + b_u], the memory's states, the
        projected distance encodings P = W_r R (K, heads, d_head); in training mode with dropout
        the masks m₁, m₂ (and m_att with dropatt)."""
        check_tensor(x, "x")
        if x.dim() != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"TransformerXLCell(d_model={self.d_model}) expects embedded tokens "
                             f"of shape (batch, T, {self.d_model}), got {tuple(x.shape)}.")
        if memory is None:
            memory = self.empty_memory(x)
        self._check_memory(memory, x)
        u = self.injection(x)               # the memory takes its dtype (bf16 under autocast)
        u = torch.cat([memory.u.to(u.dtype), u], dim=1)
        keys = u.shape[1]
        positions = self.r_net(relative_encoding(keys, self.d_model, x))
        injection = [u, memory.z.to(u.dtype), positions.view(keys, self.n_heads, self.d_head)]
        if self.training and self.dropout:
            injection += [variational_mask(x, self.dropout, (1,)), variational_mask(x, self.dropout, (1,))]
        if self.training and self.dropatt:
            shape = torch.empty(len(x), self.n_heads, x.shape[1], keys, device=x.device, dtype=x.dtype)
            injection.append(variational_mask(shape, self.dropatt, ()))
        return injection

    def init_state(self, injection: list) -> torch.Tensor:
        """z0 = 0: (batch, T, d_model) for the T tokens of the segment."""
        u, z_mem = injection[0], injection[1]
        return u.new_zeros(len(u), u.shape[1] - z_mem.shape[1], self.d_model)

    def attention(self, z: torch.Tensor, injection: list) -> torch.Tensor:
        """o = W_o (A v) + b_o (batch, T, d): relative-position attention of the segment's
        queries over the memory and the segment (class docstring)."""
        u, z_mem, positions, *masks = injection
        b, t, d = z.shape
        m = z_mem.shape[1]
        h = torch.cat([z_mem, z], dim=1)
        qkv = self.qkv(h if self.norm_kind == "post" else self.norm1(h)) + u
        q, k, v = (part.view(b, m + t, self.n_heads, self.d_head).transpose(1, 2)
                   for part in qkv.split(d, dim=-1))
        q = q[:, :, m:]                                             # (b, heads, t, d_head)
        content = (q + self.r_w_bias[:, None]) @ k.transpose(-1, -2)            # (b, heads, t, K)
        by_distance = (q + self.r_r_bias[:, None]) @ positions.permute(1, 2, 0)  # [..., i, r]
        query = torch.arange(t, device=z.device)[:, None] + m       # absolute position M + i
        key = torch.arange(m + t, device=z.device)[None, :]
        distance = (query - key).clamp(min=0)                       # (t, K); future keys masked
        position = by_distance.gather(-1, distance.expand(b, self.n_heads, t, m + t))
        score = (content + position) / math.sqrt(self.d_head)
        score = score.masked_fill(key > query, float("-inf"))
        weights = torch.softmax(score, dim=-1)
        if len(masks) in (1, 3):                                    # m_att was drawn (inject)
            weights = weights * masks[-1]
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, z: torch.Tensor, injection: list) -> torch.Tensor:
        expected = self.init_state(injection).shape
        if z.shape != expected:
            raise ValueError(f"state z has shape {tuple(z.shape)} but the injection is for states "
                             f"of shape {tuple(expected)} (batch, T, {self.d_model}).")
        masks = injection[3:]                           # [m₁, m₂] and/or [m_att], as drawn
        m1, m2 = masks[:2] if len(masks) >= 2 else (1.0, 1.0)
        o = self.attention(z, injection)
        if self.norm_kind == "post":
            y = self.norm1(z + m1 * o)
            return self.norm2(y + m2 * self.ff(y))
        n = self.norm2(z + m1 * o)
        return n + m2 * self.ff(n)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, d_ff={self.d_ff}, "
                f"dropout={self.dropout}, dropatt={self.dropatt}, norm={self.norm_kind!r}, "
                f"weight_norm={self.weight_norm}")
