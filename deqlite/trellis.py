"""The TrellisNet cell: a weight-tied causal temporal convolution with an LSTM-style gate, the layer
of DEQ-TrellisNet (Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019), built on
TrellisNet (Bai, Kolter, Koltun, "Trellis Networks for Sequence Modeling", ICLR 2019).

A TrellisNet is a temporal convolutional network whose layers all share one set of weights and
all see the input sequence again. Layer i+1 at position t reads a window of k positions
(t−k+1, ..., t) of the input x and of layer i's hidden sequence h⁽ⁱ⁾, zeros before the start:

    a_t     = Σ_{j=0}^{k−1} ( W_x[j] x_{t−j} + W_h[j] h⁽ⁱ⁾_{t−j} ) + b      4·d pre-activations
    i, o, g, f = σ(a¹), σ(a²), tanh(a³), σ(a⁴)                            the four gates, d each
    c⁽ⁱ⁺¹⁾_t = f ⊙ c⁽ⁱ⁾_{t−1} + i ⊙ g                                      cell state
    h⁽ⁱ⁺¹⁾_t = o ⊙ tanh(c⁽ⁱ⁺¹⁾_t)                                         hidden state

The sum over j is a 1-D convolution of kernel size k over the concatenation [x; h⁽ⁱ⁾] of
d_in + d channels. Like an LSTM, the gate mixes the previous cell state into the new one, but
the previous one is c⁽ⁱ⁾_{t−1}: one layer down and one position back (the diagonal of the
"trellis"). Starting from h⁽⁰⁾ = c⁽⁰⁾ = 0 and applying the layer L times is TrellisNet of depth L
(``deqlite.models.trellisnet.TrellisNetLM``); DEQ-TrellisNet applies it until nothing changes.

What the fixed point is over. The layer maps (h⁽ⁱ⁾, c⁽ⁱ⁾) to (h⁽ⁱ⁺¹⁾, c⁽ⁱ⁺¹⁾), so the state is
both, concatenated per position as in locuslab's DEQ-TrellisNet (``TrellisNetLSTMLayer``):

    z = [h; c]  of shape (batch, T, 2·d),     z* = f(z*, x)

(h alone is not a state: c⁽ⁱ⁺¹⁾ needs c⁽ⁱ⁾). The output of the model is read from h*.

Input injection. The input half of the convolution, u = W_x ∗ x + b_x (batch, T, 4·d), does not
change from one layer to the next: ``inject`` computes it once, and every application of f adds
it to the hidden half W_h ∗ h + b_h (the single bias b is split into b_x + b_h, as locuslab has
one bias per convolution).

Why it is causal. Position t of f reads x and h at positions ≤ t and c at position t−1 only: the
convolution is padded with k−1 zeros on the left (none on the right) and the cell state is shifted
right by one. So position t of every iterate, and of the equilibrium (where it is unique),
depends on tokens ≤ t only: a language model built on it never sees the token it predicts.
Each application of f widens the receptive field by max(k−1, 1) positions (k−1 through h, one
through c): the last of T positions hears of the first only after about T/(k−1) iterations.

Training ingredients, as in locuslab: weight normalization (Salimans & Kingma 2016) on both
convolutions (``torch.nn.utils.parametrizations.weight_norm``, one g per output channel), the
hidden convolution initialized small (N(0, 0.01), so that f starts as a contraction), and
variational dropout on h: one mask m ∈ {0, 1/(1−p)} of shape (batch, 1, d) per input, drawn in
``inject`` and the same at every position and every solver iteration (``deqlite.cells``:
a fresh mask per call would change f between iterations). ``inject`` returns ``[u, m]`` in
training mode with dropout, ``[u]`` otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_positive_ints, check_range, check_tensor
from .cells import check_dropout, variational_mask

HIDDEN_INIT_STD = 0.01          # locuslab's WeightShareConv1d.init_weights


def causal_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1-D convolution along the positions of x (batch, T, C) that looks back only: k−1 zeros
    on the left, none on the right, so output t reads x_{t−k+1}, ..., x_t. (batch, T, C_out)."""
    k = conv.kernel_size[0]
    return conv(F.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)


def shift_right(c: torch.Tensor) -> torch.Tensor:
    """c_{t−1} at position t, 0 at t = 0: (batch, T, d) moved one position later."""
    return F.pad(c, (0, 0, 1, 0))[:, :-1]


def gated_activation(a: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TrellisNet's LSTM-style gate: pre-activations a (..., 4·d) in the order (i, o, g, f) and
    the previous cell state c_prev (..., d) → (h, c) with c = σ(f) c_prev + σ(i) tanh(g) and
    h = σ(o) tanh(c)."""
    i, o, g, f = a.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _wn(conv: nn.Conv1d, enabled: bool) -> nn.Conv1d:
    return nn.utils.parametrizations.weight_norm(conv, dim=0) if enabled else conv


class TrellisCell(nn.Module):
    """One TrellisNet layer as a DEQ cell, on sequences (module docstring):

        u = W_x ∗ x + b_x                        (inject: once per input)
        a = u + W_h ∗ (m ⊙ h) + b_h              causal convolutions of kernel size k
        (h', c') = gate(a, c shifted right)      f([h; c], x) = [h'; c']

    Args:
        d_in: width of the input x (batch, T, d_in), e.g. the token embeddings.
        d_hidden: width d of h and of c; the state z = [h; c] has shape (batch, T, 2·d_hidden).
        kernel_size: k, the positions each convolution reads (t−k+1, ..., t); locuslab uses 2.
        dropout: variational dropout rate on h inside f (one mask per input, see above).
        weight_norm: weight-normalize both convolutions (``parametrizations.weight_norm``).
    """

    def __init__(self, d_in: int, d_hidden: int, *, kernel_size: int = 2, dropout: float = 0.0,
                 weight_norm: bool = True):
        super().__init__()
        check_positive_ints(d_in=d_in, d_hidden=d_hidden, kernel_size=kernel_size)
        check_dropout(dropout)
        if not isinstance(weight_norm, bool):
            raise TypeError(f"weight_norm must be True or False, got {weight_norm!r}.")
        self.d_in, self.d_hidden, self.kernel_size = d_in, d_hidden, kernel_size
        self.dropout, self.weight_norm = dropout, weight_norm
        self.inject_conv = nn.Conv1d(d_in, 4 * d_hidden, kernel_size)          # W_x, b_x
        self.hidden_conv = nn.Conv1d(d_hidden, 4 * d_hidden, kernel_size)      # W_h, b_h
        nn.init.normal_(self.hidden_conv.weight, std=HIDDEN_INIT_STD)
        nn.init.normal_(self.hidden_conv.bias, std=HIDDEN_INIT_STD)
        self.inject_conv = _wn(self.inject_conv, weight_norm)
        self.hidden_conv = _wn(self.hidden_conv, weight_norm)

    def inject(self, x: torch.Tensor) -> list:
        """``[u]`` with u = W_x ∗ x + b_x (batch, T, 4·d_hidden) for x (batch, T, d_in), plus the
        dropout mask on h ``[u, m]``, m of shape (batch, 1, d_hidden), in training mode."""
        check_tensor(x, "x")
        if x.dim() != 3 or x.shape[2] != self.d_in:
            raise ValueError(f"TrellisCell(d_in={self.d_in}) expects a sequence x of shape "
                             f"(batch, T, {self.d_in}), got {tuple(x.shape)}.")
        u = causal_conv(self.inject_conv, x)
        if not (self.training and self.dropout):
            return [u]
        return [u, variational_mask(u[..., : self.d_hidden], self.dropout, (1,))]

    def init_state(self, injection: list) -> torch.Tensor:
        """z0 = [h; c] = 0, of shape (batch, T, 2·d_hidden)."""
        u = injection[0]
        return u.new_zeros(*u.shape[:2], 2 * self.d_hidden)

    def forward(self, z: torch.Tensor, injection: list) -> torch.Tensor:
        u, *mask = injection
        want = (*u.shape[:2], 2 * self.d_hidden)
        if tuple(z.shape) != want:
            raise ValueError(f"state z has shape {tuple(z.shape)}, but for this injection the "
                             f"cell's state [h; c] has shape {want} (batch, T, 2·d_hidden).")
        h, c = z.split(self.d_hidden, dim=-1)
        if mask:
            h = h * mask[0]
        a = u + causal_conv(self.hidden_conv, h)
        h, c = gated_activation(a, shift_right(c))
        return torch.cat([h, c], dim=-1)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_hidden={self.d_hidden}, kernel_size={self.kernel_size}, "
                f"dropout={self.dropout}, weight_norm={self.weight_norm}")
