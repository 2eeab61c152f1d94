"""Notebook 06's new exercises: the checks accept correct answers and reject typical wrong ones
with a message that names the mistake (the same tests as tests/classroom/test_checks.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqlite.cells import variational_mask
from deqlite.classroom import checks, references


# ---- conv_block: MDEQ's residual block, as a student writes it

class ConvBlock(nn.Module):
    """A correct block, or (with the keywords) one with a planted mistake."""

    def __init__(self, channels, expansion, groups, bias=False, norm="group", fixed_groups=None,
                 inner=None, dropout=0.0):
        super().__init__()
        inner = expansion * channels if inner is None else inner
        g = groups if fixed_groups is None else fixed_groups
        Norm = ((lambda c: nn.GroupNorm(g, c)) if norm == "group" else
                (lambda c: nn.GroupNorm(g, c, affine=False)) if norm == "no_affine" else
                nn.BatchNorm2d)
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=bias)
        self.norm1 = Norm(inner)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=bias)
        self.norm2 = Norm(channels)
        self.norm3 = Norm(channels)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, z, injection, mask=None, where="gn2", residual=True, last="gn3_of_relu",
                in_place=None, detach=False, cast=False, mask_where="conv2"):
        y = torch.relu(self.norm1(self.conv1(z)))
        y = self.conv2(y)
        if self.dropout is not None:
            y = self.dropout(y)
        if mask is not None and mask_where == "conv2":
            y = y * mask
        if where == "gn2":
            y = y + injection
        if mask is not None and mask_where == "after_u":
            y = y * mask
        y = self.norm2(y)
        if where == "after_gn2":
            y = y + injection
        if residual:
            if in_place == "z":
                z += y                                        # changes the caller's z
                y = z
            elif in_place == "injection":
                injection -= injection                        # "done with u": zeroes the caller's
                y = y + z
            else:
                y = y + (z.detach() if detach else z)
        out = self.norm3(torch.relu(y)) if last == "gn3_of_relu" else torch.relu(self.norm3(y))
        if where == "after_gn3":
            out = out + injection
        return out.float() if cast else out


def conv_block(channels, expansion, groups):
    return ConvBlock(channels, expansion, groups)


class ConvBlockModules(nn.Module):
    """A correct alternative: ReLU modules, F.relu, the mask handled by multiplying by 1."""

    def __init__(self, channels, expansion, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, expansion * channels, kernel_size=3, padding=1,
                               bias=False)
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=expansion * channels)
        self.relu = nn.ReLU(inplace=True)                    # on a fresh tensor: harmless
        self.conv2 = nn.Conv2d(expansion * channels, channels, kernel_size=3, padding=1,
                               bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, z, injection, mask=None):
        h = self.relu(self.norm1(self.conv1(z)))
        h = self.conv2(h) * (1 if mask is None else mask)
        h = self.norm2(h + injection)
        return self.norm3(F.relu(h + z))


class ConvBlockWeightNorm(ConvBlock):
    """A correct alternative: the two convolutions weight-normalized, as deqlite's own block."""

    def __init__(self, channels, expansion, groups):
        super().__init__(channels, expansion, groups)
        self.conv1 = nn.utils.parametrizations.weight_norm(self.conv1, dim=0)
        self.conv2 = nn.utils.parametrizations.weight_norm(self.conv2, dim=0)


class ConvBlockNormInForward(nn.Module):
    """Wrong: the GroupNorms made inside forward (new ones, with new parameters, at every call)."""

    def __init__(self, channels, expansion, groups):
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(channels, expansion * channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(expansion * channels, channels, 3, padding=1, bias=False)

    def forward(self, z, injection, mask=None):
        gn = lambda y: nn.GroupNorm(self.groups, y.shape[1]).to(y.dtype)(y)  # noqa: E731
        y = torch.relu(gn(self.conv1(z)))
        y = gn(self.conv2(y) * (1 if mask is None else mask) + injection)
        return gn(torch.relu(y + z))


class ConvBlockOtherNames(ConvBlockModules):
    """Wrong for the check: the first stage as one nn.Sequential named `stage1`."""

    def __init__(self, channels, expansion, groups):
        super().__init__(channels, expansion, groups)
        self.stage1 = nn.Sequential(self.conv1, self.norm1)
        del self.conv1, self.norm1

    def forward(self, z, injection, mask=None):
        h = self.conv2(torch.relu(self.stage1(z))) * (1 if mask is None else mask)
        return self.norm3(F.relu(self.norm2(h + injection) + z))


def block_with(**options):
    """A factory of ConvBlock whose forward has one planted mistake."""
    forward_keys = {"where", "residual", "last", "in_place", "detach", "cast", "mask_where"}
    init = {k: v for k, v in options.items() if k not in forward_keys}
    call = {k: v for k, v in options.items() if k in forward_keys}

    class Wrong(ConvBlock):
        def forward(self, z, injection, mask=None):
            return super().forward(z, injection, mask, **call)

    return lambda channels, expansion, groups: Wrong(channels, expansion, groups, **init)


class ConvBlockHalfDone(nn.Module):
    def __init__(self, channels, expansion, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, expansion * channels, 3, padding=1, bias=False)
        raise NotImplementedError()                          # left below the written code


class ConvBlockNoSuper(nn.Module):
    """Wrong: no super().__init__(), so the layers cannot even be assigned."""

    def __init__(self, channels, expansion, groups):
        self.conv1 = nn.Conv2d(channels, expansion * channels, 3, padding=1, bias=False)


class ConvBlockReturnsNone(nn.Module):
    """What the autograder's planted mistake makes of the cell: every solution region
    replaced by `return None`."""

    def __init__(self, channels, expansion, groups):
        return None

    def forward(self, z, injection, mask=None):
        return None


class ConvBlockNoMask(ConvBlock):
    """Wrong: forward has no mask argument (deqlite's ConvCell passes one, None or a mask)."""

    def forward(self, z, injection):
        return super().forward(z, injection)


class ConvBlockForwardNone(ConvBlock):
    def forward(self, z, injection, mask=None):
        return None


class ConvBlockForwardTodo(ConvBlock):
    def forward(self, z, injection, mask=None):
        # YOUR CODE HERE
        raise NotImplementedError()


# ---- dropout_map: one mask per solve

def dropout_map(block, u, p):
    m = torch.bernoulli(torch.full((u.shape[0], u.shape[1], 1, 1), 1 - p, dtype=u.dtype,
                                   device=u.device)) / (1 - p)
    return lambda z: block(z, u, m)


def dropout_map_rand(block, u, p):
    """A correct alternative: keep where a uniform draw is ≥ p; no mask at all for p = 0."""
    if p == 0:
        return lambda z: block(z, u)
    keep = torch.rand(u.shape[0], u.shape[1], 1, 1, dtype=u.dtype, device=u.device) >= p
    m = keep.to(u.dtype) / (1 - p)

    def f(z):
        return block(z, u, mask=m)
    return f


def dropout_map_deqlite(block, u, p):
    """A correct alternative: deqlite's own variational mask (whole channels)."""
    m = variational_mask(u, p)
    return lambda z: block(z, u, m)


def dropout_map_buggy(block, u, p):
    """The notebook's buggy map: the mask drawn inside f, a fresh one at every call."""
    def f(z):
        keep = torch.full((u.shape[0], u.shape[1], 1, 1), 1 - p, dtype=u.dtype, device=u.device)
        return block(z, u, torch.bernoulli(keep) / (1 - p))
    return f


def dropout_map_with(shape="channel", scale=True, keep_p=False, dtype=None, seed=False,
                     probe=False, on_output=False, in_place=False):
    def make(block, u, p):
        if seed:
            torch.manual_seed(0)                             # "for reproducibility"
        if probe:
            block(torch.zeros_like(u), u)                    # to learn the shape: one evaluation
        n, c = u.shape[:2]
        size = {"channel": (n, c, 1, 1), "batch": (1, c, 1, 1), "no_batch": (c, 1, 1),
                "entry": tuple(u.shape)}[shape]
        if in_place:
            m = u[:, :, :1, :1].bernoulli_(1 - p)            # a view of u: changes the caller's u
        else:
            m = torch.bernoulli(torch.full(size, p if keep_p else 1 - p,
                                           dtype=dtype or u.dtype, device=u.device))
        if scale:
            m = m / (1 - p)
        if on_output:
            return lambda z: block(z, u) * m
        return lambda z: block(z, u, m)
    return make


CASES_06 = {
    "conv_block": (checks.check_conv_block, [
        conv_block,
        lambda channels, expansion, groups: ConvBlockModules(channels, expansion, groups),
        ConvBlockWeightNorm,                                 # the class itself, called as a factory
        references.conv_block,
    ], [
        (block_with(where="after_gn2"), "inside\\* GN₂"),
        (block_with(where="after_gn3"), "not after the last norm"),
        (block_with(norm="batch"), "moved by .* BatchNorm"),
        (block_with(in_place="z"), "changed its argument `z` in place"),
        (block_with(in_place="injection"), "changed its argument `injection` in place"),
        (ConvBlockNoMask, "raised TypeError: .*forward\\(\\) takes 3 positional arguments"),
        (block_with(bias=True), "parameters, expected .* bias=False"),
        (block_with(cast=True), "dtype torch.float64 .* got torch.float32"),
        (block_with(dropout=0.3), "different outputs.*nn.Dropout"),
        (block_with(residual=False), "residual connection is missing"),
        (block_with(last="relu_of_gn3"), "ReLU and GN₃ are swapped"),
        (block_with(mask_where="after_u"), "injection is never dropped"),
        (block_with(detach=True), "gradient .* with respect to z.*no .detach"),
        (block_with(fixed_groups=2), "entries are off"),     # groups hard-coded to 2
        (block_with(inner=None, fixed_groups=None, norm="no_affine"), "affine=True"),
        (ConvBlockNormInForward, "in __init__"),
        (ConvBlockOtherNames, "matched by name.*conv1, norm1"),
        (ConvBlockHalfDone, "raised NotImplementedError after 3 lines"),
        (lambda channels, expansion, groups: None, "should return an nn.Module"),
        (ConvBlockNoSuper, "raised AttributeError: cannot assign module before Module.__init__"),
        (ConvBlockReturnsNone, "never set up as an nn.Module.*super\\(\\).__init__\\(\\)"),
        (ConvBlockForwardNone, "expected a tensor of z's shape .* got NoneType"),
    ]),
    "dropout_map": (checks.check_dropout_map, [
        dropout_map, dropout_map_rand, dropout_map_deqlite, references.dropout_map,
    ], [
        (dropout_map_buggy, "second call of f used another mask.*Draw m once"),
        (dropout_map_with(shape="batch"), "shape \\(1, 40, 1, 1\\).*One draw per sample"),
        (dropout_map_with(shape="no_batch"), "shape \\(40, 1, 1\\).*One draw per sample"),
        (dropout_map_with(shape="entry"), "Whole channels"),
        (dropout_map_with(scale=False), "Scale the kept channels by 1/\\(1 − p\\)"),
        (dropout_map_with(keep_p=True), "drops 7.*keep"),
        (dropout_map_with(dtype=torch.float64), "dtype torch.float64 .* expected u's, "
                                                "torch.float32"),
        (dropout_map_with(seed=True), "both calls drew the same mask.*manual_seed"),
        (dropout_map_with(probe=True), "evaluated block 1 time\\(s\\) before f"),
        (dropout_map_with(on_output=True), "without a mask.*third argument"),
        (dropout_map_with(in_place=True), "changed its argument `u` in place"),
    ]),
}

class ConvBlockTodo(nn.Module):
    """The student version of the notebook's cell: both methods still raise."""

    def __init__(self, channels, expansion, groups):
        # YOUR CODE HERE
        raise NotImplementedError()

    def forward(self, z, injection, mask=None):
        # YOUR CODE HERE
        raise NotImplementedError()


@pytest.mark.parametrize("student", [ConvBlockTodo, ConvBlockForwardTodo])
def test_a_block_whose_methods_still_raise_is_not_written_yet(student, capsys):
    """The notebook's factory calls the student's class: an __init__ or a forward that is still
    only `raise NotImplementedError()` is "not written yet" (the reference comes back)."""
    def conv_block(channels, expansion, groups):
        return student(channels, expansion, groups)

    assert checks.check_conv_block(conv_block) is references.conv_block
    out = capsys.readouterr().out
    assert "conv_block is not written yet" in out


def test_the_checks_leave_the_global_random_numbers_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_conv_block(conv_block)
    checks.check_dropout_map(dropout_map)
    assert torch.equal(torch.rand(3), expected)
