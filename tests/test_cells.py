"""MLPCell: the injection is computed once, the spectral scale is exact, shapes are checked."""
import pytest
import torch

from deqlite import MLPCell, spectral_rescale_


def test_forward_is_tanh_of_weight_tied_layer_plus_injection():
    cell = MLPCell(3, 5)
    x, z = torch.randn(4, 3), torch.randn(4, 5)
    u = cell.inject(x)
    assert torch.allclose(u, x @ cell.U.weight.T + cell.U.bias)
    assert torch.allclose(cell(z, u), torch.tanh(z @ cell.W.weight.T + u))
    assert torch.equal(cell.init_state(u), torch.zeros(4, 5))


def test_weight_scale_sets_the_spectral_norm():
    for s in (0.5, 0.97, 2.0):
        cell = MLPCell(3, 16, weight_scale=s)
        assert torch.linalg.matrix_norm(cell.W.weight, ord=2).item() == pytest.approx(s, rel=1e-5)
    W = torch.randn(6, 6)
    spectral_rescale_(W, 0.3)
    assert torch.linalg.matrix_norm(W, ord=2).item() == pytest.approx(0.3, rel=1e-5)


def test_cell_errors():
    cell = MLPCell(3, 5)
    with pytest.raises(ValueError, match="expects x of shape"):
        cell.inject(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="must match"):
        cell(torch.randn(4, 6), cell.inject(torch.randn(4, 3)))
    with pytest.raises(ValueError, match="weight_scale"):
        MLPCell(3, 5, weight_scale=-1.0)
    with pytest.raises(TypeError, match="d_hidden must be an integer"):
        MLPCell(3, 5.0)
