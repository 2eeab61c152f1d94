"""The exercise checks accept correct answers and reject typical wrong ones with useful feedback."""
import functools
import importlib
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deqlite.classroom import checks, references
from deqlite.classroom.checks.nb08 import _pgd_variant as pgd_variant
from deqlite.classroom.checks import _harness
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


def forward_iteration(f, z0, tol, max_iter, off_by_one=False, update=True, evals=1,
                      stop=True, by_z=False, in_place=False):
    z, res = z0, []
    for _ in range(max_iter):
        fz = f(z)
        for _ in range(evals - 1):
            fz = f(z)
        res.append(((fz - z).norm() / (z if by_z else fz).norm()).item())
        if update:
            if in_place:
                z.copy_(fz)
            else:
                z = fz
        if stop and res[-1] < tol:
            break
    return (z0 if off_by_one else z), res


def forward_iteration_while(f, z0, tol, max_iter, forever=False):
    """A correct alternative with a while loop (or, wrong, one without max_iter)."""
    z, fz = z0, f(z0)
    res = [((fz - z).norm() / fz.norm()).item()]
    while res[-1] > tol and (forever or len(res) < max_iter):
        z, fz = fz, f(fz)
        res.append(((fz - z).norm() / fz.norm()).item())
    return fz, res


def anderson_ignoring_history(f, z0, tol, max_iter, m):
    return forward_iteration(f, z0, tol, max_iter)


def anderson_student(f, z0, tol, max_iter, m, window=0, mix_x=False, flatten=True,
                     extra_eval=False, per_batch=False, forever=False):
    """Notebook 02's Anderson, or with a history of m + window pairs, mixing the x_i, not
    flattening image states, evaluating f again for the residual, one α for the whole batch, or
    ignoring max_iter."""
    X, F = [z0], [f(z0)]
    res = [((F[0] - X[0]).norm() / F[0].norm()).item()]
    while (forever or len(res) < max_iter) and res[-1] > tol:
        G = torch.stack([fx - x for x, fx in zip(X, F)], dim=1)
        G = G.flatten(2) if flatten else G
        if per_batch:
            G = G.transpose(0, 1).flatten(1)[None]
        H = G @ G.transpose(-1, -2)
        s = H.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
        y = torch.linalg.solve(H + (1e-4 * s + 1e-30)[..., None, None] * torch.eye(len(X), dtype=H.dtype),
                               torch.ones_like(H[..., 0]))
        alpha = (y / y.sum(dim=-1, keepdim=True)).expand(z0.shape[0], -1)
        x = torch.einsum("bn,bn...->b...", alpha, torch.stack(X if mix_x else F, dim=1))
        X, F = (X + [x])[-(m + window):], (F + [f(x)])[-(m + window):]
        fx = f(X[-1]) if extra_eval else F[-1]
        res.append(((fx - X[-1]).norm() / fx.norm()).item())
    return X[-1], res


def anderson_per_sample(f, z0, tol, max_iter, m, lam=1e-4):
    """A correct alternative: the same weights solved one sample at a time."""
    X, F = [z0], [f(z0)]
    res = [((F[0] - X[0]).norm() / F[0].norm()).item()]
    while len(res) < max_iter and res[-1] > tol:
        alphas = []
        for b in range(z0.shape[0]):
            G = torch.stack([(fx[b] - x[b]).flatten() for x, fx in zip(X, F)])
            H = G @ G.T
            H = H + (lam * H.diagonal().mean() + 1e-30) * torch.eye(len(X), dtype=H.dtype)
            y = torch.linalg.solve(H, torch.ones(len(X), dtype=H.dtype))
            alphas.append(y / y.sum())
        x = torch.stack([sum(a[i] * F[i][b] for i in range(len(X))) for b, a in enumerate(alphas)])
        X, F = (X + [x])[-m:], (F + [f(x)])[-m:]
        res.append(((F[-1] - X[-1]).norm() / F[-1].norm()).item())
    return X[-1], res


def adjoint_solve(vjp, grad, tol, max_iter, add_grad_every_step=True, start_zero=False,
                  forever=False, fixed=None):
    g = torch.zeros_like(grad) if start_zero else grad
    i = 0
    while forever or i < (fixed or max_iter):
        i += 1
        g_new = vjp(g) + (grad if add_grad_every_step else 0)
        if fixed is None and (g_new - g).norm() < tol:
            return g_new
        g = g_new
    return g


def adjoint_solve_in_place(vjp, grad, tol, max_iter):
    """Starts from g = grad and accumulates into it with +=: changes the caller's grad."""
    g = grad
    for _ in range(max_iter):
        g_new = vjp(g)
        g_new += grad
        done = (g_new - g).norm() < tol
        g.copy_(g_new)
        if done:
            break
    return g


def anderson_weights(G, normalize=True):
    y = torch.linalg.solve(G @ G.T, torch.ones(G.shape[0], dtype=G.dtype))
    return y / y.sum() if normalize else y






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
    size = dict(scale_factor=2) if scale_factor else dict(size=b0.shape[-2:])
    return [(b0 if residual else 0) + F.interpolate(up(b1), mode=mode, **size),
            (b1 if residual else 0) + down(b0)]


def state_numel(channels, h, w, round_up=True):
    total = 0
    for c in channels:
        total += c * h * w
        h, w = (-(-h // 2), -(-w // 2)) if round_up else (h // 2, w // 2)
    return total




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


def power_method_norm_ratio(matvec, v0, n_iter):
    """A correct alternative: ‖A v‖ for the unit v after n_iter steps (|λ| for symmetric A)."""
    v = v0 / v0.norm()
    for _ in range(n_iter):
        w = matvec(v)
        v = w / w.norm()
    return matvec(v).norm().item()


def power_method_in_place(matvec, v0, n_iter):
    v0 /= v0.norm()                                  # normalizes the caller's vector
    return power_method(matvec, v0, n_iter)


def power_method_twice(matvec, v, n_iter):
    for _ in range(n_iter):
        v = matvec(matvec(v))                        # A² each step: two products, and |λ|²
        v = v / v.norm()
    return (v @ matvec(v)).abs()


def hutchinson_batched(f_z, z, probes):
    """A correct alternative: all probes in one batched autograd.grad call."""
    vJ = torch.autograd.grad(f_z, z, probes, create_graph=True, is_grads_batched=True)[0]
    return vJ.square().sum(-1).mean(0) / z.shape[1]


def hutchinson_detached(f_z, z, probes):
    return hutchinson(f_z, z, probes).detach().requires_grad_()      # a graph to nothing


def hutchinson_by_numel(f_z, z, probes):
    return hutchinson(f_z, z, probes, normalize=False) / z.numel()  # divides by batch · d


def hutchinson_unsquared(f_z, z, probes):
    total = 0
    for v in probes:
        vJ = torch.autograd.grad(f_z, z, v, create_graph=True, retain_graph=True)[0]
        total = total + vJ.norm(dim=1)
    return total / len(probes) / z.shape[1]


def fuse_two_repeat(b0, b1, down, up):
    """A correct alternative: nearest upsampling by repeating rows and columns, then cropping."""
    u = up(b1).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return [b0 + u[..., :b0.shape[-2], :b0.shape[-1]], b1 + down(b0)]


def fuse_two_in_place(b0, b1, down, up):
    f1 = b1 + down(b0)
    b0 += F.interpolate(up(b1), size=b0.shape[-2:], mode="nearest")   # changes the caller's b0
    return [b0, f1]


def fuse_two_pool(b0, b1, down, up):
    pooled = F.avg_pool2d(b0, 2, ceil_mode=True)                    # no conv: wrong channels
    return [b0 + F.interpolate(up(b1), size=b0.shape[-2:]), b1 + pooled]


def neumann_adjoint_in_place(vjp, grad, k):
    g, term = grad, grad                             # g is the caller's grad ...
    for _ in range(k - 1):
        term = vjp(term)
        g += term                                    # ... and += changes it
    return g


def neumann_adjoint_from_scratch(vjp, grad, k):
    """Right value, but term i recomputed from grad with i products: k(k − 1)/2 in all."""
    g = torch.zeros_like(grad)
    for i in range(k):
        term = grad
        for _ in range(i):
            term = vjp(term)
        g = g + term
    return g


def data_parallel_gradient_leaves_grad(model, x, y, world):
    """Right values via .backward(), but leaves the model's .grad overwritten."""
    model.zero_grad(set_to_none=True)
    for x_r, y_r in zip(x.tensor_split(world), y.tensor_split(world)):
        (F.cross_entropy(model(x_r), y_r) / world).backward()
    return [p.grad.clone() for p in model.parameters()]


def pgd_in_place(model, images, labels, eps, k, step):
    x = references.pgd(model, images, labels, eps, k, step)
    images.copy_(x)                                  # overwrites the caller's clean images
    return x


def project_l2_ball_in_place(x, center, radius):
    d = x.sub_(center)                               # changes the caller's x
    norm = d.flatten(1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    return center + d * torch.clamp(radius / norm.clamp_min(1e-300), max=1.0)


def weight_tied_hidden_6(W, U, b, x, n_layers):
    z = torch.zeros(x.shape[0], 6, dtype=x.dtype)                # the hidden size hard-coded
    for _ in range(n_layers):
        z = torch.tanh(z @ W.T + x @ U.T + b)
    return z


def linear_deq_grad_by_autograd(W, b, dl_dz):
    """A correct alternative: autograd through the exact solve."""
    b = b.detach().requires_grad_()
    z = torch.linalg.solve(eye_like(W) - W, b.T).T
    return torch.autograd.grad(z, b, dl_dz)[0]


def eye_f64(W):
    return torch.eye(W.shape[0], dtype=torch.float64)


W_ = "expected dtype torch.float32"          # the dtype sub-test's message


# Each exercise: the check, correct answers written differently (all must pass), and planted wrong
# ones with a regular expression the feedback must match: the message must name the mistake.
CASES = {
    "weight_tied_forward": (checks.check_weight_tied_forward, [
        weight_tied_forward,
        lambda W, U, b, x, n: weight_tied_forward(W, U, b, x, n),
        references.weight_tied_forward,
    ], [
        (lambda *a: weight_tied_forward(*a, inject_every_layer=False), "not only the first"),
        (lambda *a: weight_tied_forward(*a, transpose=False), "z @ W.T"),
        (lambda W, U, b, x, n: weight_tied_forward(W, U, b, x, n + 1), "n_layers="),
        (lambda W, U, b, x, n: weight_tied_forward(W, U, b, x, max(n, 1)), "n_layers = 0"),
        (lambda W, U, b, x, n: weight_tied_forward(W.double(), U.double(), b.double(), x.double(), n),
         W_),
        (weight_tied_hidden_6, "raised RuntimeError|expected shape"),       # hard-coded d = 6
        (lambda W, U, b, x, n: weight_tied_forward(W, U, b, x, n).float(), "dtype"),
    ]),
    "lipschitz_bound": (checks.check_lipschitz_bound, [
        lambda W: torch.linalg.matrix_norm(W, ord=2),
        lambda W: torch.linalg.svdvals(W)[0].item(),
        lambda W: torch.linalg.eigvalsh(W.T @ W).max().sqrt(),
    ], [
        (lambda W: torch.linalg.matrix_norm(W), "Frobenius"),
        (lambda W: torch.linalg.eigvals(W).abs().max(), "spectral radius"),
        (lambda W: W.abs().max(), "spectral norm"),
        (lambda W: torch.linalg.matrix_norm(W, ord=1), "spectral norm"),
        (lambda W: torch.linalg.svdvals(W), "one number, got a tensor of shape"),
        (lambda W: None, "should return a number, got None"),
        (lambda W: torch.linalg.eigvalsh(W).abs().max(), "lipschitz_bound on"),   # symmetric part
    ]),
    "linear_fixed_point": (checks.check_linear_fixed_point, [
        lambda W, b: torch.linalg.solve(eye_like(W) - W, b.T).T,
        lambda W, b: b @ torch.linalg.inv(eye_like(W) - W).T,
        lambda W, b: torch.linalg.solve(eye_like(W) - W.T, b, left=False),
    ], [
        (lambda W, b: torch.linalg.solve(eye_like(W) - W.T, b.T).T, "transposes"),
        (lambda W, b: torch.linalg.solve(eye_like(W) + W, b.T).T, "entries are off"),
        (lambda W, b: b @ torch.linalg.inv(eye_like(W) - W), "entries are off"),
        (lambda W, b: torch.linalg.solve(eye_f64(W) - W, b.T).T, "dtype"),     # fixed float64 eye
        (lambda W, b: functools.reduce(lambda z, _: z @ W.T + b, range(10), b), "exactly"),
        (lambda W, b: b.copy_(torch.linalg.solve(eye_like(W) - W, b.T).T), "in place"),
        (lambda W, b: torch.linalg.solve(eye_like(W) - W, b[:1].T).T.expand_as(b), "entries are off"),
    ]),
    "forward_iteration": (checks.check_forward_iteration, [
        forward_iteration, forward_iteration_while, references.forward_iteration,
    ], [
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, off_by_one=True),
         "fixed point"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, 3), "fixed point"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, update=False),
         "fixed point"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, evals=2),
         "evaluated f .* times for"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, stop=False),
         "Stop at the first residual"),
        (lambda f, z0, tol, max_iter: forward_iteration_while(f, z0, tol, max_iter, forever=True),
         "more than 200 times"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, in_place=True),
         "changed its argument `z0` in place"),
        (lambda f, z0, tol, max_iter: forward_iteration(f, z0, tol, max_iter, by_z=True),
         "not of z"),
        (lambda f, z0, tol, max_iter: (forward_iteration(f, z0, tol, max_iter)[0], None),
         "list of numbers"),
    ]),
    "anderson": (checks.check_anderson, [
        anderson_student, anderson_per_sample,
    ], [
        (anderson_ignoring_history, "history is not being used"),
        (lambda *a, **k: anderson_student(*a, **k, window=1), "exactly the last m pairs"),
        (lambda *a, **k: anderson_student(*a, **k, window=-1), "exactly the last m pairs"),
        (lambda *a, **k: anderson_student(*a, **k, mix_x=True), "not Σ α_i x_i|fixed point"),
        (lambda *a, **k: anderson_student(*a, **k, flatten=False), "raised RuntimeError"),
        (lambda *a, **k: anderson_student(*a, **k, extra_eval=True), "evaluated f .* times for"),
        (lambda *a, **k: anderson_student(*a, **k, forever=True), "more than 200 times"),
        (lambda *a, **k: anderson_student(*a, **k, per_batch=True), "per sample"),
    ]),
    "relative_residual": (checks.check_relative_residual, [
        lambda z, fz: (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1),
        lambda z, fz: torch.linalg.vector_norm(fz - z, dim=tuple(range(1, z.dim()))) /
        torch.linalg.vector_norm(fz, dim=tuple(range(1, z.dim()))),
        lambda z, fz: ((fz - z).reshape(len(z), -1).square().sum(1) /
                       fz.reshape(len(z), -1).square().sum(1)).sqrt(),
    ], [
        (lambda z, fz: (fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1), "not by ‖z‖"),
        (lambda z, fz: (fz - z).norm() / fz.norm(), "expected shape"),
        (lambda z, fz: (fz - z).norm(dim=-1) / fz.norm(dim=-1), "expected shape"),
        (lambda z, fz: (fz - z).flatten(1).norm(dim=1, keepdim=True) /
         fz.flatten(1).norm(dim=1, keepdim=True), r"expected shape \(5,\), got \(5, 1\)"),
        (lambda z, fz: (fz - z).flatten(1).square().sum(1) / fz.flatten(1).square().sum(1),
         "entries are off"),
        (lambda z, fz: ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).double(),
         W_),
        (lambda z, fz: torch.linalg.norm(fz - z, dim=(1, 2)) / torch.linalg.norm(fz, dim=(1, 2)),
         "raised|expected shape"),
    ]),
    "anderson_weights": (checks.check_anderson_weights, [
        anderson_weights,
        lambda G: (lambda y: y / y.sum())(torch.linalg.lstsq(G @ G.T, torch.ones(
            G.shape[0], 1, dtype=G.dtype)).solution[:, 0]),
        lambda G: torch.linalg.solve(torch.cat([torch.cat([2 * G @ G.T, torch.ones(
            G.shape[0], 1, dtype=G.dtype)], 1), torch.cat([torch.ones(1, G.shape[0], dtype=G.dtype),
            torch.zeros(1, 1, dtype=G.dtype)], 1)]), torch.cat([torch.zeros(G.shape[0], dtype=G.dtype),
            torch.ones(1, dtype=G.dtype)]))[:-1],                              # the KKT system
    ], [
        (lambda G: anderson_weights(G, normalize=False), "sum"),
        (lambda G: torch.full((G.shape[0],), 1.0 / G.shape[0], dtype=G.dtype), "entries are off"),
        (lambda G: (lambda y: y / y.norm())(anderson_weights(G, normalize=False)), "not ‖α‖ = 1"),
        (lambda G: (lambda y: y / y.abs().sum())(anderson_weights(G, normalize=False)),
         "entries are off"),
        (lambda G: anderson_weights(G, normalize=False).softmax(0), "entries are off"),
        (lambda G: (lambda y: y / y.sum())(torch.linalg.solve(G @ G.T, torch.ones(
            G.shape[0], dtype=torch.float64))), "dtype"),
        (lambda G: (lambda y: y / y.sum())(torch.linalg.solve(G @ G.T + torch.eye(
            G.shape[0], dtype=G.dtype), torch.ones(G.shape[0], dtype=G.dtype))), "entries are off"),
    ]),
    "adjoint_solve": (checks.check_adjoint_solve, [
        adjoint_solve,
        lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, start_zero=True),
        references.adjoint_solve,
    ], [
        (lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, False),
         "added at \\*every\\* step"),
        (lambda vjp, grad, tol, max_iter: grad, "entries are off"),
        (lambda vjp, grad, tol, max_iter: adjoint_solve(lambda g: vjp(g + grad) - grad, grad, tol,
                                                        max_iter), "entries are off"),
        (adjoint_solve_in_place, "changed its argument `grad` in place"),
        (lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, forever=True),
         "more than 100 times|Stop after max_iter"),
        (lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter, fixed=10),
         "entries are off"),
        (lambda vjp, grad, tol, max_iter: adjoint_solve(vjp, grad, tol, max_iter).float(), "dtype"),
    ]),
    "linear_deq_grad": (checks.check_linear_deq_grad, [
        lambda W, b, d: torch.linalg.solve(eye_like(W) - W.T, d.T).T,
        lambda W, b, d: d @ torch.linalg.inv(eye_like(W) - W),
        linear_deq_grad_by_autograd,
    ], [
        (lambda W, b, d: torch.linalg.solve(eye_like(W) - W, d.T).T, "transpose"),
        (lambda W, b, d: d, "entries are off"),
        (lambda W, b, d: torch.linalg.solve(eye_like(W) + W.T, d.T).T, "entries are off"),
        (lambda W, b, d: d @ torch.linalg.inv(eye_like(W) - W).T, "transpose"),
        (lambda W, b, d: torch.linalg.solve(eye_f64(W) - W.T, d.T).T, "dtype"),
        (lambda W, b, d: d + d @ W, "truncating the series"),              # two Neumann terms
        (lambda W, b, d: torch.linalg.solve(eye_like(W) - W.T, d.T).T.sum(0), "expected shape"),
    ]),
    "hutchinson": (checks.check_hutchinson, [hutchinson, hutchinson_jvp, hutchinson_batched], [
        (lambda f_z, z, p: hutchinson(f_z, z, p, create_graph=False), "no graph"),
        (lambda f_z, z, p: hutchinson(f_z, z, p, per_sample=False), "expected shape"),
        (lambda f_z, z, p: hutchinson(f_z, z, p, normalize=False), "divide by d"),
        (lambda f_z, z, p: hutchinson(f_z, z, p, average=False), "average over the probes"),
        (hutchinson_detached, "no .detach()"),
        (lambda f_z, z, p: hutchinson(f_z, z, p[:1]), "off by|entries are off"),   # one probe
        (hutchinson_by_numel, "entries are off"),
        (hutchinson_unsquared, "square"),
    ]),
    "power_method": (checks.check_power_method, [power_method, power_method_norm_ratio,
                                                 references.power_method], [
        (lambda mv, v, n: power_method(mv, v, n, signed=True), "negative"),
        (lambda mv, v, n: power_method(mv, v, 1), "called matvec"),
        (lambda mv, v, n: mv(v).norm() / v.norm(), "called matvec"),
        (power_method_in_place, "changed its argument `v0` in place"),
        (power_method_twice, "called matvec"),
        (lambda mv, v, n: v, "one number, got a tensor"),
        (lambda mv, v, n: power_method(mv, v, n).item() * 0 + 1.0, "returned 1"),
    ]),
    "fuse_two": (checks.check_fuse_two, [fuse_two, fuse_two_repeat, references.fuse_two], [
        (lambda *a: fuse_two(*a, scale_factor=True), "expected shape|raised"),
        (lambda *a: fuse_two(*a, mode="bilinear"), "mode='nearest'|entries are off"),
        (lambda *a: fuse_two(*a, residual=False), "keeps b0"),
        (lambda *a: fuse_two(*a)[::-1], "expected shape"),
        (fuse_two_in_place, "changed its argument `b0` in place"),
        (fuse_two_pool, "raised|expected shape"),
        (lambda b0, b1, down, up: (fuse_two(b0, b1, down, up)[0],), "list \\[f0, f1\\]"),
    ]),
    "state_numel": (checks.check_state_numel, [
        state_numel,
        lambda c, h, w: sum(ci * math.ceil(h / 2 ** i) * math.ceil(w / 2 ** i)
                            for i, ci in enumerate(c)),
        references.state_numel,
    ], [
        (lambda c, h, w: state_numel(c, h, w, round_up=False), "rounding up"),
        (lambda c, h, w: sum(c) * h * w, "expected"),
        (lambda c, h, w: state_numel([1] * len(c), h, w), "channels"),
        (lambda c, h, w: state_numel(c, h, h), "expected"),                 # height for width
        (lambda c, h, w: sum(ci * (h // 2 ** (i + 1) or 1) * (w // 2 ** (i + 1) or 1)
                             for i, ci in enumerate(c)), "expected"),    # halves branch 0 too
        (lambda c, h, w: [ci * h * w for ci in c], "should return a number"),
    ]),
    "project_l2_ball": (checks.check_project_l2_ball, [project_l2_ball, project_l2_ball_where,
                                                       references.project_l2_ball], [
        (lambda x, c, r: project_l2_ball(x, c, r, always_rescale=True), "inside the ball"),
        (lambda x, c, r: project_l2_ball(x, c, r, batch_norm=True), "per sample|alone"),
        (lambda x, c, r: project_l2_ball(x, c, r, row_norm=True), "one row of pixels|alone"),
        (lambda x, c, r: project_l2_ball(x, c, r, around_zero=True), "center"),
        (project_l2_ball_direction, "NaN"),
        (lambda x, c, r: x, "outside the ball"),
        (project_l2_ball_in_place, "changed its argument `x` in place"),
    ]),
    "augmented_map": (checks.check_augmented_map, [augmented_map, augmented_map_by_jacobians], [
        (lambda *a: augmented_map(*a, sign=+1), "descent"),
        (lambda *a: augmented_map(*a, transpose=False), "J_zᵀμ, not J_z μ"),
        (lambda *a: augmented_map(*a, adjoint_loss=False), "μ part"),
        (lambda *a: augmented_map(*a, projection=False), "projection"),
        (lambda *a: augmented_map(*a, loss_at_fz=True), "loss at z"),
        (lambda *a: augmented_map(*a, two_passes=True), "evaluated f 2 time"),
        (lambda f, loss, z, mu, x, alpha, project: (z,) + augmented_map(f, loss, z, mu, x, alpha,
                                                                       project)[1:], "z part"),
    ]),
    "pgd": (checks.check_pgd, [references.pgd, pgd_variant], [
        (lambda *a: pgd_variant(*a, sign=-1.0), "downhill"),
        (lambda *a: pgd_variant(*a, normalize="none"), "not skip it"),
        (lambda *a: pgd_variant(*a, normalize="batch"), "whole batch"),
        (lambda *a: pgd_variant(*a, order="box_ball"), "ball first"),
        (lambda m, x, y, eps, k, step: pgd_variant(m, x, y, eps, max(k - 1, 0), step), "pgd, PGD-1"),
        (lambda m, x, y, eps, k, step: references.pgd(m, x, y, eps, k, step).requires_grad_(),
         "detached"),
        (pgd_in_place, "changed its argument `images` in place"),
    ]),
    "neumann_adjoint": (checks.check_neumann_adjoint, [neumann_adjoint, neumann_adjoint_horner,
                                                       references.neumann_adjoint], [
        (lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, terms_offset=1), "k terms"),
        (lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, skip_first=True), "first term is grad"),
        (lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, vjp_of_sum=True), "previous \\*term\\*"),
        (lambda vjp, grad, k: neumann_adjoint(vjp, grad, k, terms_offset=-1), "k terms"),
        (neumann_adjoint_in_place, "changed its argument `grad` in place"),
        (neumann_adjoint_from_scratch, "vector–Jacobian products; k − 1 are enough"),
        (lambda vjp, grad, k: neumann_adjoint(vjp, grad, k).float(), "dtype"),
    ]),
}


def data_parallel_gradient(model, x, y, world, average=True, mean_loss=True, shards=None,
                           one_shard=False):
    """What DDP computes (and variations a student might write)."""
    params, total = list(model.parameters()), None
    parts = list(zip(x.tensor_split(shards or world), y.tensor_split(shards or world)))
    for x_r, y_r in parts[:1] if one_shard else parts:
        loss = F.cross_entropy(model(x_r), y_r, reduction="mean" if mean_loss else "sum")
        grads = torch.autograd.grad(loss, params)
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    return [t / world for t in total] if average else list(total)


def data_parallel_gradient_with_backward(model, x, y, world):
    """A correct alternative: .backward() accumulates into .grad; read and restore it."""
    saved = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for x_r, y_r in zip(x.tensor_split(world), y.tensor_split(world)):
        (F.cross_entropy(model(x_r), y_r) / world).backward()
    out = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    return out


def data_parallel_gradient_whole_batch(model, x, y, world):
    """The model run once on the whole batch, the loss split into shards: right without
    batch-coupled layers, wrong with BatchNorm (DDP normalizes each shard by itself)."""
    params, logits = list(model.parameters()), model(x)
    losses = [F.cross_entropy(l_r, y_r) for l_r, y_r in zip(logits.tensor_split(world),
                                                             y.tensor_split(world))]
    return list(torch.autograd.grad(sum(losses) / world, params))


def data_parallel_gradient_stepping(model, x, y, world):
    """Right gradients, but it also takes an SGD step: it changes the weights."""
    grads = data_parallel_gradient(model, x, y, world)
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 0.1 * g
    return grads



CASES |= {
    "data_parallel_gradient": (checks.check_data_parallel_gradient, [
        data_parallel_gradient, data_parallel_gradient_with_backward,
        references.data_parallel_gradient,
    ], [
        (lambda m, x, y, w: data_parallel_gradient(m, x, y, w, average=False), "too large"),
        (lambda m, x, y, w: data_parallel_gradient(m, x, y, w, mean_loss=False), "entries are off"),
        (lambda m, x, y, w: data_parallel_gradient(m, x, y, w, one_shard=True), "one shard's gradient only"),
        (data_parallel_gradient_whole_batch, "the model run once on x"),
        (data_parallel_gradient_stepping, "changed the parameters of `model`"),
        (lambda m, x, y, w: data_parallel_gradient(m, x, y, w)[:-1], "one gradient per parameter"),
        (data_parallel_gradient_leaves_grad, "changed the parameters' .grad"),
        (lambda m, x, y, w: [g.float() for g in data_parallel_gradient(m, x, y, w)], "dtype"),
    ]),
}

EXERCISES = sorted(name.removeprefix("check_") for name in dir(checks) if name.startswith("check_"))
def all_cases() -> dict:
    """This module's CASES and those of the per-notebook modules test_checks_nbNN.py."""
    cases = dict(CASES)
    for path in sorted(Path(__file__).parent.glob("test_checks_nb*.py")):
        module = importlib.import_module(path.stem)
        cases |= getattr(module, f"CASES_{path.stem[-2:]}")
    return cases


ALL = all_cases()
RIGHT = [(name, i) for name, (_, rights, _) in ALL.items() for i in range(len(rights))]
WRONG = [(name, i) for name, (_, _, wrongs) in ALL.items() for i in range(len(wrongs))]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # tiny problems: one thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, i", RIGHT, ids=[f"{n}-{i}" for n, i in RIGHT])
def test_a_correct_answer_passes_and_comes_back(name, i, capsys):
    check, rights, _ = ALL[name]
    right = rights[i]
    if right is getattr(references, name, None):
        check = check.__wrapped__               # the bare check accepts the reference itself
        assert check(right)
    else:
        assert check(right) is right            # the notebook keeps what the check hands back
        assert checks.VERDICTS[name] is True
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("name, i", WRONG, ids=[f"{n}-{i}" for n, i in WRONG])
def test_a_planted_mistake_is_rejected_with_a_message_that_names_it(name, i):
    check, _, wrongs = ALL[name]
    wrong, names_the_mistake = wrongs[i]
    with pytest.raises(CheckFailed) as info:
        check(wrong)
    message = str(info.value)
    assert not isinstance(info.value, checks.NotWrittenYet)
    assert re.search(names_the_mistake, message, re.S), message
    assert checks.VERDICTS[name] is False
    with pytest.raises(CheckFailed):
        checks.graded(name)


def test_every_exercise_has_six_planted_mistakes_and_two_correct_answers():
    assert set(ALL) == set(EXERCISES)
    short = {name: (len(rights), len(wrongs)) for name, (_, rights, wrongs) in ALL.items()
             if len(rights) < 2 or len(wrongs) < 6}
    assert short == {}


@pytest.mark.parametrize("name", EXERCISES)
def test_an_unfinished_exercise_gets_deqlites_reference_which_passes_its_own_check(name, capsys):
    """In a student notebook the exercise still raises NotImplementedError: the check says so
    and hands back the reference, so the rest of the notebook runs; the reference is right; the
    autograder's test gives no points."""
    def todo(*args, **kwargs):
        """The student version's body."""
        # YOUR CODE HERE
        raise NotImplementedError()

    check = getattr(checks, f"check_{name}")
    handed_back = check(todo)
    assert handed_back is getattr(references, name) is checks.reference(name)
    out = capsys.readouterr().out
    assert f"{name} is not written yet" in out and "reference implementation" in out
    with pytest.raises(CheckFailed, match="no points yet"):
        checks.graded(name)
    assert check.__wrapped__(handed_back) and "✓" in capsys.readouterr().out


def test_handing_the_reference_back_to_its_check_is_not_an_answer():
    with pytest.raises(CheckFailed, match="deqlite's reference implementation .* not your answer"):
        checks.check_anderson(references.anderson)


def test_not_implemented_after_the_students_code_ran_is_a_failure_not_not_written_yet():
    def half_done(W):
        torch.linalg.svdvals(W)
        raise NotImplementedError()

    with pytest.raises(CheckFailed, match="after 2 lines of your code ran") as info:
        checks.check_lipschitz_bound(half_done)
    assert not isinstance(info.value, checks.NotWrittenYet)


def test_the_first_failing_entry_is_shown_with_all_its_digits():
    expected = torch.tensor([1.0, -2.337791234567, 3.0], dtype=torch.float64)
    got = expected.clone()
    got[1] += 3e-6
    with pytest.raises(CheckFailed) as info:
        _harness._compare(got, expected, "x", "", rtol=1e-7, atol=0)
    message = str(info.value)
    assert "1 of 3 entries are off; the first at index (1,)" in message
    assert repr(expected[1].item()) in message and repr(got[1].item()) in message


def test_in_jupyter_a_failed_check_shows_its_feedback_not_a_traceback():
    with pytest.raises(CheckFailed) as info:
        checks.check_lipschitz_bound(lambda W: torch.linalg.matrix_norm(W))
    shown = info.value._render_traceback_()
    assert shown[0].startswith("\x1b[1;31m✗ lipschitz_bound on") and len(shown) <= 8
    assert not any("File " in line or "checks.py" in line for line in shown)
    assert any(line.strip().startswith("Hint:") for line in shown)


def test_an_unknown_exercise_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown exercise 'andersen'.*Did you mean 'anderson'"):
        checks.reference("andersen")
    with pytest.raises(ValueError, match="unknown exercise 'andersen'"):
        checks.graded("andersen")


def test_student_exception_is_reported_with_its_message():
    def buggy(*args):
        raise IndexError("index 9 is out of bounds")

    with pytest.raises(CheckFailed, match="IndexError: index 9"):
        checks.check_lipschitz_bound(buggy)
