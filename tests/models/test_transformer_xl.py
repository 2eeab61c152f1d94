"""Transformer-XL's memory and relative positions in the language models (deqlite.transformer_xl.
TransformerXLCell, deqlite.models.language): a segment read with the memory of the ones before
equals the concatenated text read at once; causality with a memory; the IFT gradient with a
memory against autograd through the unrolled iteration; the memory's length in training and
evaluation; option checks. Tiny sizes, float64, PyTorch's default initialization (ρ(J) ≈ 0.9 at
z*, so that forward iteration converges and the unrolled gradient is the implicit one)."""
import pytest
import torch

from deqlite.transformer_xl import Memory, TransformerXLCell, relative_encoding
from deqlite.models import build_model

DT = torch.float64
V, T = 13, 6
SOLVE = dict(solver="anderson", tol=1e-13, max_iter=300, on_fail="raise")


def xl(name="deq_transformer_lm", *, segments=3, **options):
    """A tiny model with relative positions whose memory spans the segments before the last."""
    defaults = dict(vocab_size=V, d_model=16, n_heads=2, d_ff=32, max_len=segments * T,
                    positions="relative", mem_len=(segments - 1) * T)
    if name == "deq_transformer_lm":
        defaults["deq"] = SOLVE
    else:
        defaults["n_layers"] = 3
    torch.manual_seed(0)
    return build_model(name, **{**defaults, **options}).to(DT)


def tokens(batch=3, length=3 * T, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def read_in_segments(model, x):
    """The logits of x read T tokens at a time, each segment with the memory of those before."""
    out, memory = [], None
    for start in range(0, x.shape[1], T):
        out.append(model(x[:, start:start + T], memory=memory))
        memory = model.next_memory
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["deq_transformer_lm", "transformer_lm"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_segments_with_memory_equal_the_concatenated_context(name, norm):
    """Three segments, the memory holding the two before: the logits are those of the 18
    tokens read at once (exactly up to rounding for the explicit Transformer-XL, up to the
    solver's tolerance of 1e-13 for the DEQ)."""
    model = xl(name, norm=norm).eval()
    x = tokens()
    with torch.no_grad():
        whole = model(x)
        pieces = read_in_segments(model, x)
    assert (pieces - whole).abs().max() < 1e-9
    # without the memory the later segments lose their context: the test can tell
    with torch.no_grad():
        alone = torch.cat([model(x[:, s:s + T]) for s in range(0, x.shape[1], T)], dim=1)
    assert (alone[:, T:] - whole[:, T:]).abs().max() > 1e-3


def test_memory_keeps_the_last_mem_len_tokens_and_eval_mem_len_in_eval_mode():
    model = xl(mem_len=4, eval_mem_len=9).train()
    x = tokens()
    model(x[:, :T])
    first = model.next_memory
    assert isinstance(first, Memory) and first.z.shape == (3, 4, 16) and first.u.shape == (3, 4, 48)
    assert not first.z.requires_grad and not first.u.requires_grad
    model.eval()
    with torch.no_grad():
        model(x[:, :T])
        a = model.next_memory
        model(x[:, T:2 * T], memory=a)
        b = model.next_memory
    assert a.z.shape[1] == T and b.z.shape[1] == 9                 # min(9, 6) then min(9, 12)
    assert torch.equal(b.z[:, :3], a.z[:, -3:])                    # the oldest kept come first
    assert xl(mem_len=0).train()(x[:, :T]) is not None
    assert xl(mem_len=0).next_memory is None


def test_deq_with_memory_is_causal():
    """Changing a token of the segment changes no output before it (memory given)."""
    model = xl().eval()
    x = tokens()
    with torch.no_grad():
        model(x[:, :T])
        memory = model.next_memory
        seg = x[:, T:2 * T]
        changed = seg.clone()
        changed[:, 3:] = (seg[:, 3:] + 1) % V
        a, b = model(seg, memory=memory), model(changed, memory=memory)
    assert (a[:, :3] - b[:, :3]).abs().max() < 1e-10
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3


def test_ift_gradient_with_memory_equals_the_unrolled_one():
    """∂loss/∂θ of a segment read with a memory: the implicit gradient (Anderson and the IFT
    adjoint to 1e-13) against autograd through 400 plain applications of the cell, for every
    parameter; the memory is a constant (it gets no gradient)."""
    model = xl(deq=dict(SOLVE, backward_tol=1e-13, backward_max_iter=400)).train()
    x = tokens(length=2 * T + 1, seed=3)        # (seed 0's first 6 tokens: Anderson stalls at 1e-2)
    with torch.no_grad():
        model(x[:, :T])
    memory = model.next_memory
    seg, target = x[:, T:2 * T], x[:, T + 1:2 * T + 1]

    def grads(unroll):
        model.zero_grad()
        with model.deq.options(pretrain_steps=unroll):
            model.loss(seg, target, memory=memory).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    implicit, unrolled = grads(0), grads(400)
    assert implicit.keys() == unrolled.keys() and "cell.r_r_bias" in implicit
    for name in implicit:
        scale = unrolled[name].abs().max().clamp(min=1e-8)
        assert (implicit[name] - unrolled[name]).abs().max() / scale < 1e-7, name


def test_relative_scores_depend_on_distance_only():
    """The same tokens at the same distances give the same attention output, wherever the
    segment starts: shifting the whole text by a memory of M tokens changes nothing for them."""
    cell = TransformerXLCell(8, 2, 16).to(DT).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=DT)
    z = torch.randn(2, 5, 8, dtype=DT)
    # a memory that the queries cannot see would be the same as none: use the masks' edge case
    # of an empty memory against one of zero tokens made by empty_memory
    a = cell(z, cell.inject(x))
    b = cell(z, cell.inject(x, memory=cell.empty_memory(x)))
    assert torch.equal(a, b)
    R = relative_encoding(7, 8, x)
    assert R.shape == (7, 8) and torch.allclose(R[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=DT))


def test_weight_norm_init_std_and_dropatt():
    model = xl(weight_norm=True, init_std=0.01, dropatt=0.2, dropout=0.1)
    qkv = model.cell.qkv
    assert torch.nn.utils.parametrize.is_parametrized(qkv, "weight")
    assert abs(qkv.weight.std().item() - 0.01) < 0.003           # W = V at the start
    assert abs(model.cell.norm1.weight.mean().item() - 1) < 0.01
    model.train()
    injection = model.cell.inject(torch.randn(2, T, 16, dtype=DT))
    assert len(injection) == 6 and injection[-1].shape == (2, 2, T, T)   # m₁, m₂, m_att
    # fixed within a solve: the same injection gives the same map
    z = torch.randn(2, T, 16, dtype=DT)
    assert torch.equal(model.cell(z, injection), model.cell(z, injection))


def test_bad_memory_options_fail_loudly():
    with pytest.raises(ValueError, match="positions=\"relative\""):
        build_model("deq_transformer_lm", vocab_size=V, positions="learned", mem_len=4)
    with pytest.raises(ValueError, match="positions=\"relative\""):
        build_model("transformer_lm", vocab_size=V, positions="sinusoidal", dropatt=0.1)
    with pytest.raises(ValueError, match="mem_len"):
        build_model("deq_transformer_lm", vocab_size=V, positions="relative", mem_len=-1)
    model = xl().eval()
    x = tokens()
    with pytest.raises(ValueError, match="batch=3"):
        model(x[:, :T], memory=Memory(torch.zeros(2, 4, 16, dtype=DT), torch.zeros(2, 4, 48, dtype=DT)))
    with pytest.raises(TypeError, match="Memory"):
        model(x[:, :T], memory=torch.zeros(3, 4, 16, dtype=DT))
    plain = build_model("deq_transformer_lm", vocab_size=V, d_model=16, n_heads=2, d_ff=32)
    with pytest.raises(ValueError, match="no memory"):
        plain(x[:, :T], memory=Memory(torch.zeros(3, 1, 16), torch.zeros(3, 1, 48)))
