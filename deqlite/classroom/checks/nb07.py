"""Checks for notebook 07's exercises (a DEQ-Transformer language model)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...models import build_model
from ._harness import (_call, CheckFailed, _compare, DT, exercise, _fail, _numbered, _pair_of,
                       _passed, _which)


class _ToyLM(nn.Module):
    """logits_s = E[token_s] + mean of E[token_r] over r ≤ s (causal), plus, with ``peek``, α times
    the one-hot of a later token: token s + 1 (``"next"``) or the last one (``"last"``). A changed
    later token then moves the logits of an earlier position by exactly α."""
    alpha = 0.37

    def __init__(self, vocab_size: int = 11, peek: str = "none"):
        super().__init__()
        self.vocab_size, self.peek = vocab_size, peek
        self.E = nn.Parameter(torch.randn(vocab_size, vocab_size,
                                          generator=torch.Generator().manual_seed(5), dtype=DT))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.E[tokens]
        count = torch.arange(1, tokens.shape[1] + 1, dtype=DT)[None, :, None]
        logits = e + e.cumsum(dim=1) / count
        onehot = nn.functional.one_hot(tokens, self.vocab_size).to(DT)
        if self.peek == "next":
            logits = logits + self.alpha * torch.cat([onehot[:, 1:], 0 * onehot[:, :1]], dim=1)
        elif self.peek == "last":
            logits = logits + self.alpha * onehot[:, -1:].expand_as(onehot)
        return logits


def _tiny_deq_lm():
    torch.manual_seed(3)
    return build_model("deq_transformer_lm", vocab_size=13, d_model=16, n_heads=2, d_ff=32,
                       max_len=12, dropout=0.3,
                       deq=dict(solver="anderson", tol=1e-10, max_iter=100)).double()


@exercise
def check_future_leak(fn: Callable) -> bool:
    """fn(model, tokens, t) -> the largest change of the logits before position t when the tokens
    from t on change, in eval mode, the model left in its mode."""
    name = "future_leak"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (3, 12), generator=g)
    number = _numbered(name)
    mode_hint = ("Leave the model in the mode you found it in: remember model.training, and "
                 "model.train(was_training) at the end (a later training step must still drop "
                 "out; an evaluation must not).")
    cases = [("none", 5, 0.0), ("next", 5, _ToyLM.alpha), ("last", 5, _ToyLM.alpha),
             ("next", 1, _ToyLM.alpha), ("none", 11, 0.0)]
    for peek, t, expected in cases:
        model = _ToyLM(peek=peek)
        model.eval() if t == 11 else model.train()
        mode = model.training
        got = _call(fn, name, model, tokens.clone(), t, convert=number)
        what = {"none": "a causal model", "next": "a model whose position s also reads token s + 1",
                "last": "a model whose positions all read the last token"}[peek]
        what = f"{name} with t = {t} on {what} (batch 3, T 12)"
        if model.training != mode:
            raise _fail(what, f"the model was in {'training' if mode else 'eval'} mode and is "
                        f"now in {'training' if model.training else 'eval'} mode.", mode_hint)
        if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if expected == 0:
            hint = ("Compare only the positions s < t (logits[:, :t]): their tokens are the same "
                    "in both inputs; position t itself reads token t, which you changed, so it "
                    "always moves.")
        elif got == 0:
            hint = ("Nothing before t moved, but a later token does reach it here. Replace every "
                    "token from position t to the end (changed[:, t:], along dim 1: positions, "
                    "not samples), position t itself included, by a different one."
                    if peek == "next" else
                    "Only the last token reaches the earlier positions here: change every token "
                    "from position t to the end, not only token t.")
        elif got < expected:
            hint = ("Return the *largest* absolute change of one logit over the samples, the "
                    "positions before t and the vocabulary (.abs().max()), not a mean.")
        else:
            hint = ("Return the largest absolute change of one logit (.abs().max()), not a sum "
                    "or a norm over many.")
        raise _fail(what, f"expected {expected!r}, got {got!r}.", hint)
    # a DEQ-Transformer with dropout, handed over in training mode
    model = _tiny_deq_lm()
    tokens = torch.randint(0, 13, (2, 12), generator=g)
    got = _call(fn, name, model, tokens.clone(), 6, convert=number)
    what = f"{name} with t = 6 on a DEQ-Transformer with dropout 0.3, in training mode"
    if got > 1e-6:
        raise _fail(what, f"it returned {got:.3g}; this model's equilibrium is causal up to its "
                    f"solver's tolerance 1e-10.", "In training mode every forward pass draws its "
                    "own dropout masks, so two passes differ even on the same tokens: compare in "
                    "eval mode (model.eval(); no dropout), then put the mode back.")
    if not model.training:
        raise _fail(what, "the model was in training mode and is now in eval mode.", mode_hint)
    return _passed(name, "0 for a causal model, the exact leak of models that read later tokens "
                   "(t = 1 and 5), a DEQ's leak at its tolerance in eval mode, mode restored")


def _tiny_lm(dtype: torch.dtype = DT, tol: float = 1e-9):
    torch.manual_seed(4)
    model = build_model("deq_transformer_lm", vocab_size=13, d_model=16, n_heads=2, d_ff=32,
                        max_len=12, deq=dict(solver="anderson", tol=tol, max_iter=200))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                # a final LayerNorm that is not the identity
        model.norm.weight.copy_(0.5 + torch.rand(model.norm.weight.shape, generator=g))
        model.norm.bias.copy_(0.3 * torch.randn(model.norm.bias.shape, generator=g))
    return model.to(dtype).eval()


class _SolveRecord:
    """Forward hook on a DEQ: how many solves ran, and the NFE of each."""

    def __init__(self, deq: nn.Module):
        self.nfe = []
        self.handle = deq.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.nfe.append(None if module.forward_stats is None else module.forward_stats.nfe)


@exercise
def check_next_logits(fn: Callable) -> bool:
    """fn(model, tokens, z_prev) -> (logits of the next token, z* detached), one solve started
    from [z_prev; 0]."""
    name = "next_logits"
    g = torch.Generator().manual_seed(1)
    families = [("a batch of 2 sequences of 9 tokens", 2, 9, DT),
                ("one sequence of 12 tokens (max_len)", 1, 12, DT),
                ("a batch of 3 sequences of 6 tokens, float32", 3, 6, torch.float32)]
    for what, batch, T, dtype in families:
        f32 = dtype == torch.float32
        model = _tiny_lm(dtype, tol=1e-5 if f32 else 1e-9)
        tokens = torch.randint(0, 13, (batch, T), generator=g)
        with torch.no_grad():
            z_prev = model.deq(model.embed_tokens(tokens[:, :-1]))
            z_cold = model.deq(model.embed_tokens(tokens))
            cold = model.deq.forward_stats.nfe
            x = model.embed_tokens(tokens)
            z0 = torch.zeros_like(x)
            z0[:, :-1] = z_prev
            model.deq(x, z0)
            warm = model.deq.forward_stats.nfe
            expected = model(tokens)[:, -1]
            no_norm = model.head(z_cold[:, -1])
            first = model.head(model.norm(z_cold[:, 0]))
        for start, label in ((z_prev, "warm-started from z_prev"), (None, "with z_prev=None")):
            record = _SolveRecord(model.deq)
            try:
                logits, z = _call(fn, name, model, tokens.clone(), None if start is None else
                                  start.clone(), convert=_pair_of(name, "logits, z"))
            except CheckFailed as e:
                if start is not None or "NoneType" not in str(e):
                    raise
                raise CheckFailed(f"{e}\nHint: z_prev is None at the first step: then start "
                                  f"from zeros (model.deq(x)), with no warm start.") from None
            finally:
                record.handle.remove()
            where = f"{name} on {what}, {label}"
            rtol, atol = (1e-3, 1e-3) if f32 else (1e-6, 1e-7)
            general = ("The logits of the next token are head(norm(z*)) at the *last* position, "
                       "z*[:, -1]: norm (the final LayerNorm) first, then head, as the model's "
                       "forward does.")
            hint = _which(logits, {"Apply model.norm, the final LayerNorm, before model.head: "
                                   + general: no_norm,
                                   "Those are the logits after the *first* token: " + general:
                                   first}, general)
            _compare(logits, expected, f"{where}: the logits", hint, rtol=rtol, atol=atol)
            if not isinstance(z, torch.Tensor) or z.requires_grad:
                raise _fail(where, "the second result should be z*, detached (no graph), got "
                            + ("a tensor with a graph." if isinstance(z, torch.Tensor) else
                               type(z).__name__ + "."), "Return z.detach(): it is kept for the "
                            "next step, and a graph would keep every step's activations alive.")
            _compare(z, z_cold, f"{where}: z*", "Return the equilibrium of the whole window, "
                     "(batch, T, d), as model.deq returns it.", rtol=1e-3 if f32 else 1e-5,
                     atol=1e-4 if f32 else 1e-7)
            if len(record.nfe) != 1:
                raise _fail(where, f"the model's DEQ solved {len(record.nfe)} times for one step.",
                            "One solve per step: z* = model.deq(x, z0) gives both the logits "
                            "(through norm and head) and the state for the next step; do not call "
                            "model(tokens) as well.")
            nfe, target = record.nfe[0], warm if start is not None else cold
            if start is not None and nfe > warm + 1:
                raise _fail(where, f"the solve took {nfe} evaluations; started from [z_prev; 0] it "
                            f"takes {warm} (from zeros {cold}).",
                            "Start the solve from z0 with z0[:, :T − 1] = z_prev and zeros at the "
                            "new, last position (model.deq(x, z0)): by causality the first T − 1 "
                            "positions of the new equilibrium are the previous step's.")
            if start is None and nfe != target:
                raise _fail(where, f"the solve took {nfe} evaluations; from zeros it takes {cold}.",
                            "With z_prev=None (the first step) start from zeros: model.deq(x).")
    return _passed(name, "the next token's logits and z* from one solve warm-started at "
                   "[z_prev; 0] (fewer evaluations than from zeros), cold with z_prev=None; "
                   "batches of 1 to 3, float32")


def _conv_case(k: int, c_in: int, c_out: int, dtype: torch.dtype, seed: int) -> nn.Conv1d:
    torch.manual_seed(seed)
    conv = nn.Conv1d(c_in, c_out, k).to(dtype)
    with torch.no_grad():
        conv.bias.normal_(0, 1)                   # a bias that matters
    return conv


def _causal_conv_by_hand(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """out_t = b + Σ_j W[:, :, j] x_{t−k+1+j}, with x_s = 0 for s < 0: the definition, written
    out position by position (independent of deqlite's implementation)."""
    k, T = conv.kernel_size[0], x.shape[1]
    out = conv.bias.expand(x.shape[0], T, -1).clone()
    for t in range(T):
        for j in range(k):
            s = t - k + 1 + j
            if s >= 0:
                out[:, t] += x[:, s] @ conv.weight[:, :, j].T
    return out


def _conv_variants(conv: nn.Conv1d, x: torch.Tensor) -> dict:
    """The usual wrong causal convolutions of x (batch, T, C), each with the hint naming it."""
    k, T = conv.kernel_size[0], x.shape[1]
    xt = x.transpose(1, 2)
    pad = nn.functional.pad
    out = lambda y: y.transpose(1, 2)                                  # noqa: E731
    return {
        "Output t reads positions t, ..., t + k − 1: the zeros went after the last position "
        "(or, padded on both sides, the last T outputs were kept). Pad k − 1 zeros *before* the "
        "first one (F.pad(x, (k − 1, 0)) on (batch, C, T)), none after, or keep the *first* T "
        "outputs: a language model must not read ahead.": out(conv(pad(xt, (0, k - 1)))),
        "Output t reads positions t − k, ..., t − 1 and misses x_t: pad k − 1 zeros, not k (the "
        "window ends at t itself).": out(conv(pad(xt, (k, 0)))[..., :T]),
        "Pad with zeros (F.pad's default mode \"constant\"): before the sequence starts there "
        "is nothing, not a copy of the first position.":
            out(conv(pad(xt, (k - 1, 0), mode="replicate"))) if T > 1 else x.new_zeros(0),
        "The bias is missing: call conv(...) itself (or add conv.bias), not only its weight.":
            out(nn.functional.conv1d(pad(xt, (k - 1, 0)), conv.weight)),
        "The kernel is reversed: Conv1d correlates, so weight[..., k − 1] multiplies x_t and "
        "weight[..., 0] multiplies x_{t−k+1}.":
            out(nn.functional.conv1d(pad(xt, (k - 1, 0)), conv.weight.flip(-1), conv.bias)),
    }


@exercise
def check_causal_conv(fn: Callable) -> bool:
    """fn(conv, x) -> the causal convolution of x (batch, T, C): output t reads x_{t−k+1..t}."""
    name = "causal_conv"
    general = ("Transpose x to (batch, C, T), pad k − 1 zeros before the first position "
               "(F.pad(x, (k − 1, 0))), apply conv, and transpose back to (batch, T, C_out).")
    families = [(2, 3, 8, 2, 7, DT, "kernel size 2 (TrellisNet's), batch 2, T 7"),
                (3, 4, 5, 1, 6, DT, "kernel size 3, one sequence of 6 positions"),
                (1, 2, 4, 3, 5, DT, "kernel size 1 (no look-back at all)"),
                (3, 2, 3, 2, 2, DT, "kernel size 3 on sequences of 2 positions, shorter than it"),
                (2, 6, 16, 4, 9, torch.float32, "kernel size 2, float32")]
    g = torch.Generator().manual_seed(7)
    for seed, (k, c_in, c_out, batch, T, dtype, what) in enumerate(families):
        conv = _conv_case(k, c_in, c_out, dtype, seed)
        x = torch.randn(batch, T, c_in, generator=g, dtype=DT).to(dtype)
        with torch.no_grad():
            expected = _causal_conv_by_hand(conv, x)
            variants = _conv_variants(conv, x)
            got = _call(fn, name, conv, x.clone())
        where = f"{name} on {what}"
        if isinstance(got, torch.Tensor) and got.shape != expected.shape:
            if got.shape == (batch, c_out, T):
                hint = "Transpose the result back to (batch, T, C_out): positions before channels."
            elif got.shape[:2] == (batch, T - k + 1) or got.shape[-1] == T - k + 1:
                hint = ("A convolution without padding returns T − k + 1 positions: pad k − 1 "
                        "zeros before the first position so that every position has an output.")
            else:
                hint = general
            raise _fail(where, f"expected shape {tuple(expected.shape)} (batch, T, C_out), got "
                        f"{tuple(got.shape)}.", hint)
        rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-12)
        _compare(got, expected, where, _which(got, variants, general), rtol=rtol, atol=atol)
    return _passed(name, "output t reads x_{t−k+1}, ..., x_t with zeros before the start, "
                   "kernel sizes 1 to 3 (also longer than the sequence), float32 and float64")
