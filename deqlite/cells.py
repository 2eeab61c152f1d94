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
``MultiscaleCell`` (MDEQ: feature maps at several resolutions, a state that is a list) and
``TransformerCell`` (a Transformer block over a sequence of states; the published
DEQ-Transformer's block, with relative positions and a memory, is ``deqlite.transformer_xl``).
The two
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

from contextlib import nullcontext
from typing import Optional, Sequence

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


def check_dropout(dropout: float, name: str = "dropout") -> None:
    """A dropout rate p in [0, 1) (a rate of 1 would drop everything)."""
    check_range(dropout, name, low=0, high=1)
    if dropout == 1:
        raise ValueError(f"{name} must be below 1 (a rate of 1 would drop everything).")


def check_heads(d_model: int, n_heads: int, d_ff: int) -> None:  # a Transformer block's widths
    check_positive_ints(d_model=d_model, n_heads=n_heads, d_ff=d_ff)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads} (each head "
                         f"gets d_model / n_heads features); change one of them.")


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
        check_heads(d_model, n_heads, d_ff)
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

