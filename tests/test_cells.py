"""The cells (deqlite.cells): MLPCell (the injection computed once, the spectral scale exact),
ConvCell and MultiscaleCell (shapes, the IFT gradient through a multiscale state, variational
dropout, weight norm), TransformerCell (shapes); every shape is checked."""
import pytest
import torch
from conftest import DT
from torch.nn.utils import parametrize

from deqlite import DEQ, MLPCell, spectral_rescale_
from deqlite.cells import ConvCell, MultiscaleCell, ResidualBlock, TransformerCell, variational_mask


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


def test_conv_cell_shapes_and_injection():
    cell = ConvCell(3, 8, groups=4, expansion=2).eval()
    x = torch.randn(2, 3, 6, 5)
    injection = cell.inject(x)
    assert len(injection) == 1 and injection[0].shape == (2, 8, 6, 5)
    z0 = cell.init_state(injection)
    assert torch.equal(z0, torch.zeros(2, 8, 6, 5))
    assert cell(torch.randn_like(z0), injection).shape == (2, 8, 6, 5)
    with pytest.raises(ValueError, match="expects x of shape"):
        cell.inject(torch.randn(2, 4, 6, 5))
    with pytest.raises(ValueError, match="must match"):
        cell(torch.randn(2, 8, 3, 3), injection)


def test_multiscale_cell_shapes_halve_the_resolution_rounding_up():
    cell = MultiscaleCell(4, [4, 8, 8], groups=2, expansion=2).eval()
    injection = cell.inject(torch.randn(2, 4, 9, 9))
    z0 = cell.init_state(injection)
    shapes = [(2, 4, 9, 9), (2, 8, 5, 5), (2, 8, 3, 3)]
    assert [tuple(t.shape) for t in z0] == shapes
    assert [tuple(t.shape) for t in cell([torch.randn_like(t) for t in z0], injection)] == shapes
    with pytest.raises(ValueError, match="state list of 3"):
        cell(z0[:2], injection)
    with pytest.raises(ValueError, match=r"branch 2 of the state has shape \(2, 8, 2, 2\) where "
                                         r"\(2, 8, 3, 3\) is expected.*highest resolution first"):
        cell([z0[0], z0[1], torch.zeros(2, 8, 2, 2)], injection)
    with pytest.raises(ValueError, match=r"branch 0 of the state has shape \(2, 8, 5, 5\)"):
        cell([z0[1], z0[0], z0[2]], injection)                # branches swapped


def contractive_cell(dtype=DT):
    """A 2-branch MultiscaleCell made a contraction for the gradient check. At PyTorch's default
    init such a cell has ρ(J) ≈ 1-3.5 at its (approximate) fixed point, so no solver converges to
    1e-12 reliably (MDEQ relies on the unrolled warm-up). Here the z-dependence of f is damped
    ~10×: the injection dominates branch 0 (larger injection weights, y₀ = 10·GN(...) outweighs
    the residual z₀), and branch 1 enters the fusion scaled by 0.1. Over 20 seeds this gives
    ρ(J) ≈ 0.2-0.45 and convergence to 1e-12 in about 20 plain iterations."""
    cell = MultiscaleCell(3, [4, 8], groups=2, expansion=2).to(dtype).eval()
    with torch.no_grad():
        cell.injection.weight.mul_(10)
        cell.branches[0].norm2.weight.fill_(10)
        cell.branches[1].norm3.weight.fill_(0.1)
        cell.fuse[0][1][-1].weight.fill_(0.1)          # the GroupNorm of the 1 → 0 upsampling
    return cell


def test_multiscale_deq_ift_gradient_matches_unrolled():
    cell = contractive_cell()
    x = torch.randn(2, 3, 8, 8, dtype=DT, requires_grad=True)
    weights = [torch.randn(4, 8, 8, dtype=DT), torch.randn(8, 4, 4, dtype=DT)]
    params = [cell.fuse[1][0][0].weight, cell.branches[0].conv1.parametrizations.weight.original1]
    grads = {}
    for rule in ("ift", "unrolled"):
        deq = DEQ(cell, solver="forward_iteration", tol=1e-12, max_iter=200, backward=rule)
        z = deq(x)
        assert deq.forward_stats.all_converged
        loss = sum((w * z_i).sum() for w, z_i in zip(weights, z)) + (z[1] ** 2).sum()
        grads[rule] = torch.autograd.grad(loss, [x, *params])
    for ift, unrolled in zip(grads["ift"], grads["unrolled"]):
        assert torch.allclose(ift, unrolled, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["conv", "multiscale"])
def test_variational_dropout_one_mask_per_input(kind):
    cell = ConvCell(3, 8, groups=2, dropout=0.5) if kind == "conv" \
        else MultiscaleCell(3, [4, 8], groups=2, expansion=2, dropout=0.5)
    deq = DEQ(cell, max_iter=3, on_fail="ignore").train()
    x = torch.randn(4, 3, 8, 8)
    m = deq.fixed_point_map(x)
    f, z0, masks = m.f, m.z0, m.injection[1:]
    assert len(masks) == (1 if kind == "conv" else 2)
    for m, c in zip(masks, [8] if kind == "conv" else [4, 8]):
        assert m.shape == (4, c, 1, 1) and set(m.unique().tolist()) <= {0.0, 2.0}
    z = torch.randn_like(z0)
    assert torch.equal(f(z), f(z))                     # the same mask at every iteration ...
    g = deq.fixed_point_map(x).f
    assert not torch.equal(f(z), g(z))                 # ... a new one for the next input
    deq.eval()                                         # no dropout at test time
    m, g = deq.fixed_point_map(x), deq.fixed_point_map(x).f
    assert len(m.injection) == 1 and torch.equal(m.f(z), g(z))


def test_weight_norm_on_the_iterated_convolutions():
    cell = MultiscaleCell(3, [4, 8], groups=2, expansion=2)
    convs = [c for b in cell.branches for c in (b.conv1, b.conv2)] + [p[1] for p in cell.post_fuse]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert parametrize.is_parametrized(ConvCell(3, 4, groups=2).block.conv2, "weight")
    plain = ResidualBlock(4, groups=2, weight_norm=False)
    assert not parametrize.is_parametrized(plain.conv1, "weight")
    g = cell.branches[0].conv1.parametrizations.weight.original0
    assert g.shape == (8, 1, 1, 1)                     # one gain per output channel


def test_transformer_cell_shapes_and_injection():
    cell = TransformerCell(16, 4, 32).eval()
    injection = cell.inject(torch.randn(2, 5, 16))
    assert len(injection) == 1 and injection[0].shape == (2, 5, 16)
    z0 = cell.init_state(injection)
    assert torch.equal(z0, torch.zeros(2, 5, 16))
    assert cell(torch.randn_like(z0), injection).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="expects embedded tokens"):
        cell.inject(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="must match"):
        cell(torch.randn(2, 4, 16), injection)
    with pytest.raises(ValueError, match="dropout must be below 1"):
        TransformerCell(16, 4, 32, dropout=1.0)


def test_variational_masks_are_shared_along_the_given_dimensions():
    torch.manual_seed(0)
    maps = variational_mask(torch.empty(6, 5, 4, 4), 0.5)
    assert maps.shape == (6, 5, 1, 1) and set(maps.unique().tolist()) == {0.0, 2.0}
    sequences = variational_mask(torch.empty(3, 7, 8, dtype=DT), 0.25, (1,))
    assert sequences.shape == (3, 1, 8) and sequences.dtype == DT
    assert set(sequences.unique().tolist()) <= {0.0, 1 / 0.75}
    many = variational_mask(torch.empty(4000, 1, 1), 0.3, ())
    assert abs(many.mean().item() - 1) < 0.05                  # E[m] = 1


@pytest.mark.parametrize("make,x", [
    (lambda: MLPCell(3, 4), torch.randn(0, 3)),
    (lambda: ConvCell(2, 4, groups=2, expansion=1, dropout=0.1), torch.randn(0, 2, 5, 5)),
    (lambda: MultiscaleCell(2, [4, 4], groups=2, expansion=1, dropout=0.1), torch.randn(0, 2, 6, 6)),
    (lambda: TransformerCell(8, 2, 16, dropout=0.1), torch.randn(0, 3, 8)),
], ids=["mlp", "conv", "multiscale", "transformer"])
def test_every_cell_takes_an_empty_batch_through_a_deq(make, x):
    cell = make()                                             # training mode: dropout masks too
    deq = DEQ(cell, max_iter=3)
    with deq.options(jac_probes=1):
        z = deq(x.requires_grad_())
    states = z if isinstance(z, list) else [z]
    assert all(len(t) == 0 for t in states) and deq.jac_loss.item() == 0
    (sum(t.sum() for t in states) + deq.jac_loss).backward()
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in cell.parameters())
