"""Weight-tied, input-injected cells f(z, x): the layer a DEQ repeats "infinitely often".

An explicit deep network applies different layers z_{k+1} = σ(W_k z_k + U_k x + b_k). A DEQ ties
the weights (W_k = W, U_k = U for every k) and feeds the input into every layer ("input
injection"); its output is the fixed point z* = f(z*, x) of that one layer (Bai, Kolter,
Koltun, "Deep Equilibrium Models", NeurIPS 2019).

Every cell has two methods:

* ``inject(x)``: the part of f that depends only on the input, computed *once* per input;
* ``forward(z, injection)``: one application of the layer, called at every solver iteration;

and ``init_state(injection)``, the starting point z0 of a solve (zeros).

The cells: ``MLPCell`` (vectors), ``ConvCell`` (feature maps at one resolution),
``MultiscaleCell`` (MDEQ: feature maps at several resolutions, a state that is a list),
``TransformerCell`` (a Transformer block over a sequence of states) and ``TransformerXLCell``
(the DEQ-Transformer's block as published: relative positions and a memory of the previous
segment, whose ``inject(x, memory=...)`` takes that memory as a second input). The two
convolutional cells are built from MDEQ's residual block (Bai, Koltun, Kolter, "Multiscale Deep
Equilibrium Models", NeurIPS 2020) with three ingredients that keep a weight-tied conv layer
trainable as an equilibrium model:

* GroupNorm (Wu & He 2018), never BatchNorm: it normalizes each sample on its own, so the samples
  of a batch stay independent (the solvers judge convergence per sample, and a sample's
  equilibrium must not depend on its batch mates).
* Weight normalization (Salimans & Kingma 2016), W = g · V / ‖V‖ per output channel, on the
  convolutions applied at every iteration (torch's ``parametrizations.weight_norm``).
* Variational dropout (Gal & Ghahramani 2016): ONE dropout mask per input, the same at every
  solver iteration, so that f stays one fixed map whose equilibrium exists (a fresh mask per call
  would change f between iterations). The mask drops whole channels, m ∈ {0, 1/(1−p)} of shape
  (batch, channels, 1, 1), as in MDEQ. It is drawn in ``inject`` (once per input) in training
  mode only and travels in the injection list: ``inject`` returns ``[u, m_0, m_1, ...]`` in
  training mode with dropout, ``[u]`` otherwise (eval mode, or p = 0).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._validate import check_int_list, check_positive_ints, check_range, check_tensor, lookup


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


def _wn(conv: nn.Conv2d, enabled: bool) -> nn.Conv2d:
    """``conv`` with weight normalization on its weight (one g per output channel) if enabled."""
    return nn.utils.parametrizations.weight_norm(conv, dim=0) if enabled else conv


def _check_channels(channels: int, groups: int, name: str) -> None:
    check_range(channels, name, low=1, integer=True)
    if channels % groups:
        raise ValueError(f"{name}={channels} is not divisible by groups={groups} (GroupNorm splits "
                         f"the channels into equal groups); pick channels that are multiples of "
                         f"{groups}, or another number of groups.")


def _check_images(x: torch.Tensor, in_channels: int, cell: str) -> None:
    check_tensor(x, "x")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{cell}(in_channels={in_channels}) expects x of shape (batch, "
                         f"{in_channels}, height, width), got {tuple(x.shape)}.")


def variational_mask(like: torch.Tensor, p: float, shared: tuple = (2, 3)) -> torch.Tensor:
    """A variational dropout mask for a state shaped like ``like``: entries 0 with probability p
    and 1/(1−p) otherwise (so E[m] = 1), one draw shared along the dimensions ``shared`` (size 1
    there): ``(2, 3)``, the spatial ones, drops whole channels of (N, C, H, W) feature maps;
    ``(1,)`` drops features of (N, T, d) sequences at every position."""
    shape = [1 if i in shared else n for i, n in enumerate(like.shape)]
    keep = torch.full(shape, 1 - p, dtype=like.dtype, device=like.device)
    return torch.bernoulli(keep) / (1 - p)


def check_dropout(dropout: float) -> None:
    """A dropout rate p in [0, 1) (a rate of 1 would drop everything)."""
    check_range(dropout, "dropout", low=0, high=1)
    if dropout == 1:
        raise ValueError("dropout must be below 1 (a rate of 1 drops every channel or feature).")


class ResidualBlock(nn.Module):
    """MDEQ's residual block, one weight-tied layer on feature maps with C channels:

        y = ReLU(GN(conv₁ z))              3×3 conv, C → e·C channels (e = ``expansion``)
        y = GN(m ⊙ conv₂ y + u)            3×3 conv back to C; m: dropout mask, u: injection
        out = GN(ReLU(y + z))              residual connection, then a normalization

    ``u`` and ``m`` are optional (a branch without injection, or no dropout). conv₁ and conv₂
    carry weight normalization when ``weight_norm`` is true.
    """

    def __init__(self, channels: int, *, expansion: int = 5, groups: int = 8,
                 weight_norm: bool = True):
        super().__init__()
        check_range(expansion, "expansion", low=1, integer=True)
        check_range(groups, "groups", low=1, integer=True)
        _check_channels(channels, groups, "channels")
        inner = expansion * channels
        self.conv1 = _wn(nn.Conv2d(channels, inner, 3, padding=1, bias=False), weight_norm)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.conv2 = _wn(nn.Conv2d(inner, channels, 3, padding=1, bias=False), weight_norm)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, z: torch.Tensor, injection: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(z)))
        y = self.conv2(y)
        if mask is not None:
            y = y * mask
        if injection is not None:
            y = y + injection
        return self.norm3(torch.relu(self.norm2(y) + z))


class ConvCell(nn.Module):
    """A convolutional DEQ cell on one resolution: f(z, x) = ResidualBlock(z; u = conv(x)).

    The injection u is a 3×3 convolution of the input x (batch, in_channels, H, W), computed
    once per input; the state z has shape (batch, channels, H, W) and starts at zero.

    Args:
        in_channels: channels of x.
        channels: channels of the state z.
        expansion: the block's inner width is ``expansion · channels``.
        groups: GroupNorm groups (``channels`` and the inner width must be multiples).
        dropout: variational dropout rate p in [0, 1) (see the module docstring).
        weight_norm: weight-normalize the block's two convolutions.
    """

    def __init__(self, in_channels: int, channels: int, *, expansion: int = 5, groups: int = 8,
                 dropout: float = 0.0, weight_norm: bool = True):
        super().__init__()
        check_range(in_channels, "in_channels", low=1, integer=True)
        check_dropout(dropout)
        self.in_channels, self.channels, self.dropout = in_channels, channels, dropout
        self.block = ResidualBlock(channels, expansion=expansion, groups=groups,
                                   weight_norm=weight_norm)
        self.injection = nn.Conv2d(in_channels, channels, 3, padding=1)

    def inject(self, x: torch.Tensor) -> list:
        """``[u]`` with u = conv(x), plus the dropout mask ``[u, m]`` in training mode."""
        _check_images(x, self.in_channels, "ConvCell")
        u = self.injection(x)
        return [u, variational_mask(u, self.dropout)] if self.training and self.dropout else [u]

    def init_state(self, injection: list) -> torch.Tensor:
        """z0 = 0, shaped like u: (batch, channels, H, W)."""
        return torch.zeros_like(injection[0])

    def forward(self, z: torch.Tensor, injection: list) -> torch.Tensor:
        u, *mask = injection
        if z.shape != u.shape:
            raise ValueError(f"state z has shape {tuple(z.shape)} but the injection has shape "
                             f"{tuple(u.shape)}; they must match.")
        return self.block(z, u, mask[0] if mask else None)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, dropout={self.dropout}"


def _downsample(c_in: int, c_out: int, steps: int, groups: int) -> nn.Sequential:
    """Branch j → branch i > j: ``steps`` = i − j strided 3×3 convs (each halves H and W), each
    followed by GroupNorm, with a ReLU between them; the last one maps to c_out channels."""
    layers = []
    for k in range(steps):
        last = k == steps - 1
        layers += [nn.Conv2d(c_in, c_out if last else c_in, 3, stride=2, padding=1, bias=False),
                   nn.GroupNorm(groups, c_out if last else c_in)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MultiscaleCell(nn.Module):
    """MDEQ's cell (Bai, Koltun, Kolter, NeurIPS 2020): a state of n feature maps, branch i with
    ``channels[i]`` channels at resolution H/2^i (rounded up), all driven to equilibrium together.

    One application f(z, x) = [f_0, ..., f_{n−1}] has two steps:

    1. per resolution, a residual block:  b_i = ResidualBlock_i(z_i; u if i = 0),
       with the injection u = 1×1 conv(x) entering the highest resolution only (as in MDEQ);
    2. multiscale fusion, every branch receiving every other:

           f_i = GN(conv_1×1(ReLU(Σ_j F_ij(b_j))))

       with F_ii = identity, F_ij for j < i: (i − j) strided 3×3 convs (downsampling), and
       F_ij for j > i: a 1×1 conv then nearest-neighbour upsampling to branch i's size.
       (The last GroupNorm has ⌊groups/2⌋ groups and no affine parameters, as in the locuslab
       configs.)

    The blocks' convolutions and the fusion's 1×1 convs carry weight normalization; each branch
    has its own variational dropout mask, drawn in ``inject``: the injection list is
    ``[u, m_0, ..., m_{n−1}]`` in training mode with dropout, ``[u]`` otherwise.

    Args:
        in_channels: channels of x (batch, in_channels, H, W).
        channels: channels of each branch, highest resolution first, e.g. (32, 64, 128, 256).
        expansion, groups, dropout, weight_norm: as for ``ConvCell``, for every branch.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], *, expansion: int = 5,
                 groups: int = 8, dropout: float = 0.0, weight_norm: bool = True):
        super().__init__()
        check_range(in_channels, "in_channels", low=1, integer=True)
        check_range(groups, "groups", low=1, integer=True)
        check_dropout(dropout)
        channels = check_int_list(channels, "channels")
        post_groups = max(1, groups // 2)
        for i, c in enumerate(channels):
            _check_channels(c, groups, f"channels[{i}]")
            _check_channels(c, post_groups, f"channels[{i}]")
        self.in_channels, self.channels, self.dropout = in_channels, channels, dropout
        n = len(channels)
        self.injection = nn.Conv2d(in_channels, channels[0], 1)
        self.branches = nn.ModuleList(
            ResidualBlock(c, expansion=expansion, groups=groups, weight_norm=weight_norm)
            for c in channels)
        self.fuse = nn.ModuleList(nn.ModuleList(
            nn.Identity() if i == j
            else _downsample(channels[j], channels[i], i - j, groups) if j < i
            else nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False),
                               nn.GroupNorm(groups, channels[i]))
            for j in range(n)) for i in range(n))
        self.post_fuse = nn.ModuleList(nn.Sequential(
            nn.ReLU(), _wn(nn.Conv2d(c, c, 1, bias=False), weight_norm),
            nn.GroupNorm(post_groups, c, affine=False)) for c in channels)

    def inject(self, x: torch.Tensor) -> list:
        """``[u]`` with u = 1×1 conv(x) for branch 0, plus one dropout mask per branch in
        training mode: ``[u, m_0, ..., m_{n−1}]``."""
        _check_images(x, self.in_channels, "MultiscaleCell")
        u = self.injection(x)
        if not (self.training and self.dropout):
            return [u]
        masks = [variational_mask(u.new_empty(u.shape[0], c, 1, 1), self.dropout)
                 for c in self.channels]
        return [u, *masks]

    def state_shapes(self, height: int, width: int) -> list:
        """(channels, H_i, W_i) of each branch for a branch-0 size (height, width): a stride-2
        3×3 conv maps a side s to ⌈s/2⌉."""
        shapes = []
        for c in self.channels:
            shapes.append((c, height, width))
            height, width = -(-height // 2), -(-width // 2)
        return shapes

    def init_state(self, injection: list) -> list:
        """z0 = zeros at every resolution."""
        u = injection[0]
        return [u.new_zeros(u.shape[0], *shape) for shape in self.state_shapes(*u.shape[-2:])]

    def forward(self, z: list, injection: list) -> list:
        u, *masks = injection
        n, want = len(self.channels), [(len(u), *s) for s in self.state_shapes(*u.shape[-2:])]
        if not isinstance(z, (list, tuple)) or len(z) != n:
            raise ValueError(f"MultiscaleCell with {n} branches expects a state list of {n} "
                             f"feature maps, got {type(z).__name__} of length "
                             f"{len(z) if isinstance(z, (list, tuple)) else '-'}.")
        for i, (z_i, shape) in enumerate(zip(z, want)):        # shapes only: no tensor is read
            if tuple(z_i.shape) != shape:
                raise ValueError(f"MultiscaleCell: branch {i} of the state has shape "
                                 f"{tuple(z_i.shape)} where {shape} is expected (the shapes "
                                 f"for this injection: {want}, highest resolution first).")
        b = [branch(z_i, u if i == 0 else None, masks[i] if masks else None)
             for i, (branch, z_i) in enumerate(zip(self.branches, z))]
        out = []
        for i in range(n):
            total = b[i]
            for j in range(n):
                if j > i:           # lower resolution: 1×1 conv, then upsample to branch i's size
                    total = total + nn.functional.interpolate(self.fuse[i][j](b[j]),
                                                              size=b[i].shape[-2:], mode="nearest")
                elif j < i:         # higher resolution: strided convs
                    total = total + self.fuse[i][j](b[j])
            out.append(self.post_fuse[i](total))
        return out

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, dropout={self.dropout}"


# --- sequences: the DEQ-Transformer's block ----------------------------------------------------------

NORMS = ("post", "pre")


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """(length, length) additive mask: 0 on and below the diagonal, −inf above (key s > query t),
    so that softmax gives exactly zero weight to future positions."""
    return nn.Transformer.generate_square_subsequent_mask(length, device=like.device,
                                                          dtype=like.dtype)


class TransformerCell(nn.Module):
    """One weight-tied Transformer block with input injection (the DEQ-Transformer of Bai, Kolter,
    Koltun 2019), on states z (batch, T, d) and embedded tokens x:

        u = W_u x + b_u (inject),   h = z + u
        post-LN:  y = LN₁(h + m₁ ⊙ Attn(h)),       f(z, x) = LN₂(y + m₂ ⊙ FFN(y))
        pre-LN:   y = LN₂(h + m₁ ⊙ Attn(LN₁(h))),  f(z, x) = y + m₂ ⊙ FFN(y)

    Attn is ``nn.MultiheadAttention`` with a causal mask (position t sees positions ≤ t), so
    position t of f depends on positions ≤ t only, and the equilibrium is causal too (where it
    is unique). m₁, m₂: variational dropout masks of shape (batch, 1, d), the same at every
    position and solver iteration (no dropout on the attention probabilities: torch's would
    change f between iterations). Pre-LN's FFN residual starts from the normalized y, as in
    locuslab's pre-LN DEQ-Transformer, so that f stays bounded (a textbook pre-LN block returns
    z + u + ..., whose Jacobian I + ... is at best neutrally stable). See
    ``deqlite.models.language`` for how the input enters and the language models around it.

    Args:
        d_model: width of the state z (batch, T, d_model).
        n_heads: attention heads (d_model must be a multiple).
        d_ff: inner width of the feed-forward network.
        dropout: variational dropout rate on the attention and feed-forward outputs.
        norm: ``"post"`` (LayerNorm after each residual sum, the DEQ paper's) or ``"pre"``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, dropout: float = 0.0,
                 norm: str = "post"):
        super().__init__()
        check_positive_ints(d_model=d_model, n_heads=n_heads, d_ff=d_ff)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads} (each head "
                             f"gets d_model / n_heads features); change one of them.")
        check_dropout(dropout)
        self.norm_kind = lookup(NORMS, norm, "norm")
        self.d_model, self.n_heads, self.d_ff, self.dropout = d_model, n_heads, d_ff, dropout
        self.injection = nn.Linear(d_model, d_model)
        self.attention = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def inject(self, x: torch.Tensor) -> list:
        """``[u]`` with u = W_u x + b_u for embedded tokens x (batch, T, d_model), plus the two
        dropout masks ``[u, m₁, m₂]`` in training mode."""
        check_tensor(x, "x")
        if x.dim() != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"TransformerCell(d_model={self.d_model}) expects embedded tokens of "
                             f"shape (batch, T, {self.d_model}), got {tuple(x.shape)}.")
        u = self.injection(x)
        if not (self.training and self.dropout):
            return [u]
        return [u, variational_mask(u, self.dropout, (1,)), variational_mask(u, self.dropout, (1,))]

    def init_state(self, injection: list) -> torch.Tensor:
        """z0 = 0, shaped like u: (batch, T, d_model)."""
        return torch.zeros_like(injection[0])

    def _attend(self, h: torch.Tensor) -> torch.Tensor:
        """Causal self-attention. When a graph is being built, torch's plain ("math") attention
        kernel: the fused CPU/GPU kernels have no second derivative, which the Jacobian
        regularizer needs (it differentiates a vector–Jacobian product)."""
        mask = causal_mask(h.shape[1], h)
        with sdpa_kernel(SDPBackend.MATH) if torch.is_grad_enabled() else nullcontext():
            return self.attention(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]

    def forward(self, z: torch.Tensor, injection: list) -> torch.Tensor:
        u, *masks = injection
        if z.shape != u.shape:
            raise ValueError(f"state z has shape {tuple(z.shape)} but the injection has shape "
                             f"{tuple(u.shape)}; they must match (batch, T, {self.d_model}).")
        m1, m2 = masks if masks else (1.0, 1.0)
        h = z + u
        if self.norm_kind == "post":
            y = self.norm1(h + m1 * self._attend(h))
            return self.norm2(y + m2 * self.ff(y))
        y = self.norm2(h + m1 * self._attend(self.norm1(h)))
        return y + m2 * self.ff(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, d_ff={self.d_ff}, "
                f"dropout={self.dropout}, norm={self.norm_kind!r}")


# --- the published DEQ-Transformer block: relative positions and a memory (Transformer-XL) ----------

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
    earlier tokens; K = M + T keys. With h = [z_mem; z] (batch, K, d):

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
        check_positive_ints(d_model=d_model, n_heads=n_heads, d_ff=d_ff)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads} (each head "
                             f"gets d_model / n_heads features); change one of them.")
        check_dropout(dropout)
        check_range(dropatt, "dropatt", low=0, high=1)
        if dropatt == 1:
            raise ValueError("dropatt must be below 1 (a rate of 1 drops every attention weight).")
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
