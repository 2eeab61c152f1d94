"""The vision models (deqlite.models.vision): shapes, independent samples, the presets, option
checks. Tiny sizes only."""
import pytest
import torch

from deqlite.cells import ConvCell, MultiscaleCell
from deqlite.models import build_model
from deqlite.train import TrainConfig, load_preset
from deqlite.train.config import OPTIMIZERS

DT = torch.float64
VISION_PRESETS = ["cifar10_mdeq_tiny", "cifar10_mdeq_large_jr", "imagenet_mdeq_small_jr"]


def small_mdeq(**options):
    defaults = dict(channels=[4, 8], head_channels=[2, 2], final_channels=8, groups=2,
                    expansion=2, deq=dict(max_iter=8, on_fail="ignore"))
    return build_model("mdeq_classifier", **{**defaults, **options})


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
    assert model.deq.forward_solver.max_iter == c.model_options["deq"]["max_iter"]
    optimizer = OPTIMIZERS[c.optimizer](model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, c.model_options["n_classes"], (2,))
    model.train()
    for pretrain in (c.pretrain_depth, 0):             # a warm-up step, then an equilibrium step
        probes = c.jac_reg_probes if c.jac_reg_weight else 0
        with model.deq.options(pretrain_steps=pretrain, jac_probes=probes):
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
