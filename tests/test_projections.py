"""The constraint sets (deqlite.projections): each is a projection (idempotent, and no feasible
point is nearer), with clear errors for bad sets."""
import math

import pytest
import torch
from conftest import DT

from deqlite.projections import Box, L2Ball
def test_projections_are_projections():
    torch.manual_seed(0)
    x = 3 * torch.randn(5, 7, dtype=DT)
    center = torch.randn(5, 7, dtype=DT)
    for p in (Box(-1, 0.5), Box(torch.zeros(7, dtype=DT), torch.ones(7, dtype=DT)), L2Ball(1.5),
              L2Ball(torch.rand(5, dtype=DT), center=center)):
        px = p(x)
        torch.testing.assert_close(p(px), px)                # idempotent
        assert p.violation(px).max() <= 1e-12
        for _ in range(50):                                   # no feasible point is nearer
            q = p(3 * torch.randn(5, 7, dtype=DT))
            assert ((x - px).norm(dim=1) <= (x - q).norm(dim=1) + 1e-12).all()
    inside = 0.1 * torch.randn(5, 7, dtype=DT)
    torch.testing.assert_close(L2Ball(5.0)(inside), inside)
    with pytest.raises(ValueError, match="low < high"):
        Box(1, 0)
    with pytest.raises(ValueError, match="one radius"):
        L2Ball(torch.ones(2, 2))
    with pytest.raises(ValueError, match="center has shape"):
        L2Ball(1.0, center=torch.zeros(5, 3))(x)


@pytest.mark.parametrize("low,high,error,match", [
    (torch.zeros(3), torch.tensor([1.0, -1.0, 1.0]), ValueError,
     r"low ≤ high.*1 of 3 entries.*index \(1,\): low=0, high=-1.*swapped"),
    (torch.zeros(3), torch.ones(4), ValueError, r"low \(shape \(3,\)\) and high \(shape \(4,\)\) do "
                                                r"not broadcast"),
    (torch.tensor([0.0, float("nan")]), 1.0, ValueError, r"low contains 1 NaN"),
    (0.0, float("nan"), ValueError, r"high is nan"),
    (math.inf, torch.full((2,), math.inf), ValueError, r"low < inf"),
    ("0", 1.0, TypeError, r"low must be a number or a tensor"),
    (torch.zeros(2, dtype=torch.bool), 1.0, TypeError, r"real numbers"),
], ids=["crossed", "shapes", "nan-tensor", "nan-number", "empty", "string", "bool"])
def test_a_bad_box_is_rejected_with_what_is_wrong(low, high, error, match):
    with pytest.raises(error, match=match):
        Box(low, high)


def test_box_bounds_must_broadcast_to_x_without_enlarging_it():
    x = torch.randn(5, 7, dtype=DT)
    pinned = Box(torch.zeros(7, dtype=DT), torch.zeros(7, dtype=DT))     # low = high: pinned
    assert torch.equal(pinned(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"Box's low has shape \(3,\), which does not broadcast to "
                                         r"x's shape \(5, 7\)"):
        Box(torch.zeros(3), 1.0)(x)
    with pytest.raises(ValueError, match=r"Box's high has shape \(2, 5, 7\)"):
        Box(0.0, torch.ones(2, 5, 7))(x)                      # would enlarge x: not silently
    assert Box(0, 1)(x[:0]).shape == (0, 7) and Box(0, 1).violation(x[:0]).shape == (0,)


@pytest.mark.parametrize("radius,match", [
    (0.0, r"radius must lie in \(0"), (-1.0, r"radius must lie in \(0"), (math.nan, "nan"),
    (math.inf, r"finite.*projection=None"), (torch.tensor([1.0, 0.0]), r"one radius > 0"),
    (torch.tensor([1.0, math.nan]), r"one radius > 0"), (torch.tensor([math.inf]), r"one radius > 0"),
])
def test_a_bad_radius_is_rejected(radius, match):
    with pytest.raises(ValueError, match=match):
        L2Ball(radius)


def test_l2ball_radii_must_match_the_batch():
    with pytest.raises(ValueError, match=r"L2Ball has 2 radii \(one per sample\) but x has 3"):
        L2Ball(torch.ones(2))(torch.randn(3, 4))
    assert L2Ball(1.0)(torch.zeros(0, 4)).shape == (0, 4)
