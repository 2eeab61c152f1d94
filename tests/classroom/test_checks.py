"""The exercise checks accept correct answers and reject typical wrong ones with useful feedback."""
import pytest
import torch

from deqlite.classroom import checks, references
from deqlite.classroom.checks import CheckFailed


def eye_like(W):
    return torch.eye(W.shape[0], dtype=W.dtype)


# ---- correct answers (what a student should write)

def weight_tied_forward(W, U, b, x, n_layers, inject_every_layer=True, transpose=True):
    z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
    for k in range(n_layers):
        inj = x @ U.T + b if (inject_every_layer or k == 0) else 0
        z = torch.tanh(z @ (W.T if transpose else W) + inj)
    return z


def forward_iteration(f, z0, tol, max_iter, off_by_one=False, update=True):
    z, res = z0, []
    for _ in range(max_iter):
        fz = f(z)
        res.append(((fz - z).norm() / fz.norm()).item())
        if update:
            z = fz
        if res[-1] < tol:
            break
    return (z0 if off_by_one else z), res


def anderson_ignoring_history(f, z0, tol, max_iter, m):
    return forward_iteration(f, z0, tol, max_iter)


def anderson_student(f, z0, tol, max_iter, m, window=0, mix_x=False):
    """Notebook 02's Anderson, with a history of m + window pairs, or mixing the x_i."""
    X, F = [z0], [f(z0)]
    res = [((F[0] - X[0]).norm() / F[0].norm()).item()]
    while len(res) < max_iter and res[-1] > tol:
        G = torch.stack([fx - x for x, fx in zip(X, F)], dim=1)
        H = G @ G.transpose(1, 2)
        s = H.diagonal(dim1=1, dim2=2).mean(dim=1)
        y = torch.linalg.solve(H + (1e-4 * s + 1e-30)[:, None, None] * torch.eye(len(X), dtype=H.dtype),
                               torch.ones_like(H[:, 0]))
        alpha = y / y.sum(dim=1, keepdim=True)
        x = torch.einsum("bn,bnd->bd", alpha, torch.stack(X if mix_x else F, dim=1))
        X, F = (X + [x])[-(m + window):], (F + [f(x)])[-(m + window):]
        res.append(((F[-1] - X[-1]).norm() / F[-1].norm()).item())
    return X[-1], res


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


def neumann_adjoint(vjp, grad, k, terms_offset=0, skip_first=False, vjp_of_sum=False):
    g, term = torch.zeros_like(grad), grad
    for i in range(k + terms_offset):
        if not (skip_first and i == 0):
            g = g + term
        term = vjp(g if vjp_of_sum else term)
    return g


def neumann_adjoint_horner(vjp, grad, k):
    """The same sum by Horner's rule, g ← Jᵀ g + grad k times from g = 0: must pass."""
    g = torch.zeros_like(grad)
    for _ in range(k):
        g = vjp(g) + grad
    return g


def unigram_bits(counts, drop_zeros=True, base2=True):
    p = counts / counts.sum()
    if drop_zeros:
        p = p[p > 0]
    return float(-(p * (p.log2() if base2 else p.log())).sum())


def project_l2_ball(x, center, radius, always_rescale=False, batch_norm=False, row_norm=False,
                    around_zero=False):
    d = x if around_zero else x - center
    if batch_norm:
        norm = d.norm().expand(x.shape[0])                      # one norm for the whole batch
    elif row_norm:
        norm = d.norm(dim=-1, keepdim=True)                     # per row of pixels
    else:
        norm = d.flatten(1).norm(dim=1)
    shape = norm.shape if row_norm else (-1, *[1] * (x.dim() - 1))
    scale = radius / norm.clamp_min(1e-300) if always_rescale else \
        torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)
    d = d * scale.reshape(shape)
    return d if around_zero else center + d


def project_l2_ball_direction(x, center, radius):
    """direction d/‖d‖ times the clipped length min(‖d‖, r): 0/0 = NaN at the center."""
    d = x - center
    norm = d.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    return center + d / norm * norm.clamp(max=radius)


def project_l2_ball_where(x, center, radius):
    """A correct alternative: leave points inside alone, rescale the others."""
    d = (x - center).flatten(1)
    norm = d.norm(dim=1, keepdim=True)
    outside = norm > radius
    d = torch.where(outside, d * radius / torch.where(outside, norm, 1.0), d)
    return center + d.reshape(x.shape)


def augmented_map(f, loss, z, mu, x, alpha, project, sign=-1, transpose=True,
                  adjoint_loss=True, projection=True, loss_at_fz=False, two_passes=False):
    z, x = z.detach().requires_grad_(), x.detach().requires_grad_()
    fz = f(z, x)
    obj = loss(fz if loss_at_fz else z, x).sum()
    if two_passes:                                               # right, but twice the work
        adj, gx = torch.autograd.grad((fz * mu).sum(), (z, x))
        fz2 = f(z, x)
        lz, lx = torch.autograd.grad(loss(z, x).sum() + 0 * fz2.sum(), (z, x))
        adj, gx = adj + lz, gx + lx
    elif transpose:
        adj, gx = torch.autograd.grad((fz * mu).sum() + (obj if adjoint_loss else 0), (z, x))
        if not adjoint_loss:
            gx = gx + torch.autograd.grad(loss(z, x).sum(), x)[0]
    else:                                                        # J_z μ (a JVP), not J_zᵀ μ
        u = torch.zeros_like(fz, requires_grad=True)
        vjp = torch.autograd.grad(fz, z, u, create_graph=True)[0]
        jvp = torch.autograd.grad(vjp, u, mu, retain_graph=True)[0]
        lz, lx = torch.autograd.grad(obj, (z, x), retain_graph=True)
        gx = torch.autograd.grad(fz, x, mu)[0] + lx
        adj = jvp + lz
    x_next = x.detach() + sign * alpha * gx
    return fz.detach(), adj, project(x_next) if projection else x_next


def augmented_map_by_jacobians(f, loss, z, mu, x, alpha, project):
    """A correct alternative: J_zᵀμ and J_xᵀμ from torch.func.vjp, one call through f."""
    fz, vjp_fn = torch.func.vjp(f, z, x)
    lz, lx = torch.func.grad(lambda z, x: loss(z, x).sum(), argnums=(0, 1))(z, x)
    jz, jx = vjp_fn(mu)
    return fz, jz + lz, project(x - alpha * (jx + lx))


CASES_08 = [
    (checks.check_project_l2_ball, project_l2_ball, [
        lambda x, c, r: project_l2_ball(x, c, r, always_rescale=True),   # pushes inside points out
        lambda x, c, r: project_l2_ball(x, c, r, batch_norm=True),       # one norm for the batch
        lambda x, c, r: project_l2_ball(x, c, r, row_norm=True),         # per row, not per sample
        lambda x, c, r: project_l2_ball(x, c, r, around_zero=True),      # ignores the center
        project_l2_ball_direction,                                       # NaN at the center
        lambda x, c, r: x,                                               # forgets to project
    ]),
    (checks.check_augmented_map, augmented_map, [
        lambda *a: augmented_map(*a, sign=+1),                   # ascent on x
        lambda *a: augmented_map(*a, transpose=False),           # J_z μ instead of J_zᵀ μ
        lambda *a: augmented_map(*a, adjoint_loss=False),        # adjoint without ∇_z ℓ
        lambda *a: augmented_map(*a, projection=False),          # forgets the projection
        lambda *a: augmented_map(*a, loss_at_fz=True),           # ℓ(f(z, x), x) instead of ℓ(z, x)
        lambda *a: augmented_map(*a, two_passes=True),           # right values, twice the work
        lambda f, loss, z, mu, x, alpha, project: (z,) + augmented_map(f, loss, z, mu, x, alpha,
                                                                       project)[1:],  # z not moved
    ]),
    (checks.check_project_l2_ball, project_l2_ball_where, []),        # correct alternatives
    (checks.check_augmented_map, augmented_map_by_jacobians, []),
]

CASES_09 = [    # notebook 09's exercises (added with the notebook)
    (checks.check_neumann_adjoint, neumann_adjoint, [
        lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, terms_offset=1),   # k + 1 terms
        lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, skip_first=True),  # forgets i = 0
        lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, vjp_of_sum=True),  # Jᵀ of the sum
        lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, terms_offset=-1),  # k − 1 terms
    ]),
]

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

def data_parallel_gradient(model, x, y, world, average=True, mean_loss=True, shards=None,
                           one_shard=False):
    """What DDP computes (and variations a student might write)."""
    import torch.nn.functional as F
    params, total = list(model.parameters()), None
    parts = list(zip(x.tensor_split(shards or world), y.tensor_split(shards or world)))
    for x_r, y_r in parts[:1] if one_shard else parts:
        loss = F.cross_entropy(model(x_r), y_r, reduction="mean" if mean_loss else "sum")
        grads = torch.autograd.grad(loss, params)
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    return [t / world for t in total] if average else list(total)


def data_parallel_gradient_with_backward(model, x, y, world):
    """A correct alternative: .backward() accumulates into .grad; read and restore it."""
    import torch.nn.functional as F
    saved = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for x_r, y_r in zip(x.tensor_split(world), y.tensor_split(world)):
        (F.cross_entropy(model(x_r), y_r) / world).backward()
    out = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    return out


def data_parallel_gradient_stepping(model, x, y, world):
    """Right gradients, but it also takes an SGD step: it changes the weights."""
    grads = data_parallel_gradient(model, x, y, world)
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 0.1 * g
    return grads


CASES_10 = [
    (checks.check_data_parallel_gradient, data_parallel_gradient, [
        lambda m, x, y, w: data_parallel_gradient(m, x, y, w, average=False),     # sums
        lambda m, x, y, w: data_parallel_gradient(m, x, y, w, mean_loss=False),   # sum loss
        lambda m, x, y, w: data_parallel_gradient(m, x, y, w, one_shard=True),    # rank 0 only
        data_parallel_gradient_stepping,                                         # takes a step
        lambda m, x, y, w: data_parallel_gradient(m, x, y, w)[:-1],              # drops one
    ]),
    (checks.check_data_parallel_gradient, data_parallel_gradient_with_backward, []),
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
        lambda W: W.abs().max(),                                    # largest entry
    ]),
    (checks.check_linear_fixed_point, lambda W, b: torch.linalg.solve(eye_like(W) - W, b.T).T, [
        lambda W, b: torch.linalg.solve(eye_like(W) - W.T, b.T).T,  # missing transpose
        lambda W, b: torch.linalg.solve(eye_like(W) + W, b.T).T,    # wrong sign
        lambda W, b: b @ torch.linalg.inv(eye_like(W) - W),         # (I − W)⁻¹ on the wrong side
    ]),
    (checks.check_forward_iteration, forward_iteration, [
        lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, off_by_one=True),
        lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, 3),   # ignores max_iter/tol
        lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, update=False),
    ]),
    (checks.check_anderson, anderson_student, [
        anderson_ignoring_history,                                       # no history at all
        lambda f, z0, tol, max_iter, m: anderson_student(f, z0, tol, max_iter, m, window=1),
        lambda f, z0, tol, max_iter, m: anderson_student(f, z0, tol, max_iter, m, window=-1),
        lambda f, z0, tol, max_iter, m: anderson_student(f, z0, tol, max_iter, m, mix_x=True),
    ]),
    (checks.check_relative_residual,
     lambda z, fz: (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1), [
         lambda z, fz: (fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1),  # wrong denominator
         lambda z, fz: (fz - z).norm() / fz.norm(),                                 # not per sample
         lambda z, fz: (fz - z).norm(dim=-1) / fz.norm(dim=-1),                     # last dim only
     ]),
    (checks.check_anderson_weights, anderson_weights, [
        lambda G: anderson_weights(G, normalize=False),
        lambda G: torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=G.dtype),    # plain averaging
        lambda G: anderson_weights(G) * G.shape[0] / anderson_weights(G).norm(),  # wrong scale
    ]),
    (checks.check_adjoint_solve, adjoint_solve, [
        lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, False),
        lambda vjp, grad, tol, max_iter: grad,                      # Jacobian-free: not the IFT
        lambda vjp, grad, tol, max_iter: adjoint_solve(lambda g: vjp(g + grad) - grad, grad, tol,
                                                       max_iter),   # Jᵀ(g + grad): a term too many
    ]),
    (checks.check_linear_deq_grad,
     lambda W, b, d: torch.linalg.solve(eye_like(W) - W.T, d.T).T, [
         lambda W, b, d: torch.linalg.solve(eye_like(W) - W, d.T).T,   # missing transpose
         lambda W, b, d: d,                                             # forgets (I − W)⁻ᵀ
         lambda W, b, d: torch.linalg.solve(eye_like(W) + W.T, d.T).T,  # wrong sign
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
         lambda m: sum(len(p) for p in m.parameters() if p.requires_grad),  # rows, not entries
     ]),
    (checks.check_nfe_by_epoch, nfe_by_epoch, [
        lambda h: nfe_by_epoch(h, include_test=True),
        lambda h: {r["epoch"]: r["fwd_nfe"] for r in h if r["split"] == "train"},  # last, not mean
        lambda h: {e: max(r["fwd_nfe"] for r in h if r["epoch"] == e and r["split"] == "train")
                   for e in {r["epoch"] for r in h}},                    # max, not mean
    ]),
] + CASES_05 + CASES_06 + CASES_07 + CASES_08 + CASES_09 + CASES_10


@pytest.mark.parametrize("check, right, wrongs", CASES, ids=[c[0].__name__ for c in CASES])
def test_check_accepts_right_and_rejects_wrong(check, right, wrongs, capsys):
    assert check(right) is right            # the notebook keeps what the check hands back
    assert "✓" in capsys.readouterr().out
    for wrong in wrongs:
        with pytest.raises(CheckFailed) as info:
            check(wrong)
        message = str(info.value)
        assert len(message) > 40, "feedback should explain, not just fail"


def test_neumann_adjoint_accepts_horners_rule(capsys):
    assert checks.check_neumann_adjoint(neumann_adjoint_horner) is neumann_adjoint_horner


EXERCISES = sorted(name for name in dir(checks) if name.startswith("check_"))


@pytest.mark.parametrize("name", EXERCISES)
def test_an_unfinished_exercise_gets_deqlites_reference_which_passes_its_own_check(name, capsys):
    """In a student notebook the exercise still raises NotImplementedError: the check says so
    and hands back the reference, so the rest of the notebook runs; the reference is right."""
    def todo(*args, **kwargs):
        raise NotImplementedError()

    check = getattr(checks, name)
    exercise = name.removeprefix("check_")
    handed_back = check(todo)
    assert handed_back is getattr(references, exercise) is checks.reference(exercise)
    out = capsys.readouterr().out
    assert f"{exercise} is not written yet" in out and "reference implementation" in out
    assert check(handed_back) is handed_back and "✓" in capsys.readouterr().out


def test_every_exercise_has_at_least_three_planted_wrong_answers():
    planted = {}
    for check, _, wrongs in CASES:
        planted[check.__name__] = planted.get(check.__name__, 0) + len(wrongs)
    assert set(planted) == set(EXERCISES)
    assert {name: n for name, n in planted.items() if n < 3} == {}


def test_an_unknown_exercise_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown exercise 'andersen'.*Did you mean 'anderson'"):
        checks.reference("andersen")


def test_student_exception_is_reported_with_its_message():
    def buggy(*args):
        raise IndexError("index 9 is out of bounds")

    with pytest.raises(CheckFailed, match="IndexError: index 9"):
        checks.check_lipschitz_bound(buggy)


def test_hutchinson_check_accepts_the_jvp_form_too(capsys):
    """‖J v‖² is as unbiased as ‖vᵀJ‖²: a correct alternative must not be rejected."""
    assert checks.check_hutchinson(hutchinson_jvp)
