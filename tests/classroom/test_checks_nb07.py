"""Notebook 07's exercises: correct answers pass, planted mistakes are rejected by name (draft;
merged into test_checks.py with the checks)."""
import torch

import torch.nn.functional as F

from deqlite.classroom import checks, references

# ---- next_logits


def next_logits(model, tokens, z_prev=None):
    x = model.embed_tokens(tokens)
    z0 = None
    if z_prev is not None:
        z0 = torch.zeros_like(x)
        z0[:, :z_prev.shape[1]] = z_prev
    with torch.no_grad():
        z = model.deq(x, z0)
    return model.head(model.norm(z[:, -1])), z


def next_logits_cat(model, tokens, z_prev=None):
    """The warm start concatenated; logits of every position, the last one kept."""
    x = model.embed_tokens(tokens)
    if z_prev is None:
        z0 = torch.zeros_like(x)
    else:
        z0 = torch.cat([z_prev, torch.zeros_like(x[:, z_prev.shape[1]:])], dim=1)
    z = model.deq(x, z0).detach()
    return model.head(model.norm(z))[:, -1], z


def next_logits_no_none(model, tokens, z_prev=None):
    """Always builds the warm start, also when there is no previous step."""
    x = model.embed_tokens(tokens)
    z0 = torch.zeros_like(x)
    z0[:, :z_prev.shape[1]] = z_prev
    z = model.deq(x, z0).detach()
    return model.head(model.norm(z[:, -1])), z


def step(model, tokens, z_prev=None, *, warm=True, align="left", position=-1, norm=True,
         detach=True, twice=False, zeros=torch.zeros_like):
    """next_logits with one thing changed."""
    x = model.embed_tokens(tokens)
    z0 = None
    if warm and z_prev is not None:
        z0 = zeros(x)
        if align == "left":
            z0[:, :z_prev.shape[1]] = z_prev
        else:
            z0[:, -z_prev.shape[1]:] = z_prev
    z = model.deq(x, z0)
    h = model.norm(z[:, position]) if norm else z[:, position]
    logits = model(tokens)[:, -1] if twice else model.head(h)
    return logits, (z.detach() if detach else z)


# ---- future_leak


def future_leak(model, tokens, t):
    changed = tokens.clone()
    changed[:, t:] = (tokens[:, t:] + 1) % model.vocab_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    model.train(was_training)
    return (before[:, :t] - after[:, :t]).abs().max().item()


def future_leak_where(model, tokens, t):
    """Random but always different replacements, chosen with a position mask."""
    later = torch.arange(tokens.shape[1]) >= t
    shift = torch.randint(1, model.vocab_size, tokens.shape)
    changed = torch.where(later, (tokens + shift) % model.vocab_size, tokens)
    mode = model.training
    try:
        model.train(False)
        with torch.inference_mode():
            diff = model(tokens) - model(changed)
    finally:
        model.train(mode)
    return float(diff[:, ~later].abs().amax())


def leak(model, tokens, t, *, upto=0, start=0, only_t=False, evaluate=True, restore=True,
         reduce="max", rows=False, train_after=False):
    """future_leak with one thing changed."""
    changed = tokens.clone()
    if rows:
        changed[t:] = (tokens[t:] + 1) % model.vocab_size
    elif only_t:
        changed[:, t] = (tokens[:, t] + 1) % model.vocab_size
    else:
        changed[:, t + start:] = (tokens[:, t + start:] + 1) % model.vocab_size
    was_training = model.training
    if evaluate:
        model.eval()
    with torch.no_grad():
        diff = (model(tokens) - model(changed))[:, :t + upto].abs()
    if train_after:
        model.train()
    elif restore:
        model.train(was_training)
    return {"max": diff.max(), "mean": diff.mean(), "sum": diff.sum()}[reduce].item()


def leak_in_place(model, tokens, t):
    before = model(tokens).detach()
    model.eval()
    tokens[:, t:] = (tokens[:, t:] + 1) % model.vocab_size
    out = (before[:, :t] - model(tokens)[:, :t]).abs().max().item()
    model.train()
    return out


# ---- causal_conv


def causal_conv(conv, x):
    k = conv.kernel_size[0]
    return conv(F.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)


def causal_conv_both_sides(conv, x):
    """Padding k − 1 on both sides, the first T outputs kept (as TrellisNetLM does)."""
    k, T = conv.kernel_size[0], x.shape[1]
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=k - 1)
    return y[..., :T].transpose(1, 2)


def causal_conv_by_shifts(conv, x):
    """Σ_j W_j x_{t−k+1+j} + b with shifted copies of x, no conv call."""
    k, T = conv.kernel_size[0], x.shape[1]
    padded = torch.cat([x.new_zeros(x.shape[0], k - 1, x.shape[2]), x], dim=1)
    return sum(padded[:, j:j + T] @ conv.weight[:, :, j].T for j in range(k)) + conv.bias


def conv_with(conv, x, *, pad=None, mode="constant", keep=None, bias=True, flip=False,
              back=True):
    """causal_conv with one thing changed."""
    k, T = conv.kernel_size[0], x.shape[1]
    xt = x.transpose(1, 2)
    xt = F.pad(xt, (k - 1, 0) if pad is None else pad, mode=mode)
    w = conv.weight.flip(-1) if flip else conv.weight
    y = F.conv1d(xt, w, conv.bias if bias else None)
    if keep == "first":
        y = y[..., :T]
    elif keep == "last":
        y = y[..., -T:]
    return y.transpose(1, 2) if back else y


def causal_conv_in_place(conv, x):
    k = conv.kernel_size[0]
    x.mul_(1.0)
    return conv(F.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)


CASES_07 = {
    "causal_conv": (checks.check_causal_conv, [causal_conv, causal_conv_both_sides,
                                               causal_conv_by_shifts, references.causal_conv], [
        (lambda c, x: conv_with(c, x, pad=(0, c.kernel_size[0] - 1)), "zeros went after"),
        (lambda c, x: conv_with(c, x, pad=(c.kernel_size[0] - 1,) * 2, keep="last"),
         "the last T outputs were kept"),
        (lambda c, x: conv_with(c, x, pad=(c.kernel_size[0], 0), keep="first"), "misses x_t"),
        (lambda c, x: conv_with(c, x, mode="replicate"), "Pad with zeros"),
        (lambda c, x: conv_with(c, x, bias=False), "bias is missing"),
        (lambda c, x: conv_with(c, x, flip=True), "kernel is reversed"),
        (lambda c, x: c(x.transpose(1, 2)).transpose(1, 2), "T − k \\+ 1 positions"),
        (lambda c, x: conv_with(c, x, back=False), "Transpose the result back"),
        (causal_conv_in_place, "changed its argument `x` in place"),
        (lambda c, x: c(F.pad(x, (0, 0, c.kernel_size[0] - 1, 0))), "raised"),
    ]),
    "next_logits": (checks.check_next_logits, [next_logits, next_logits_cat,
                                               references.next_logits], [
        (lambda m, t, z=None: step(m, t, z, warm=False), "Start the solve from z0 with"),
        (lambda m, t, z=None: step(m, t, z, align="right"), "Start the solve from z0 with"),
        (lambda m, t, z=None: step(m, t, z, position=0), "after the \\*first\\* token"),
        (lambda m, t, z=None: step(m, t, z, norm=False), "Apply model.norm, the final LayerNorm"),
        (lambda m, t, z=None: step(m, t, z, detach=False), "Return z.detach\\(\\)"),
        (lambda m, t, z=None: step(m, t, z, twice=True), "One solve per step"),
        (next_logits_no_none, "z_prev is None at the first step"),
        (lambda m, t, z=None: (lambda x: (m.head(m.norm(m.deq(x, z)[:, -1])), m.deq(x).detach()))(
            m.embed_tokens(t)), "raised|shape"),
    ]),
    "future_leak": (checks.check_future_leak, [future_leak, future_leak_where,
                                               references.future_leak], [
        (lambda m, x, t: leak(m, x, t, upto=1), "Compare only the positions s < t"),
        (lambda m, x, t: leak(m, x, t, start=1), "position t itself included"),
        (lambda m, x, t: leak(m, x, t, rows=True), "along dim 1"),
        (lambda m, x, t: leak(m, x, t, only_t=True), "not only token t"),
        (lambda m, x, t: leak(m, x, t, reduce="mean"), "\\*largest\\* absolute change"),
        (lambda m, x, t: leak(m, x, t, reduce="sum"), "not a sum"),
        (lambda m, x, t: leak(m, x, t, evaluate=False), "compare in eval mode"),
        (lambda m, x, t: leak(m, x, t, restore=False), "mode you found it in"),
        (lambda m, x, t: leak(m, x, t, train_after=True), "mode you found it in"),
        (leak_in_place, "changed its argument `tokens` in place"),
        (lambda m, x, t: torch.tensor([0.0, 1.0]), "one number"),
    ]),
}
