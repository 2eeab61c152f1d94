"""Notebook 04's exercises: correct answers pass, planted mistakes are rejected by name (draft;
merged into test_checks.py with the checks)."""
import torch

from deqlite.classroom import checks, references
from deqlite.gradients import IFT

# ---- deq_layer: correct answers




def deq_layer_like_deq(f, z0, solver, ift, pretrain_depth=0):
    """As deqlite.DEQ.forward: the rule's own solve (no graph), then its attach."""
    if not pretrain_depth:
        z_star, stats = ift.solve(solver, f, z0)
        return ift.attach(z_star, f), stats
    z, k = z0, 0
    while k < pretrain_depth:
        z, k = f(z), k + 1
    return z, None


def deq_layer_grad_mode(f, z0, solver, ift, pretrain_depth=0):
    """With torch.set_grad_enabled around the solve."""
    if pretrain_depth:
        z = f(z0)
        for _ in range(pretrain_depth - 1):
            z = f(z)
        return z, None
    with torch.set_grad_enabled(False):
        out = solver(f, z0)
    z = ift.attach(out[0], f)
    return z, out[1]


# ---- deq_layer: planted mistakes


def layer(f, z0, solver, ift, pretrain_depth=0, *, no_grad=True, attach="ift", start=None,
          depth_offset=0, warmup_no_grad=False, solve_in_warmup=False, flatten=False):
    """deq_layer with one thing changed."""
    if pretrain_depth and not solve_in_warmup:
        z = z0 if start is None else start(z0)
        with torch.no_grad() if warmup_no_grad else torch.enable_grad():
            for _ in range(pretrain_depth + depth_offset):
                z = f(z)
        return z, None
    z0 = z0.flatten(1) if flatten else z0
    with torch.no_grad() if no_grad else torch.enable_grad():
        z_star, stats = solver(f, z0 if start is None else start(z0))
    if attach == "ift":
        return ift.attach(z_star, f), stats
    if attach == "fresh":
        return IFT(solver).attach(z_star, f), stats
    if attach == "jfb":
        return f(z_star), stats
    return z_star, stats


def layer_inference_mode(f, z0, solver, ift, pretrain_depth=0):
    if pretrain_depth:
        return references.deq_layer(f, z0, solver, ift, pretrain_depth)
    with torch.inference_mode():
        z_star, stats = solver(f, z0)
    return ift.attach(z_star, f), stats


def layer_resolves(f, z0, solver, ift, pretrain_depth=0):
    """Solves again until every sample has converged (never, on a map without a fixed point)."""
    if pretrain_depth:
        return references.deq_layer(f, z0, solver, ift, pretrain_depth)
    with torch.no_grad():
        z_star, stats = solver(f, z0)
        for _ in range(5):
            if stats.all_converged:
                break
            z_star, stats = solver(f, z_star)
    return ift.attach(z_star, f), stats


def layer_warmup_in_place(f, z0, solver, ift, pretrain_depth=0):
    """Warm-up that writes every application into z0's memory."""
    if not pretrain_depth:
        return references.deq_layer(f, z0, solver, ift)
    z = z0
    for _ in range(pretrain_depth):
        z.copy_(f(z).detach())
    return z, None


def layer_warmup_float_zeros(f, z0, solver, ift, pretrain_depth=0):
    """Warm-up from a fresh zeros tensor of the default dtype (float32), not from z0."""
    if not pretrain_depth:
        return references.deq_layer(f, z0, solver, ift)
    z = torch.zeros(z0.shape)
    for _ in range(pretrain_depth):
        z = f(z)
    return z, None


# ---- warm_start




def warm_start_stack(cache, index, cold):
    """One row at a time, stacked."""
    return torch.stack([cache.get(int(i), c).to(cold.dtype) for i, c in zip(index, cold)])


def warm_start_rows(cache, index, cold):
    """The seen rows assigned all at once."""
    seen = [r for r, i in enumerate(index.tolist()) if i in cache]
    z0 = cold.clone()
    if seen:
        z0[seen] = torch.stack([cache[int(index[r])] for r in seen]).to(cold.dtype)
    return z0


def start(cache, index, cold, *, keys="int", base="cold", all_or_nothing=False, in_place=False,
          pop=False, store=False):
    """warm_start with one thing changed."""
    z0 = {"cold": cold if in_place else cold.clone(), "zeros": torch.zeros_like(cold),
          "empty": torch.empty(cold.shape)}[base]
    if base == "empty":
        z0.copy_(cold)
    ids = {"int": index.tolist(), "tensor": list(index), "row": list(range(len(index)))}[keys]
    if all_or_nothing and not all(i in cache for i in ids):
        return cold.clone()
    for r, i in enumerate(ids):
        if i in cache:
            z0[r] = cache.pop(i) if pop else cache[i]
        elif store:
            cache[i] = cold[r]
    return z0


CASES_04 = {
    "deq_layer": (checks.check_deq_layer, [deq_layer_like_deq, deq_layer_grad_mode,
                                           references.deq_layer], [
        (lambda *a, **k: layer(*a, **k, no_grad=False), "recorded .* applications of f for a "
                                                        "solve .* grows"),
        (lambda *a, **k: layer(*a, **k, no_grad=False, attach=None), "grows with the solver"),
        (lambda *a, **k: layer(*a, **k, attach=None), "no application of f was recorded"),
        (lambda *a, **k: layer(*a, **k, attach="jfb"), "Jacobian-free backprop"),
        (lambda *a, **k: layer(*a, **k, attach="fresh"), "did not solve the adjoint"),
        (lambda *a, **k: layer(*a, **k, start=torch.zeros_like), "warm start"),
        (layer_resolves, "Call the solver once"),
        (lambda *a, **k: layer(*a, **k, depth_offset=-1), "One application too few"),
        (lambda *a, **k: layer(*a, **k, warmup_no_grad=True), "recorded 0 of the 3"),
        (lambda *a, **k: layer(*a, **k, solve_in_warmup=True), "no solve"),
        (lambda *a, **k: layer(*a, **k, flatten=True), "expected shape"),
        (layer_inference_mode, "inference_mode.*torch.no_grad"),
        (layer_warmup_in_place, "changed its argument `z0` in place"),
        (layer_warmup_float_zeros, "dtype|Double|Float"),
    ]),
    "warm_start": (checks.check_warm_start, [warm_start_stack, warm_start_rows,
                                             references.warm_start], [
        (lambda c, i, z: start(c, i, z, keys="tensor"), "Python ints"),
        (lambda c, i, z: start(c, i, z, keys="row"), "not its row r"),
        (lambda c, i, z: start(c, i, z, base="zeros"), "starts from cold\\[r\\]"),
        (lambda c, i, z: start(c, i, z, all_or_nothing=True), "per sample"),
        (lambda c, i, z: start(c, i, z, in_place=True), "changed its argument `cold` in place"),
        (lambda c, i, z: start(c, i, z, pop=True), "Only read the cache"),
        (lambda c, i, z: start(c, i, z, store=True), "Only read the cache"),
        (lambda c, i, z: start(c, i, z, base="empty"), "dtype"),
        (lambda c, i, z: torch.stack([c[k] for k in i.tolist() if k in c] or [z[0]]),
         "expected shape"),
    ]),
}
