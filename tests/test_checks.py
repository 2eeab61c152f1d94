"""The exercise checks accept correct answers and reject typical wrong ones with useful feedback."""
import pytest
import torch

from deqlite import checks
from deqlite.checks import CheckFailed
from deqlite.solvers import anderson


def eye_like(W):
    return torch.eye(W.shape[0], dtype=W.dtype)


# ---- correct answers (what a student should write)

def weight_tied_forward(W, U, b, x, n_layers, inject_every_layer=True, transpose=True):
    z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
    for k in range(n_layers):
        inj = x @ U.T + b if (inject_every_layer or k == 0) else 0
        z = torch.tanh(z @ (W.T if transpose else W) + inj)
    return z


def forward_iteration(f, z0, tol, max_iter, off_by_one=False):
    z, res = z0, []
    for _ in range(max_iter):
        fz = f(z)
        res.append(((fz - z).norm() / fz.norm()).item())
        z = fz
        if res[-1] < tol:
            break
    return (z0 if off_by_one else z), res


def anderson_via_deqlite(f, z0, tol, max_iter, m):
    z, stats = anderson(f, z0, tol=tol, max_iter=max_iter, m=m)
    return z, stats.rel_residuals.max(dim=1).values.tolist()


def anderson_ignoring_history(f, z0, tol, max_iter, m):
    return forward_iteration(f, z0, tol, max_iter)


def adjoint_solve(vjp, grad, tol, max_iter, add_grad_every_step=True):
    g = grad
    for _ in range(max_iter):
        g_new = vjp(g) + (grad if add_grad_every_step else 0)
        if (g_new - g).norm() < tol:
            return g_new
        g = g_new
    return g


def anderson_weights(G, normalize=True):
    y = torch.linalg.solve(G @ G.T, torch.ones(G.shape[0], dtype=G.dtype))
    return y / y.sum() if normalize else y


def train_step(model, optimizer, x, y, zero_grad=True, step=True, softmax=False):
    import torch.nn.functional as F
    if zero_grad:
        optimizer.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits.softmax(1) if softmax else logits, y)
    loss.backward()
    if step:
        optimizer.step()
    return loss.item()


def nfe_by_epoch(history, include_test=False):
    groups = {}
    for r in history:
        if r["split"] == "train" or include_test:
            groups.setdefault(r["epoch"], []).append(r["fwd_nfe"])
    return {e: sum(v) / len(v) for e, v in groups.items()}


def hutchinson(f_z, z, probes, create_graph=True, per_sample=True, normalize=True, average=True):
    total = 0
    for v in probes:
        vJ = torch.autograd.grad(f_z, z, v, create_graph=create_graph, retain_graph=True)[0]
        total = total + (vJ ** 2).sum(1 if per_sample else None)
    est = total / (len(probes) if average else 1)
    return est / z.shape[1] if normalize else est


def hutchinson_jvp(f_z, z, probes):
    """The same estimate with J v instead of vᵀ J (also unbiased: E‖Jv‖² = ‖J‖²_F): must pass."""
    out = 0
    for v in probes:
        u = torch.zeros_like(f_z, requires_grad=True)              # double-backward trick for J v
        vjp = torch.autograd.grad(f_z, z, u, create_graph=True)[0]
        Jv = torch.autograd.grad(vjp, u, v, create_graph=True)[0]
        out = out + (Jv ** 2).sum(1)
    return out / len(probes) / z.shape[1]


def power_method(matvec, v, n_iter, signed=False, normalize=True):
    for _ in range(n_iter):
        v = matvec(v)
        if normalize:
            v = v / v.norm()
    rayleigh = v @ matvec(v) / (v @ v)
    return rayleigh if signed else rayleigh.abs()


def fuse_two(b0, b1, down, up, mode="nearest", scale_factor=False, residual=True):
    import torch.nn.functional as F
    size = dict(scale_factor=2) if scale_factor else dict(size=b0.shape[-2:])
    return [(b0 if residual else 0) + F.interpolate(up(b1), mode=mode, **size),
            (b1 if residual else 0) + down(b0)]


def state_numel(channels, h, w, round_up=True):
    total = 0
    for c in channels:
        total += c * h * w
        h, w = (-(-h // 2), -(-w // 2)) if round_up else (h // 2, w // 2)
    return total


def causal_attention(q, k, v, mask=True, scale=True, diagonal=0):
    scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5 if scale else 1.0)
    if mask:
        T = q.shape[-2]
        future = torch.ones(T, T, dtype=torch.bool).triu(1 - diagonal)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


def unigram_bits(counts, drop_zeros=True, base2=True):
    p = counts / counts.sum()
    if drop_zeros:
        p = p[p > 0]
    return float(-(p * (p.log2() if base2 else p.log())).sum())


CASES_07 = [
    (checks.check_causal_attention, causal_attention, [
        lambda q, k, v: causal_attention(q, k, v, mask=False),       # sees the future
        lambda q, k, v: causal_attention(q, k, v, scale=False),      # no 1/√d
        lambda q, k, v: causal_attention(q, k, v, diagonal=1),       # hides the token itself
    ]),
    (checks.check_unigram_bits, unigram_bits, [
        lambda c: unigram_bits(c, drop_zeros=False),                 # NaN from 0·log 0
        lambda c: unigram_bits(c, base2=False),                      # nats
        lambda c: float(-(c * c.log2()).sum()),                      # counts, not probabilities
    ]),
]

CASES_06 = [
    (checks.check_fuse_two, fuse_two, [
        lambda *a: fuse_two(*a, scale_factor=True),       # breaks on odd sizes
        lambda *a: fuse_two(*a, mode="bilinear"),         # not the nearest-neighbour convention
        lambda *a: fuse_two(*a, residual=False),          # forgets each branch's own features
        lambda *a: fuse_two(*a)[::-1],                    # outputs swapped
    ]),
    (checks.check_state_numel, state_numel, [
        lambda c, h, w: state_numel(c, h, w, round_up=False),
        lambda c, h, w: sum(c) * h * w,                   # every branch at full resolution
        lambda c, h, w: state_numel([1] * len(c), h, w),  # forgets the channels
    ]),
]

CASES_05 = [
    (checks.check_hutchinson, hutchinson, [
        lambda f_z, z, p: hutchinson(f_z, z, p, create_graph=False),   # no graph: cannot train
        lambda f_z, z, p: hutchinson(f_z, z, p, per_sample=False),     # summed over the batch
        lambda f_z, z, p: hutchinson(f_z, z, p, normalize=False),      # not divided by d
        lambda f_z, z, p: hutchinson(f_z, z, p, average=False),        # not averaged over probes
    ]),
    (checks.check_power_method, power_method, [
        lambda mv, v, n: power_method(mv, v, n, signed=True),          # negative λ_max
        lambda mv, v, n: power_method(mv, v, 1),                       # ignores n_iter
        lambda mv, v, n: mv(v).norm() / v.norm(),                      # one ratio, no iteration
    ]),
]

CASES = [
    (checks.check_weight_tied_forward, weight_tied_forward, [
        lambda *a: weight_tied_forward(*a, inject_every_layer=False),
        lambda *a: weight_tied_forward(*a, transpose=False),
        lambda W, U, b, x, n: weight_tied_forward(W, U, b, x, n + 1),
    ]),
    (checks.check_lipschitz_bound, lambda W: torch.linalg.matrix_norm(W, ord=2), [
        lambda W: torch.linalg.matrix_norm(W),                      # Frobenius
        lambda W: torch.linalg.eigvals(W).abs().max(),              # spectral radius
    ]),
    (checks.check_linear_fixed_point, lambda W, b: torch.linalg.solve(eye_like(W) - W, b.T).T, [
        lambda W, b: torch.linalg.solve(eye_like(W) - W.T, b.T).T,  # missing transpose
        lambda W, b: torch.linalg.solve(eye_like(W) + W, b.T).T,    # wrong sign
    ]),
    (checks.check_forward_iteration, forward_iteration, [
        lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, off_by_one=True),
        lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, 3),   # ignores max_iter/tol
    ]),
    (checks.check_anderson, anderson_via_deqlite, [anderson_ignoring_history]),
    (checks.check_relative_residual,
     lambda z, fz: (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1), [
         lambda z, fz: (fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1),  # wrong denominator
         lambda z, fz: (fz - z).norm() / fz.norm(),                                 # not per sample
     ]),
    (checks.check_anderson_weights, anderson_weights, [
        lambda G: anderson_weights(G, normalize=False),
        lambda G: torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=G.dtype),    # plain averaging
    ]),
    (checks.check_adjoint_solve, adjoint_solve, [
        lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, False),
        lambda vjp, grad, tol, max_iter: grad,                      # Jacobian-free: not the IFT
    ]),
    (checks.check_linear_deq_grad,
     lambda W, b, d: torch.linalg.solve(eye_like(W) - W.T, d.T).T, [
         lambda W, b, d: torch.linalg.solve(eye_like(W) - W, d.T).T,   # missing transpose
         lambda W, b, d: d,                                             # forgets (I − W)⁻ᵀ
     ]),
    (checks.check_train_step, train_step, [
        lambda m, o, x, y: train_step(m, o, x, y, zero_grad=False),
        lambda m, o, x, y: train_step(m, o, x, y, step=False),
        lambda m, o, x, y: train_step(m, o, x, y, softmax=True),
    ]),
    (checks.check_count_parameters,
     lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad), [
         lambda m: sum(p.numel() for p in m.parameters()),               # counts frozen ones
         lambda m: len(list(m.parameters())),                            # counts tensors
     ]),
    (checks.check_nfe_by_epoch, nfe_by_epoch, [
        lambda h: nfe_by_epoch(h, include_test=True),
        lambda h: {r["epoch"]: r["fwd_nfe"] for r in h if r["split"] == "train"},  # last, not mean
    ]),
] + CASES_05 + CASES_06 + CASES_07


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=[c[0].__name__ for c in CASES])
def test_check_accepts_right_and_rejects_wrong(check, right, wrongs, capsys):
    assert check(right) is True
    assert "✓" in capsys.readouterr().out
    for wrong in wrongs:
        with pytest.raises(CheckFailed) as info:
            check(wrong)
        message = str(info.value)
        assert len(message) > 40, "feedback should explain, not just fail"


def test_unfinished_exercise_says_so():
    def todo(*args, **kwargs):
        raise NotImplementedError

    with pytest.raises(CheckFailed, match="not written yet"):
        checks.check_weight_tied_forward(todo)


def test_student_exception_is_reported_with_its_message():
    def buggy(*args):
        raise IndexError("index 9 is out of bounds")

    with pytest.raises(CheckFailed, match="IndexError: index 9"):
        checks.check_lipschitz_bound(buggy)


def test_hutchinson_check_accepts_the_jvp_form_too(capsys):
    """‖J v‖² is as unbiased as ‖vᵀJ‖²: a correct alternative must not be rejected."""
    assert checks.check_hutchinson(hutchinson_jvp)
