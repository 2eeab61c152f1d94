"""Checks for notebook 06's exercises (convolutional and multiscale DEQs)."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...cells import ResidualBlock
from ._harness import (_call, CheckFailed, _compare, DT, exercise, _fail, NotWrittenYet, _numbered,
                       _passed, _which)


@exercise
def check_fuse_two(fn: Callable) -> bool:
    """fn(b0, b1, down, up) -> [f0, f1]: two-branch multiscale fusion,
    f0 = b0 + nearest-upsample(up(b1)) to b0's size, f1 = b1 + down(b0)."""
    for seed, (h, w) in [(0, (8, 8)), (1, (7, 7)), (2, (6, 9))]:   # odd: 7 → 4 → back to 7
        torch.manual_seed(seed)
        size = f"{h}×{w}"
        b0 = torch.randn(2, 4, h, w, dtype=DT)
        b1 = torch.randn(2, 6, (h + 1) // 2, (w + 1) // 2, dtype=DT)
        down = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
        up = nn.Conv2d(6, 4, 1).double()
        expected = [b0 + F.interpolate(up(b1), size=b0.shape[-2:], mode="nearest"), b1 + down(b0)]
        got = _call(fn, "fuse_two", b0, b1, down, up)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            raise CheckFailed(f"fuse_two should return a list [f0, f1] of two feature maps, got "
                              f"{type(got).__name__}.")
        hint = ("f0 keeps b0 and adds the low-resolution branch brought up: up(b1) (a 1×1 conv to "
                "b0's channels), then F.interpolate(..., size=b0.shape[-2:], mode='nearest') — "
                "`size=`, not scale_factor=2, so odd sizes work; f1 keeps b1 and adds down(b0).")
        for i in range(2):
            _compare(got[i], expected[i], f"fuse_two output f{i} (branch-0 size {size})",
                     hint, rtol=1e-10, atol=1e-12)
    return _passed("fuse_two", "both outputs right, for even, odd and non-square resolutions")


@exercise
def check_state_numel(fn: Callable) -> bool:
    """fn(channels, height, width) -> entries of one sample's multiscale state, branch i at
    ⌈H/2^i⌉ × ⌈W/2^i⌉ (each stride-2 conv maps a side s to ⌈s/2⌉)."""
    for channels, h, w in [([24, 24], 32, 32), ([32, 64, 128, 256], 56, 56), ([4, 8, 16], 7, 9)]:
        got = _call(fn, "state_numel", list(channels), h, w, convert=_numbered("state_numel"))
        # halving i times rounding up each time is one division rounding up: ⌈s / 2^i⌉
        expected = sum(c * -(-h // 2 ** i) * -(-w // 2 ** i) for i, c in enumerate(channels))
        if got != expected:
            raise CheckFailed(
                f"state_numel({channels}, {h}, {w}): expected {expected}, got {got}. Branch i has "
                f"channels[i] maps of size ⌈H/2^i⌉ × ⌈W/2^i⌉: halve the sides *rounding up* after "
                f"each branch (-(-h // 2) in Python), starting from the full size for branch 0.")
    return _passed("state_numel", "right for 3 multiscale states, odd sizes included")


def _student_file(fn: Any) -> str | None:
    """The file (a notebook cell) the student's code was written in: a function's, or for a class
    (a module's forward, a class passed for a factory) that of its methods."""
    for code in (getattr(fn, "__code__", None), getattr(getattr(fn, "__init__", None), "__code__",
                                                        None)):
        if code is not None:
            return code.co_filename
    return None


def _traced(fn: Callable, what: str, filename: str | None, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) where fn runs code of the student's that is not fn's own body (a class's
    methods, written in the same cell as fn): a NotImplementedError raised by a frame of the
    student's file that ran only its ``raise`` line means "not written yet"; one raised after more
    lines of that frame ran is a failure (the rule ``_call`` applies to a function's body)."""
    lines: dict = {}

    def local(frame, event, arg):
        if event == "line":
            lines[frame] = lines.get(frame, 0) + 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        tb, raised = e.__traceback__, None
        while tb is not None:                       # the innermost frame of the student's file
            if tb.tb_frame.f_code.co_filename == filename:
                raised = tb.tb_frame
            tb = tb.tb_next
        ran = lines.get(raised, 0)
        method = f"{raised.f_code.co_name} " if raised is not None else ""
        if ran <= 1:
            raise NotWrittenYet(f"{what} is not written yet ({method}still raises "
                                f"NotImplementedError): replace `raise NotImplementedError()` with "
                                f"your code, run that cell again, then this check.") from None
        raise CheckFailed(f"{what}: {method}raised NotImplementedError after {ran} lines of your "
                          f"code ran: once your code is written, delete the "
                          f"`raise NotImplementedError()` line.") from None
    finally:
        sys.settrace(previous)


def _build(fn: Callable, channels: int, expansion: int, groups: int) -> nn.Module:
    """The student's block, fn(channels, expansion=..., groups=...), through the common rules."""
    def build(channels, expansion, groups):
        return _traced(fn, "conv_block", _student_file(fn), channels, expansion=expansion,
                       groups=groups)

    block = _call(build, "conv_block", channels, expansion, groups)
    if not isinstance(block, nn.Module):
        raise CheckFailed(f"conv_block should return an nn.Module (an instance of your ConvBlock), "
                          f"got {type(block).__name__}.")
    if "_modules" not in vars(block):
        raise CheckFailed(f"conv_block: your {type(block).__name__} was never set up as an "
                          f"nn.Module: begin its __init__ with super().__init__(), then create "
                          f"the layers.")
    return block.train()


def _run(block: nn.Module, z, injection, mask) -> Any:
    """The student's block(z, injection, mask) through the common rules: arguments changed in
    place, exceptions, a forward not written yet."""
    filename = _student_file(type(block).forward)

    def forward(z, injection, mask):
        return _traced(block, "conv_block", filename, z, injection, mask)

    return _call(forward, f"{type(block).__name__}.forward", z=z, injection=injection, mask=mask)


def _random_block(channels: int, expansion: int, groups: int, weight_norm: bool,
                  seed: int) -> ResidualBlock:
    """deqlite's block in float64 with random weights, GroupNorm scales and shifts included (at
    their defaults 1 and 0 a wrong order of the norms could go unseen)."""
    torch.manual_seed(seed)
    ref = ResidualBlock(channels, expansion=expansion, groups=groups,
                        weight_norm=weight_norm).double()
    with torch.no_grad():
        for norm in (ref.norm1, ref.norm2, ref.norm3):
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
    return ref


def _wrong_blocks(ref: ResidualBlock, z, u, m) -> dict[str, torch.Tensor]:
    """What the usual mistakes give on the reference's weights: hint → output."""
    one = 1 if m is None else m
    c1 = torch.relu(ref.norm1(ref.conv1(z)))
    c2 = ref.conv2(c1) * one
    n3, n2 = ref.norm3, ref.norm2
    wrong = {
        "The injection u is added *inside* GN₂, to m ⊙ conv₂(y), before that norm: "
        "GN₂(m ⊙ conv₂ y + u); you added it after GN₂.": n3(torch.relu(n2(c2) + u + z)),
        "The injection u goes inside the block (before GN₂), not after the last norm: the output "
        "of the block is GN₃(ReLU(y + z)) with nothing added after it.":
            n3(torch.relu(n2(c2) + z)) + u,
        "The residual connection is missing: f = GN₃(ReLU(y + z)) adds the block's input z back "
        "before the ReLU.": n3(torch.relu(n2(c2 + u))),
        "ReLU and GN₃ are swapped: the last step is GN₃(ReLU(y + z)), the ReLU first.":
            torch.relu(n3(n2(c2 + u) + z)),
        "The first stage is ReLU(GN₁(conv₁ z)): normalize, then ReLU (not the other way round).":
            n3(torch.relu(n2(ref.conv2(ref.norm1(torch.relu(ref.conv1(z)))) * one + u) + z)),
        "The first stage needs its ReLU: y = ReLU(GN₁(conv₁ z)).":
            n3(torch.relu(n2(ref.conv2(ref.norm1(ref.conv1(z))) * one + u) + z)),
        "The injection enters at GN₂ (GN₂(m ⊙ conv₂ y + u)), not at conv₁'s input.":
            n3(torch.relu(n2(ref.conv2(torch.relu(ref.norm1(ref.conv1(z + u)))) * one) + z)),
    }
    if m is not None:
        wrong["The mask multiplies conv₂'s output only, m ⊙ conv₂ y, before u is added (the "
              "injection is never dropped): GN₂(m ⊙ conv₂ y + u)."] = \
            n3(torch.relu(n2((ref.conv2(c1) + u) * m) + z))
        wrong["The mask was not used: with a mask m, GN₂(m ⊙ conv₂ y + u)."] = \
            n3(torch.relu(n2(ref.conv2(c1) + u) + z))
    return wrong


def _norms(module: nn.Module, kind: type) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, kind)]


def _structure_hint(block: nn.Module, ref: ResidualBlock, expansion: int) -> str:
    """Why the student's block has another number of parameters than the reference."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if any(c.bias is not None for c in convs):
        return ("Give both convolutions bias=False, as in MDEQ: the injection u (whose "
                "convolution has a bias) and the GroupNorms' shifts β already add a constant per "
                "channel, so a bias is a parameter the block does not have.")
    if len(_norms(block, nn.GroupNorm)) < 3:
        return ("Create the three GroupNorms (and both convolutions) in __init__, as attributes "
                "norm1, norm2, norm3: a module created inside forward is a new one, with new "
                "parameters, at every call, and the optimizer never sees them.")
    if any(not m.affine for m in block.modules() if isinstance(m, nn.GroupNorm)):
        return ("Keep the GroupNorms' own scale and shift (nn.GroupNorm's default affine=True): "
                "the block has them.")
    if convs and convs[0].out_channels != expansion * ref.conv1.in_channels:
        return (f"conv1 widens the C channels to expansion · C = {expansion} · "
                f"{ref.conv1.in_channels} = {expansion * ref.conv1.in_channels}, and conv2 brings "
                f"them back to C.")
    return ("The block has two 3×3 convolutions (C → expansion·C and back, no bias) and three "
            "GroupNorms with their scale and shift.")


@exercise
def check_conv_block(fn: Callable) -> bool:
    """fn(channels, expansion, groups) -> a module with submodules conv1, norm1, conv2, norm2,
    norm3 whose forward(z, injection, mask=None) is MDEQ's residual block (deqlite's
    ResidualBlock without weight normalization)."""
    hint = ("One application is y = ReLU(GN₁(conv₁ z)), y = GN₂(m ⊙ conv₂ y + u), "
            "f = GN₃(ReLU(y + z)) (m = 1 when mask is None), with the submodules the docstring "
            "names and GroupNorms of `groups` groups (the argument, not a fixed number).")
    families = [  # channels, expansion, groups, batch, (H, W), dtype, with a mask
        (4, 2, 2, 3, (5, 7), DT, True), (6, 1, 3, 1, (4, 4), DT, False),
        (8, 3, 4, 2, (3, 6), torch.float32, True)]
    with torch.random.fork_rng(devices=[]):
        for k, (C, e, G, N, (H, W), dtype, masked) in enumerate(families):
            size = (f"conv_block({C}, expansion={e}, groups={G}) on a batch of {N} "
                    f"{H}×{W} maps ({str(dtype).removeprefix('torch.')})")
            block = _build(fn, C, e, G)
            # 1. one map: the same input gives the same output (the block's own weights)
            g = torch.Generator().manual_seed(k)
            own = next(iter(block.parameters()), torch.empty(0)).dtype
            z = torch.randn(4, C, H, W, generator=g, dtype=DT).to(own)
            u = torch.randn(4, C, H, W, generator=g, dtype=DT).to(own)
            out = _run(block, z, u, None)
            if not isinstance(out, torch.Tensor) or out.shape != z.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise _fail(size, f"expected a tensor of z's shape {tuple(z.shape)}, got {got}.",
                            "forward returns the new state f, shaped like z.")
            if not torch.equal(out, _run(block, z, u, None)):
                raise _fail(size, "two calls with the same z and u gave different outputs.",
                            "f must be one fixed map, the same at every solver iteration: no "
                            "nn.Dropout or other randomness inside forward (it draws a fresh mask "
                            "at every call; dropout enters through the `mask` argument, drawn "
                            "once per input).")
            # 2. a sample's output depends on that sample only
            z2, u2 = z.clone(), u.clone()
            z2[1:], u2[1:] = 3 * z2[1:] + 1, 2 * u2[1:] - 1
            moved = (out[0] - _run(block, z2, u2, None)[0]).abs().max().item()
            if not moved <= 1e-5 * (1 + out[0].abs().max().item()):
                batchnorm = _norms(block, nn.modules.batchnorm._BatchNorm)
                raise _fail(f"{size}: sample 0's output moved by {moved:.3g} when only the other "
                            f"samples of the batch changed", "a sample's equilibrium must not "
                            "depend on its batch mates (the solvers judge each sample on its own, "
                            "and the implicit backward differentiates one sample's fixed point).",
                            f"{', '.join(batchnorm)}: BatchNorm normalizes each channel with "
                            f"statistics of the whole batch. Use nn.GroupNorm(groups, channels), "
                            f"which normalizes each sample on its own." if batchnorm
                            else "Normalize each sample on its own (nn.GroupNorm): no mean, norm "
                            "or statistic over the batch dimension.")
            # 3. the parameters: as many as the reference's, under the docstring's names
            wn = any("parametrizations" in name for name in block.state_dict())
            ref = _random_block(C, e, G, wn, seed=10 + k)
            n_got = sum(p.numel() for p in block.parameters())
            n_ref = sum(p.numel() for p in ref.parameters())
            if n_got != n_ref:
                raise _fail(size, f"{n_got} parameters, expected {n_ref} (conv1 "
                            f"{ref.conv1.weight.numel()}, norm1 {2 * e * C}, conv2 "
                            f"{ref.conv2.weight.numel()}, norm2 and norm3 {2 * C} each).",
                            _structure_hint(block, ref, e))
            _load(block.double(), ref, size)
            block.to(dtype)
            ref.to(dtype)
            # 4. the value on the reference's weights: with and without a mask, several shapes
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == DT else dict(rtol=1e-4, atol=1e-5)
            g = torch.Generator().manual_seed(20 + k)
            z = torch.randn(N, C, H, W, generator=g, dtype=DT).to(dtype)
            u = torch.randn(N, C, H, W, generator=g, dtype=DT).to(dtype)
            m = (torch.rand(N, C, 1, 1, generator=g, dtype=DT) > 0.4).to(dtype) / 0.6
            for mask in ([None, m] if masked else [None]):
                what = size + (", with a dropout mask" if mask is not None else ", mask=None")
                got = _run(block, z, u, mask)
                with torch.no_grad():
                    expected = ref(z, u, mask)
                    specific = _which(got, _wrong_blocks(ref, z, u, mask), hint)
                _compare(got, expected, what, specific, **tol)
        # 5. the gradient (what training and the implicit backward use), float64
        C, e, G = 4, 2, 2
        block = _build(fn, C, e, G)
        ref = _random_block(C, e, G, any("parametrizations" in n for n in block.state_dict()), 30)
        _load(block.double(), ref, f"conv_block({C}, expansion={e}, groups={G})")
        g = torch.Generator().manual_seed(31)
        z, u, w = (torch.randn(2, C, 5, 7, generator=g, dtype=DT) for _ in range(3))
        m = (torch.rand(2, C, 1, 1, generator=g, dtype=DT) > 0.5).to(DT) * 2
        grads = {}
        for label, module in (("yours", block), ("reference", ref)):
            zz, uu = z.clone().requires_grad_(), u.clone().requires_grad_()
            names, params = zip(*module.named_parameters())
            try:
                got = torch.autograd.grad((module(zz, uu, m) * w).sum(), [zz, uu, *params],
                                          allow_unused=True)
            except Exception as err:
                raise CheckFailed(f"conv_block: the gradient of (f · w).sum() could not be "
                                  f"computed ({type(err).__name__}: {err}).") from None
            grads[label] = dict(zip(("z", "injection", *names), got))
        for name, expected in grads["reference"].items():
            got = grads["yours"].get(name)
            _compare(torch.zeros_like(expected) if got is None else got, expected,
                     f"the gradient of (f · w).sum() with respect to {name} (batch of 2, 5×7)",
                     "The block must stay differentiable in z, u and its weights, the way the "
                     "math is written: no .detach(), .item() or torch.no_grad() inside forward.",
                     rtol=1e-8, atol=1e-10)
        # 6. the fixed point exists: with a small scale in GN₃, forward iteration contracts
        with torch.no_grad():
            for module in (block, ref):
                module.norm3.weight.mul_(0.15)
            z_star = torch.zeros_like(u)
            for _ in range(200):
                z_star = ref(z_star, u)
            z, residual, steps = torch.zeros_like(u), float("inf"), 0
            while residual > 1e-11 and steps < 200:
                fz = _run(block, z, u, None)
                residual, z, steps = ((fz - z).norm() / fz.norm()).item(), fz, steps + 1
        _compare(z, z_star, "forward iteration z ← f(z, u) from z = 0 on your block, with GN₃'s "
                 "scale ×0.15 (a contraction)", "With the same weights your block is the same "
                 "map as deqlite's, so it has the same fixed point: f must not keep any state "
                 "between calls.", rtol=1e-8, atol=1e-10)
    return _passed("conv_block", f"deqlite's block on the same weights (3 sizes, 5×7 maps, batch "
                   f"of 1, mask or none, float32 and float64), samples independent, no extra "
                   f"parameter, the gradient right; forward iteration reaches the fixed point in "
                   f"{steps} steps when GN₃ contracts")


def _load(block: nn.Module, ref: ResidualBlock, what: str) -> None:
    """Copy the reference's weights into the student's block, by the docstring's names."""
    try:
        block.load_state_dict(ref.state_dict())
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:])
        raise _fail(what, f"the block's weights cannot be matched by name with deqlite's block: "
                    f"{detail} (your block has {', '.join(block.state_dict())}).",
                    "Name the submodules as the docstring says, conv1, norm1, conv2, norm2, norm3 "
                    "(self.conv1 = nn.Conv2d(...), ...), with those shapes.") from None


class _MaskedBlock:
    """block(z, u, m) = tanh(0.3 z + u) ⊙ m (no ⊙ when m is None) for the dropout_map check: a
    contraction for 1/(1 − p) < 3.3. Counts its calls, keeps the masks it was handed, and stops a
    runaway loop."""

    def __init__(self, limit: int = 500):
        self.calls, self.masks, self.limit = 0, [], limit

    @staticmethod
    def value(z, u, m):
        out = torch.tanh(0.3 * z + u)
        return out if m is None else out * m

    def __call__(self, z, injection, mask=None):
        self.calls += 1
        if self.calls > self.limit:
            raise CheckFailed(f"block was called more than {self.limit} times: the check stopped "
                              f"it.")
        self.masks.append(mask)
        if isinstance(mask, torch.Tensor):
            try:
                torch.broadcast_shapes(mask.shape, z.shape)
            except RuntimeError:
                raise CheckFailed(f"dropout_map: the mask has shape {tuple(mask.shape)}, which "
                                  f"does not broadcast against the state {tuple(z.shape)}; it "
                                  f"should be (batch, channels, 1, 1) = "
                                  f"{(z.shape[0], z.shape[1], 1, 1)}.") from None
        return self.value(z, injection, mask)


def _check_mask(m, u: torch.Tensor, p: float, what: str, statistics: bool) -> None:
    shape = (u.shape[0], u.shape[1], 1, 1)
    if m is None:
        if p == 0:
            return
        raise _fail(what, "f called block(z, u) without a mask.",
                    "Pass the mask to block as its third argument, block(z, u, m): the block "
                    "applies it to conv₂'s output, where MDEQ puts it (multiplying f's output by "
                    "m instead would drop channels of the state itself).")
    if not isinstance(m, torch.Tensor):
        raise _fail(what, f"the mask should be a tensor, got {type(m).__name__}.")
    if m.dtype != u.dtype or m.device != u.device:
        raise _fail(what, f"the mask has dtype {m.dtype} on {m.device}; expected u's, {u.dtype} "
                    f"on {u.device}.", "Draw it with dtype=u.dtype, device=u.device (or "
                    "torch.full(..., dtype=u.dtype, device=u.device)); no .float(), no fixed "
                    "dtype.")
    if tuple(m.shape) != shape:
        if m.dim() <= 4 and m.shape[-3:] == (u.shape[1], 1, 1) and m.numel() == u.shape[1]:
            hint = (f"One draw per sample: shape (batch, channels, 1, 1) = {shape}. With one mask "
                    f"for the whole batch every sample loses the same channels, and a sample's "
                    f"map depends on which batch it came in.")
        elif tuple(m.shape) == tuple(u.shape):
            hint = (f"Whole channels: one number per sample and channel, shape {shape}, which "
                    f"broadcasts over height and width (MDEQ's variational dropout drops whole "
                    f"feature maps, not single pixels).")
        else:
            hint = f"The mask has one entry per sample and channel: shape {shape}."
        raise _fail(what, f"the mask has shape {tuple(m.shape)}, expected {shape}.", hint)
    if p == 0:
        _compare(m, torch.ones_like(m), what + ": the mask with p = 0", "With p = 0 nothing is "
                 "dropped: every entry of m is 1 (or pass no mask at all).")
        return
    scale = 1 / (1 - p)
    values = m.detach().to(DT)
    zero, kept = values.abs() <= 1e-6, (values - scale).abs() <= 1e-5 * scale
    if not bool((zero | kept).all()):
        ones = (values - 1).abs() <= 1e-6
        hint = (f"Scale the kept channels by 1/(1 − p) = {scale:.4g}, so that E[m] = 1 and the "
                f"map's output keeps its size on average (what the model sees in evaluation, "
                f"without dropout)." if bool((zero | ones).all()) else
                f"Each entry is 0 (probability p) or 1/(1 − p) = {scale:.4g}.")
        bad = values[~(zero | kept)][0].item()
        raise _fail(what, f"the mask has an entry {bad!r}; expected only 0 and {scale!r}.", hint)
    if statistics:
        dropped = zero.to(DT).mean().item()
        spread = 6 * math.sqrt(p * (1 - p) / m.numel()) + 1e-3
        if abs(dropped - p) > spread:
            hint = (f"torch.bernoulli(q) draws 1 with probability q: the probability to *keep* a "
                    f"channel is 1 − p = {1 - p:g}." if abs(dropped - (1 - p)) <= spread else
                    f"Each channel is dropped with probability p = {p:g}, independently.")
            raise _fail(what, f"the mask drops {dropped:.1%} of {m.numel()} channels, expected "
                        f"about p = {p:.0%}.", hint)


def _call_map(f, z: torch.Tensor, what: str):
    def f_of(z):
        return f(z)

    return _call(f_of, what, z=z)


@exercise
def check_dropout_map(fn: Callable) -> bool:
    """fn(block, u, p) -> f with f(z) = block(z, u, m) for one channel-dropout mask m of shape
    (batch, channels, 1, 1), m ∈ {0, 1/(1 − p)}, drawn once per call of fn."""
    families = [("a batch of 200 states of 40 channels, 2×3, p = 0.3", (200, 40, 2, 3), DT, 0.3),
                ("one sample of 3 channels, 2×2, float32, p = 0.5", (1, 3, 2, 2), torch.float32,
                 0.5),
                ("a batch of 5 states, p = 0 (no dropout)", (5, 4, 2, 3), DT, 0.0)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for k, (what, shape, dtype, p) in enumerate(families):
            g = torch.Generator().manual_seed(k)
            u = torch.randn(shape, generator=g, dtype=DT).to(dtype)
            block = _MaskedBlock()
            f = _call(fn, "dropout_map", block, u, p)
            if not callable(f):
                raise _fail(f"dropout_map on {what}", f"expected the map f (a function of z), got "
                            f"{type(f).__name__}.", "Return f, e.g. `return lambda z: "
                            "block(z, u, m)`, with m drawn before.")
            if block.calls:
                raise _fail(f"dropout_map on {what}", f"it evaluated block {block.calls} time(s) "
                            f"before f was ever called.", "The mask's shape is (u.shape[0], "
                            "u.shape[1], 1, 1): it needs no evaluation of block. dropout_map only "
                            "draws m; f evaluates the block (each evaluation is a solver "
                            "iteration's cost).")
            z1 = torch.randn(shape, generator=g, dtype=DT).to(dtype)
            out1 = _call_map(f, z1, f"f = dropout_map(block, u, p) on {what}")
            if block.calls != 1:
                raise _fail(f"f(z) on {what}", f"one call of f evaluated block {block.calls} "
                            f"times.", "f(z) is one evaluation: block(z, u, m).")
            m1 = block.masks[-1]
            _check_mask(m1, u, p, f"f(z) on {what}", statistics=k == 0)
            _compare(out1, _MaskedBlock.value(z1, u, m1), f"f(z) on {what}", "f(z) is "
                     "block(z, u, m), returned as it is.", rtol=1e-6, atol=1e-7)
            # the same mask at the next call, whatever z: f is one map
            z2 = torch.randn(shape, generator=g, dtype=DT).to(dtype)
            _call_map(f, z2, f"f = dropout_map(block, u, p) on {what}")
            m2 = block.masks[-1]
            if p and not (isinstance(m2, torch.Tensor) and m2.shape == m1.shape
                          and torch.equal(m1, m2)):
                raise _fail(f"f on {what}", "the second call of f used another mask than the "
                            "first.", "Draw m once, in dropout_map, before you define f, and use "
                            "that same m at every call of f: a mask drawn inside f changes the map "
                            "at every solver iteration, so there is no fixed point to converge to.")
            if k == 0:
                # a new input (a new solve) gets its own mask
                other = _MaskedBlock()
                _call_map(_call(fn, "dropout_map", other, u, p), z1,
                          f"f = dropout_map(block, u, p) on {what}")
                if isinstance(other.masks[-1], torch.Tensor) and torch.equal(other.masks[-1], m1):
                    raise _fail(f"dropout_map called twice on {what}", "both calls drew the "
                                "same mask.", "Each call of dropout_map (each input, each solve) "
                                "draws a fresh mask: no torch.manual_seed inside it (which would "
                                "also reset every other random number of the program).")
                iterations = _converges(fn, g)
    return _passed("dropout_map", f"one mask per solve, (batch, channels, 1, 1), entries 0 and "
                   f"1/(1 − p) in about p and 1 − p of the channels, u's dtype; forward iteration "
                   f"on f converges ({iterations} iterations); p = 0 drops nothing")


def _converges(fn: Callable, g: torch.Generator) -> int:
    """Forward iteration on the student's f reaches the fixed point of z ↦ block(z, u, m) (a
    contraction): the fixed point exists because f is one map. Returns the iterations it took."""
    what = "forward iteration on f = dropout_map(block, u, 0.3), a batch of 6 states, 3×4"
    u = torch.randn(6, 5, 3, 4, generator=g, dtype=DT)
    block = _MaskedBlock(limit=200)
    f = _call(fn, "dropout_map", block, u, 0.3)
    z, residual, steps = torch.zeros_like(u), float("inf"), 0
    while residual > 1e-12 and steps < 150:
        fz = _call_map(f, z, what)
        residual, z, steps = ((fz - z).norm() / fz.norm()).item(), fz, steps + 1
    if residual > 1e-12:
        raise _fail(what, f"the relative residual is still {residual:.2g} after {steps} "
                    f"iterations of a contraction.", "f must be one fixed map: the same mask at "
                    "every call.")
    z_star = torch.zeros_like(u)
    for _ in range(200):
        z_star = _MaskedBlock.value(z_star, u, block.masks[0])
    _compare(z, z_star, what, "f(z) is block(z, u, m) with one m.", rtol=1e-9, atol=1e-11)
    return steps
