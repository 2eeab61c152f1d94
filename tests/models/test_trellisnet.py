"""DEQ-TrellisNet (deqlite.trellis, deqlite.models.trellisnet): the unrolled cell is the explicit
TrellisNet, the IFT gradient, causality, variational dropout, option checks, memory, the two
presets. Tiny sizes, float64 where numbers are compared."""
import pytest
import torch

from deqlite import TrellisCell
from deqlite.memory import saved_tensor_bytes
from deqlite.models import MODELS, build_model, count_parameters
from deqlite.models.trellisnet import DEQTrellisNetLM, TrellisNetLM
from deqlite.train import TrainConfig, Trainer, load_preset

DT = torch.float64
V, T = 11, 8
TIGHT = dict(solver="forward_iteration", tol=1e-13, max_iter=300, on_fail="raise")


def tiny(name="deq_trellisnet_lm", **options):
    defaults = dict(vocab_size=V, d_model=6, d_hidden=10, max_len=T)
    if name == "deq_trellisnet_lm":
        defaults["deq"] = TIGHT
    torch.manual_seed(0)
    return build_model(name, **{**defaults, **options}).to(DT)


def tokens(batch=3, length=T, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def explicit_twin(deq: DEQTrellisNetLM, n_layers: int) -> TrellisNetLM:
    """The explicit TrellisNet with the DEQ's weights: its one conv over [x; h] holds the cell's
    [W_x, W_h] (the weight-normalized weights as they are), its bias b_x + b_h."""
    c = deq.cell
    twin = tiny("trellisnet_lm", d_model=c.d_in, d_hidden=c.d_hidden, kernel_size=c.kernel_size,
                n_layers=n_layers, weight_norm=False).eval()
    with torch.no_grad():
        twin.embed.weight.copy_(deq.embed.weight)
        twin.head.bias.copy_(deq.head.bias)
        twin.conv.weight.copy_(torch.cat([c.inject_conv.weight, c.hidden_conv.weight], dim=1))
        twin.conv.bias.copy_(c.inject_conv.bias + c.hidden_conv.bias)
    return twin


def test_registered_shapes_and_state():
    assert MODELS["deq_trellisnet_lm"] is DEQTrellisNetLM
    assert MODELS["trellisnet_lm"] is TrellisNetLM
    model = tiny().eval()
    with torch.no_grad():
        assert model(tokens(2, 5)).shape == (2, 5, V)
    cell = model.cell
    injection = cell.inject(torch.zeros(2, 5, 6, dtype=DT))
    assert injection[0].shape == (2, 5, 40)                        # 4 gates × d_hidden
    assert cell.init_state(injection).shape == (2, 5, 20)          # z = [h; c]


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("depth", [1, 4])
def test_unrolled_cell_is_the_explicit_trellisnet(kernel_size, depth):
    """pretrain_steps = k applies f k times from z0 = 0: TrellisNet of depth k, computed layer by
    layer with one convolution over [x; h] (another way to be causal: padding on both sides,
    then the first T outputs)."""
    deq = tiny(kernel_size=kernel_size).eval()
    with torch.no_grad():                    # the hidden weights away from their N(0, 0.01) start
        deq.cell.hidden_conv.parametrizations.weight.original0.mul_(30)
    twin = explicit_twin(deq, depth)
    x = tokens()
    with torch.no_grad(), deq.deq.options(pretrain_steps=depth):
        a, b = deq(x), twin(x)
    assert (a - b).abs().max() < 1e-12
    with torch.no_grad(), deq.deq.options(pretrain_steps=depth + 1):
        assert (deq(x) - b).abs().max() > 1e-4                    # depth matters: not vacuous


def test_a_planted_bug_breaks_the_comparison(monkeypatch):
    """A cell reading c at position t instead of t−1 (no shift) is caught by the test above."""
    import deqlite.trellis as trellis
    monkeypatch.setattr(trellis, "shift_right", lambda c: c)
    deq = tiny().eval()
    twin = explicit_twin(deq, 3)
    with torch.no_grad(), deq.deq.options(pretrain_steps=3):
        assert (deq(tokens()) - twin(tokens())).abs().max() > 1e-4


def test_ift_gradient_matches_autograd_through_the_iterations():
    """float64, a contractive cell: the implicit gradient of every parameter equals backprop
    through 80 plain iterations (the iterates are exact after about T of them)."""
    ift = tiny(deq=dict(TIGHT, backward="ift"))
    unrolled = tiny(deq=dict(solver="forward_iteration", tol=0, max_iter=80, backward="unrolled"))
    unrolled.load_state_dict(ift.state_dict())
    x, y = tokens(2, 6), tokens(2, 6, seed=3)
    for model in (ift, unrolled):
        model.zero_grad()
        model.loss(x, y).backward()
    assert ift.deq.forward_stats.all_converged and ift.deq.backward_stats.all_converged
    named = dict(unrolled.named_parameters())
    assert len(named) == 8                     # embedding, head bias, two weight-normed convs
    for name, p in ift.named_parameters():
        g, want = p.grad, named[name].grad
        assert want.norm() > 0, name
        assert (g - want).norm() / want.norm() < 1e-9, name


def test_the_equilibrium_is_causal():
    """Logits at positions ≤ t do not depend on tokens after t: bitwise for a fixed number of
    iterations (each iterate is causal), to ~1e-10 for solves stopped at a tolerance."""
    t = 3
    x = tokens()
    x_new = x.clone()
    x_new[:, t + 1:] = (x[:, t + 1:] + 1 + tokens(3, T - t - 1, seed=1) % (V - 1)) % V
    fixed = tiny(deq=dict(solver="forward_iteration", tol=0, max_iter=12)).eval()
    solved = tiny(deq=dict(solver="anderson", tol=1e-13, max_iter=300, on_fail="raise")).eval()
    solved.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        a, b = fixed(x), fixed(x_new)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        a, b = solved(x), solved(x_new)
        assert solved.deq.forward_stats.all_converged
        assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-10
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3          # the future did change


def test_dropout_masks_fixed_within_a_solve_fresh_per_input_off_in_eval():
    model = tiny(dropout=0.3, dropout_hidden=0.5, deq=dict(solver="forward_iteration", tol=0,
                                                          max_iter=5))
    seen = []
    original = model.cell.forward
    model.cell.forward = lambda z, inj: seen.append(inj[1:]) or original(z, inj)
    model.train()
    model(tokens())
    assert len(seen) >= 5 and seen[0][0].shape == (3, 1, 10)
    assert set(seen[0][0].unique().tolist()) == {0.0, 2.0}
    assert all(torch.equal(s[0], seen[0][0]) for s in seen)
    first = seen[0][0]
    seen.clear()
    model(tokens())
    assert not torch.equal(seen[0][0], first)
    seen.clear()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()), model(tokens())) and all(s == [] for s in seen)


def test_bad_options_fail_loudly():
    with pytest.raises(TypeError, match="Did you mean 'd_hidden'"):
        build_model("deq_trellisnet_lm", vocab_size=V, d_hiden=16)
    with pytest.raises(TypeError, match="n_layers"):
        build_model("trellisnet_lm", vocab_size=V, n_layer=2)
    with pytest.raises(TypeError, match="Did you mean 'max_iter'"):
        tiny(deq=dict(max_iters=5))
    with pytest.raises(ValueError, match="last d_model features of h"):
        tiny(d_model=12, d_hidden=8)
    with pytest.raises(ValueError, match="kernel_size must lie in"):
        tiny(kernel_size=0)
    with pytest.raises(ValueError, match="dropout must be below 1"):
        tiny(dropout_hidden=1.0)
    with pytest.raises(TypeError, match="weight_norm must be True or False"):
        TrellisCell(4, 8, weight_norm="yes")
    with pytest.raises(ValueError, match=r"expects a sequence x of shape \(batch, T, 4\)"):
        TrellisCell(4, 8).inject(torch.zeros(2, 5, 3))
    cell = TrellisCell(4, 8)
    with pytest.raises(ValueError, match=r"\[h; c\] has shape \(2, 5, 16\)"):
        cell(torch.zeros(2, 5, 8), cell.inject(torch.zeros(2, 5, 4)))
    model = tiny()
    with pytest.raises(ValueError, match="max_len=8"):
        model(tokens(1, 9))
    with pytest.raises(ValueError, match="no memory"):
        model(tokens(), memory=object())


def test_memory_explicit_grows_with_depth_deq_does_not_with_iterations():
    def saved(model):
        return saved_tensor_bytes(model.loss, tokens(2, 8), tokens(2, 8, seed=1))[1]

    e2, e4, e8 = (saved(tiny("trellisnet_lm", n_layers=n)) for n in (2, 4, 8))
    deq = [saved(tiny(deq=dict(solver="forward_iteration", tol=0, max_iter=n))) for n in (4, 16)]
    assert e4 - e2 > 0 and e8 - e4 == 2 * (e4 - e2)        # the same bytes for every layer more
    assert deq[0] == deq[1]


def test_wt103_preset_builds_with_the_stated_parameter_count():
    config = load_preset("wt103_deq_trellisnet")
    assert config["model"] == "deq_trellisnet_lm"
    assert config["seq_len"] == config["model_options"]["max_len"] == 100
    TrainConfig.from_dict(config)
    with torch.device("meta"):                            # full width, no memory
        model = build_model(config["model"], vocab_size=267735, **config["model_options"])
    assert count_parameters(model) == 174_651_000         # the preset's docstring
    assert model.cell.hidden_conv.parametrizations.weight.original1.shape == (8000, 2000, 2)
    assert model.deq.forward_solver.max_iter == model.deq.backward_solver.max_iter == 45


def test_one_training_step_of_the_cpu_preset_logs_nfe(tmp_path):
    config = load_preset("stdlib_chars_trellis", [
        "limit_train=4000", "limit_test=256", "max_steps=1", "batch_size=4", "eval_batch_size=8",
        "eval_jacobian_samples=1", "model_options.d_model=8", "model_options.d_hidden=8"])
    config.update(log_path=str(tmp_path / "t.jsonl"), checkpoint_path=str(tmp_path / "t.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config)
        assert isinstance(trainer.model, DEQTrellisNetLM) and trainer.model.max_len == 16
        record = trainer.train_step()
    finally:
        torch.set_num_threads(threads)
    assert record["split"] == "train" and not record["pretrain"]
    assert 1 <= record["fwd_nfe"] <= 30 and 1 <= record["bwd_nfe"] <= 30
    assert torch.isfinite(torch.tensor(record["loss"]))
