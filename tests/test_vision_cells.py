"""ConvCell, MultiscaleCell and the vision models: shapes, the IFT gradient through a multiscale
state, variational dropout, weight norm, independent samples, the presets. Tiny sizes only."""
import pytest
import torch
from torch.nn.utils import parametrize

from deqlite import DEQ
from deqlite.cells import ConvCell, MultiscaleCell, ResidualBlock
from deqlite.configs import load_preset
from deqlite.models import build_model
from deqlite.train import OPTIMIZERS, TrainConfig

DT = torch.float64
VISION_PRESETS = ["cifar10_mdeq_tiny", "cifar10_mdeq_large_jr", "imagenet_mdeq_small_jr"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: as fast on these tiny tensors, and immune to the ~8 ms stall per op that
    a multi-threaded op suffers when another job keeps one of the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_mdeq(**options):
    defaults = dict(channels=[4, 8], head_channels=[2, 2], final_channels=8, groups=2,
                    expansion=2, deq=dict(max_iter=8, on_fail="ignore"))
    return build_model("mdeq_classifier", **{**defaults, **options})


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


def test_classifiers_output_shapes():
    mdeq = small_mdeq(n_classes=7, downsample=2).eval()
    with torch.no_grad():
        assert mdeq(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    state = mdeq.cell.init_state(mdeq.cell.inject(torch.randn(2, 4, 8, 8)))
    assert [tuple(t.shape) for t in state] == [(2, 4, 8, 8), (2, 8, 4, 4)]
    conv = build_model("conv_deq_classifier", in_channels=1, channels=4, groups=2, expansion=2,
                       deq=dict(max_iter=5, on_fail="ignore")).eval()
    with torch.no_grad():
        assert conv(torch.randn(3, 1, 12, 12)).shape == (3, 10)


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
    f, z0, _ = deq.fixed_point_map(x)
    masks = f.injection[1:]
    assert len(masks) == (1 if kind == "conv" else 2)
    for m, c in zip(masks, [8] if kind == "conv" else [4, 8]):
        assert m.shape == (4, c, 1, 1) and set(m.unique().tolist()) <= {0.0, 2.0}
    z = torch.randn_like(z0)
    assert torch.equal(f(z), f(z))                     # the same mask at every iteration ...
    g, _, _ = deq.fixed_point_map(x)
    assert not torch.equal(f(z), g(z))                 # ... a new one for the next input
    deq.eval()                                         # no dropout at test time
    f, _, _ = deq.fixed_point_map(x)
    g, _, _ = deq.fixed_point_map(x)
    assert len(f.injection) == 1 and torch.equal(f(z), g(z))


def test_weight_norm_on_the_iterated_convolutions():
    cell = MultiscaleCell(3, [4, 8], groups=2, expansion=2)
    convs = [c for b in cell.branches for c in (b.conv1, b.conv2)] + [p[1] for p in cell.post_fuse]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert parametrize.is_parametrized(ConvCell(3, 4, groups=2).block.conv2, "weight")
    plain = ResidualBlock(4, groups=2, weight_norm=False)
    assert not parametrize.is_parametrized(plain.conv1, "weight")
    g = cell.branches[0].conv1.parametrizations.weight.original0
    assert g.shape == (8, 1, 1, 1)                     # one gain per output channel


@pytest.mark.parametrize("train", [False, True])
def test_samples_are_independent(train):
    model = small_mdeq(dropout=0.3 if train else 0.0,
                       deq=dict(solver="anderson", tol=1e-4, max_iter=12, on_fail="ignore"))
    model.train(train)
    x = torch.randn(3, 3, 16, 16)
    y = x.clone()
    y[1] = 5 * torch.randn(3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        out_x = model(x)
        torch.manual_seed(1)                           # the same dropout masks
        out_y = model(y)
    assert torch.allclose(out_x[[0, 2]], out_y[[0, 2]], atol=1e-5)
    assert not torch.allclose(out_x[1], out_y[1], atol=1e-3)


def shrunk(options: dict) -> dict:
    """A preset's model options at tiny width (same branches, depth, solver and dropout)."""
    n = len(options["channels"])
    return {**options, "channels": [4] * n, "head_channels": [2] * n, "final_channels": 8,
            "groups": 2}


@pytest.mark.parametrize("name", VISION_PRESETS)
def test_one_training_step_of_each_preset_at_reduced_width(name):
    c = TrainConfig.from_dict(load_preset(name))
    model = build_model(c.model, in_channels=3, image_size=32, **shrunk(c.model_options))
    assert model.deq.forward_solve["max_iter"] == c.model_options["deq"]["max_iter"]
    optimizer = OPTIMIZERS[c.optimizer](model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, c.model_options["n_classes"], (2,))
    model.train()
    for pretrain in (c.pretrain_depth, 0):             # a warm-up step, then an equilibrium step
        model.deq.pretrain_steps = pretrain
        model.deq.jac_probes = c.jac_reg_probes if c.jac_reg_weight else 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if c.jac_reg_weight:
            loss = loss + c.jac_reg_weight * model.deq.jac_loss
        before = model.classifier.weight.detach().clone()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and not torch.equal(before, model.classifier.weight)
    assert model.deq.forward_stats is not None and model.deq.backward_stats is not None


def test_presets_load_and_name_the_published_architecture():
    for name in VISION_PRESETS:
        c = TrainConfig.from_dict(load_preset(name))
        assert c.model == "mdeq_classifier" and c.dataset in ("cifar10", "imagenet")
    assert load_preset("cifar10_mdeq_large_jr")["model_options"]["channels"] == [32, 64, 128, 256]
    assert load_preset("imagenet_mdeq_small_jr")["model_options"]["n_classes"] == 1000


def test_bad_options_name_the_valid_ones():
    with pytest.raises(TypeError, match="Did you mean 'channels'.*Valid options:.*head_channels"):
        build_model("mdeq_classifier", chanels=[8, 16])
    with pytest.raises(ValueError, match="conv_deq_classifier"):
        build_model("conv_deq_clasifier")
    with pytest.raises(ValueError, match="one width per branch"):
        build_model("mdeq_classifier", channels=[8, 16], head_channels=[4])
    with pytest.raises(ValueError, match="divisible by groups=8"):
        MultiscaleCell(3, [8, 12])
    with pytest.raises(TypeError, match="list of integers"):
        MultiscaleCell(3, 8)
    with pytest.raises(ValueError, match="dropout"):
        ConvCell(3, 8, dropout=1.0)
    with pytest.raises(TypeError, match="deq got an unknown option .tolerance.*Valid options"):
        small_mdeq(deq=dict(tolerance=1e-3))
