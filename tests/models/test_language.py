"""The language models (deqlite.models.language): causality, the IFT gradient, variational
dropout, the losses, generation, option checks, memory, presets. Tiny sizes, float64 where
numbers are compared."""
import math

import pytest
import torch
import torch.nn.functional as F

from deqlite.memory import saved_tensor_bytes
from deqlite.models import MODELS, build_model, count_parameters
from deqlite.models.language import AdaptiveInput, DEQTransformerLM, TransformerLM
from deqlite.train import TrainConfig, load_preset

DT = torch.float64
V, T = 13, 10
LM_PRESETS = ["stdlib_char_lm", "wt103_deq_transformer", "wt103_deq_transformer_jr"]


def tiny(name="deq_transformer_lm", **options):
    defaults = dict(vocab_size=V, d_model=16, n_heads=2, d_ff=32, max_len=T)
    if name == "deq_transformer_lm":
        defaults["deq"] = dict(solver="anderson", tol=1e-13, max_iter=200, on_fail="raise")
    return build_model(name, **{**defaults, **options}).to(DT)


def tokens(batch=4, length=T, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_new_future(x, t, seed=1):
    """x with every token after position t redrawn (and actually changed)."""
    y = x.clone()
    y[:, t + 1:] = (x[:, t + 1:] + 1 + tokens(*x[:, t + 1:].shape, seed=seed) % (V - 1)) % V
    return y


def test_registered_and_shapes():
    assert MODELS["deq_transformer_lm"] is DEQTransformerLM
    assert MODELS["transformer_lm"] is TransformerLM
    model = tiny().eval()
    with torch.no_grad():
        assert model(tokens(3, 7)).shape == (3, 7, V)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_deq_is_causal(norm):
    """Outputs at positions ≤ t do not depend on tokens after t: exactly (bitwise) for a fixed
    number of plain iterations, since each iterate is a causal function of the input; to the
    solver's tolerance for Anderson, whose mixing weights and stopping test see the whole
    sequence (z* itself is causal; a relative residual of 1e-13 leaves errors of ~1e-12)."""
    t = 4
    x = tokens()
    x_new = with_new_future(x, t)
    fixed = tiny(norm=norm, deq=dict(solver="forward_iteration", tol=0, max_iter=20)).eval()
    solved = tiny(norm=norm).eval()
    solved.load_state_dict(fixed.state_dict())
    with torch.no_grad():
        a, b = fixed(x), fixed(x_new)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3      # the future did change
        a, b = solved(x), solved(x_new)
        assert solved.deq.forward_stats.all_converged
        assert (a[:, : t + 1] - b[:, : t + 1]).abs().max() < 1e-10
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_explicit_model_is_causal(norm):
    model = tiny("transformer_lm", n_layers=3, norm=norm, positions="sinusoidal").eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[:, :5], model(with_new_future(x, 4))[:, :5])


def test_ift_gradient_matches_unrolled_autograd():
    """float64: the implicit gradient equals backprop through the solver's iterations, for a
    parameter of the cell and for the token embeddings."""
    torch.manual_seed(0)
    ift = tiny(deq=dict(solver="anderson", tol=1e-13, max_iter=200, on_fail="raise"))
    unrolled = tiny(deq=dict(solver="forward_iteration", tol=1e-13, max_iter=300,
                             backward="unrolled", on_fail="raise"))
    unrolled.load_state_dict(ift.state_dict())
    x, y = tokens(2, 6), tokens(2, 6, seed=3)
    grads = []
    for model in (ift, unrolled):
        model.zero_grad()
        model.loss(x, y).backward()
        grads.append([model.cell.ff[0].weight.grad, model.cell.attention.in_proj_weight.grad,
                      model.embed.weight.grad])
    assert ift.deq.backward_stats.all_converged
    for g_ift, g_unrolled in zip(*grads):
        assert (g_ift - g_unrolled).norm() / g_unrolled.norm() < 1e-9


def test_unrolled_warm_up_equals_the_explicit_model_with_tied_layers():
    """pretrain_steps = k applies the cell k times from z0 = 0: the explicit model whose k layers
    all carry the cell's weights."""
    deq = tiny().eval()
    explicit = tiny("transformer_lm", n_layers=3).eval()
    state = {k: v for k, v in deq.state_dict().items() if not k.startswith(("cell.", "deq."))}
    for i in range(3):
        state.update({f"layers.{i}.{k}": v for k, v in deq.cell.state_dict().items()})
    explicit.load_state_dict(state)
    with torch.no_grad(), deq.deq.options(pretrain_steps=3):
        assert torch.allclose(deq(tokens()), explicit(tokens()), atol=1e-12)


def test_dropout_masks_fixed_within_a_solve_fresh_per_forward_off_in_eval():
    model = tiny(dropout=0.5, deq=dict(max_iter=6, tol=0))
    seen = []
    original = model.cell.forward

    def spy(z, injection):
        seen.append([m.clone() for m in injection[1:]])
        return original(z, injection)

    model.cell.forward = spy
    model.train()
    x = tokens()
    model(x)
    assert len(seen) >= 6 and all(len(masks) == 2 for masks in seen)
    first = seen[0]
    assert first[0].shape == (4, 1, 16) and set(first[0].unique().tolist()) == {0.0, 2.0}
    assert all(torch.equal(m, m0) for masks in seen for m, m0 in zip(masks, first))
    seen.clear()
    model(x)
    assert not torch.equal(seen[0][0], first[0])                    # a new input: new masks
    seen.clear()
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert all(masks == [] for masks in seen)
        assert torch.equal(out, model(x))


def test_loss_is_the_cross_entropy_of_the_logits():
    model = tiny().eval()
    x, y = tokens(), tokens(seed=5)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        assert torch.allclose(model.loss(x, y), expected, atol=1e-12)
    with pytest.raises(ValueError, match="must match"):
        model.loss(x, y[:, :5])


def test_adaptive_softmax_and_input():
    vocab = 60
    model = tiny(vocab_size=vocab, cutoffs=[10, 30], deq=dict(max_iter=30))
    x, y = (torch.randint(0, vocab, (3, 8), generator=torch.Generator().manual_seed(s))
            for s in (0, 1))
    loss = model.loss(x, y)
    assert torch.isfinite(loss) and 0 < loss.item() < 3 * math.log(vocab)
    loss.backward()
    assert model.adaptive.tail[1][1].weight.grad is not None
    model.eval()
    with torch.no_grad():
        log_p = model(x)
        assert log_p.shape == (3, 8, vocab)
        assert torch.allclose(log_p.exp().sum(-1), torch.ones(3, 8, dtype=DT))
        assert torch.allclose(F.cross_entropy(log_p.flatten(0, 1), y.flatten()), model.loss(x, y))
    assert model.embed.weights is model.adaptive                     # tied input and output
    untied = tiny(vocab_size=vocab, cutoffs=[10, 30], tie_weights=False)
    assert count_parameters(untied) > count_parameters(model)
    with pytest.raises(ValueError, match="increase"):
        tiny(vocab_size=vocab, cutoffs=[30, 10])


def test_adaptive_input_reads_the_clusters():
    """e(w) = H[w] in the shortlist, E_i[w − c_i] P_i in cluster i."""
    embed = AdaptiveInput(20, 8, [5, 12], div_value=2.0)
    w = torch.tensor([[3, 7, 15]])
    e = embed(w)
    table = embed.weights
    assert torch.equal(e[0, 0], table.head.weight[3])
    assert torch.allclose(e[0, 1], table.tail[0][1].weight[2] @ table.tail[0][0].weight)
    assert torch.allclose(e[0, 2], table.tail[1][1].weight[3] @ table.tail[1][0].weight)
    assert table.tail[0][0].weight.shape == (4, 8) and table.tail[1][0].weight.shape == (2, 8)


def test_generate_shape_and_determinism():
    model = tiny()
    model.train()
    prompt = tokens(1, 3)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0))   # beyond max_len
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    assert model.training                                            # mode restored
    greedy = model.generate(prompt, 4, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 4, temperature=0))
    with pytest.raises(ValueError, match="shape"):
        model.generate(tokens(2, 3), 4)


def test_bad_options_and_inputs_name_the_valid_ones():
    with pytest.raises(TypeError, match="d_model"):
        build_model("deq_transformer_lm", vocab_size=V, d_modle=16)
    with pytest.raises(TypeError, match="n_layers"):
        build_model("transformer_lm", vocab_size=V, n_layer=2)
    with pytest.raises(ValueError, match="'post', 'pre'"):
        tiny(norm="mid")
    with pytest.raises(ValueError, match="'learned', 'sinusoidal'"):
        tiny(positions="rope")
    with pytest.raises(TypeError, match="Did you mean 'max_iter'"):
        tiny(deq=dict(max_iters=5))
    with pytest.raises(ValueError, match="divisible"):
        tiny(d_model=15, n_heads=2)
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)
    model = tiny()
    with pytest.raises(ValueError, match="max_len=10"):
        model(tokens(1, 11))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[0, V]]))


def test_jacobian_regularizer_runs_through_attention():
    """The regularizer differentiates a vector–Jacobian product: the attention must have a second
    derivative (the fused kernels do not)."""
    model = tiny(deq=dict(max_iter=40, tol=1e-4, on_fail="raise")).to(torch.float32)
    with model.deq.options(jac_probes=1):
        loss = model.loss(tokens(), tokens(seed=2))
    assert model.deq.jac_loss is not None and torch.isfinite(model.deq.jac_loss)
    (loss + model.deq.jac_loss).backward()
    assert torch.isfinite(model.cell.attention.in_proj_weight.grad).all()


def test_memory_explicit_grows_with_depth_deq_does_not_with_iterations():
    def saved(model):
        x, y = tokens(2, 8), tokens(2, 8, seed=1)
        return saved_tensor_bytes(model.loss, x, y)[1]

    explicit = [saved(tiny("transformer_lm", n_layers=n)) for n in (1, 4)]
    deq = [saved(tiny(deq=dict(solver="anderson", tol=0, max_iter=n))) for n in (3, 12)]
    assert explicit[1] > 2 * explicit[0]
    assert deq[0] == deq[1]


@pytest.mark.parametrize("name", LM_PRESETS)
def test_presets_build(name):
    config = load_preset(name)
    assert config["model"] == "deq_transformer_lm" and config["seq_len"] == \
        config["model_options"]["max_len"]
    if "seq_len" in TrainConfig.__dataclass_fields__:    # the LM training path is in place
        TrainConfig.from_dict(config)
    vocab = 267735 if config["dataset"] == "wikitext103" else 100
    with torch.device("meta"):                            # full width, no memory
        model = build_model(config["model"], vocab_size=vocab, **config["model_options"])
    if name.startswith("wt103"):                          # the published block (TransformerXLCell)
        assert count_parameters(model) == 96_448_350
        assert model.cell.d_head == 70 and model.relative and model.cell.weight_norm
        assert model.mem_len == model.eval_mem_len == (300 if name.endswith("_jr") else 150)
