"""The constraint sets (deqlite.projections): each is a projection (idempotent, and no feasible
point is nearer), with clear errors for bad sets."""
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
