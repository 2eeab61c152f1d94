"""Checks for notebook 08's exercises (joint inference and input optimization)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...models import DEQClassifier
from ...projections import Box, L2Ball
from ._harness import (DT, CheckFailed, _call, _compare, _passed, _which, exercise,
                       _tanh_problem)


@exercise
def check_project_l2_ball(fn: Callable) -> bool:
    """fn(x, center, radius) -> the projection of each sample of x onto the ball
    ‖x − center‖₂ ≤ radius (norms over all of a sample's entries), as ``deqlite.projections.L2Ball``."""
    g = torch.Generator().manual_seed(0)
    cases = []
    # vectors: one sample at the center itself, two inside (one just inside), two outside
    center = torch.randn(5, 6, generator=g, dtype=DT)
    direction = torch.randn(5, 6, generator=g, dtype=DT)
    direction /= direction.norm(dim=1, keepdim=True)
    norms = torch.tensor([0.0, 0.3, 0.99, 1.5, 4.0], dtype=DT)
    cases.append(("a batch of 5 vectors, radius 1", center + norms[:, None] * direction, center,
                  1.0, norms))
    # images: each sample's norm over all its pixels (a per-row norm would be wrong)
    center = torch.rand(3, 1, 4, 4, generator=g, dtype=DT)
    direction = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    direction /= direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    norms = torch.tensor([0.5, 3.0, 10.0], dtype=DT)
    cases.append(("a batch of 3 images (3, 1, 4, 4), radius 2", center +
                  norms.reshape(-1, 1, 1, 1) * direction, center, 2.0, norms))
    for what, x, center, radius, norms in cases:
        expected = L2Ball(radius, center=center)(x)
        got = _call(fn, "project_l2_ball", x.clone(), center.clone(), radius)
        if isinstance(got, torch.Tensor) and got.shape == x.shape:
            diff = (got.detach().to(DT) - expected).flatten(1).abs().amax(dim=1)
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
            if bool((diff > 1e-9).any()):
                i = int(diff.argmax())
                where = ("exactly at the center" if norms[i] == 0 else
                         f"inside the ball (‖x − center‖ = {norms[i]:g} ≤ {radius:g})"
                         if norms[i] <= radius else
                         f"outside the ball (‖x − center‖ = {norms[i]:g} > {radius:g})")
                if norms[i] == 0:
                    hint = ("At the center ‖x − center‖ = 0: dividing by it gives NaN. The point is "
                            "inside, so return it unchanged, e.g. with min(1, r / norm.clamp_min(1e-12)).")
                elif norms[i] <= radius:
                    hint = ("A point already in the ball is its own projection: scale x − center by "
                            "min(1, r / ‖x − center‖), not always by r / ‖x − center‖, with the "
                            "norm of that sample alone (x.flatten(1), dim=1), not of the whole batch.")
                else:
                    hint = ("Move x to center + r · (x − center) / ‖x − center‖, with the norm taken "
                            "per sample over *all* its entries (x.flatten(1), then dim=1) — not over "
                            "the whole batch or one row of pixels — and around the given center, "
                            "not around 0.")
                raise CheckFailed(f"project_l2_ball on {what}: sample {i}, {where}, is wrong "
                                  f"(expected {_show(expected[i])}, got {_show(got[i])}). {hint}")
        _compare(got, expected, f"project_l2_ball on {what}", "Return a tensor shaped like x.",
                 rtol=1e-9, atol=1e-10)
    return _passed("project_l2_ball", "inside points stay, outside ones land on the sphere, "
                   "per sample, vectors and images, the center itself included")


def _show(t: torch.Tensor) -> str:
    values = t.detach().flatten()[:3].tolist()
    return "[" + ", ".join(f"{v:.4g}" for v in values) + (", …]" if t.numel() > 3 else "]")


class _CountedMap:
    """f(z, x) = tanh(z Wᵀ + x Uᵀ + b) that counts its evaluations and the reverse passes
    through its output."""

    def __init__(self, W, U, b):
        self.W, self.U, self.b = W, U, b
        self.evaluations = self.vjps = 0

    def __call__(self, z, x):
        self.evaluations += 1
        out = torch.tanh(z @ self.W.T + x @ self.U.T + self.b)
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.vjps += 1


@exercise
def check_augmented_map(fn: Callable) -> bool:
    """fn(f, loss, z, mu, x, alpha, project) -> JIIO's augmented map
    (f(z, x), J_zᵀμ + ∇_zℓ(z, x), project(x − α (J_xᵀμ + ∇_xℓ(z, x)))), with one evaluation of f
    and one reverse pass through it."""
    W, U, b, x = _tanh_problem(3, batch=4, d_in=3, d=6, scale=0.8)   # W not symmetric
    g = torch.Generator().manual_seed(4)
    z = torch.tanh(torch.randn(4, 6, generator=g, dtype=DT))
    mu = torch.randn(4, 6, generator=g, dtype=DT)
    A, target = torch.randn(2, 6, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)

    def loss(z, x):
        return ((z @ A.T - target) ** 2).sum(1) + 0.5 * (x ** 2).sum(1)

    fz = torch.tanh(z @ W.T + x @ U.T + b)
    s = 1 - fz ** 2                                           # J_z = diag(s) W, J_x = diag(s) U
    adjoint = (s * mu) @ W + 2 * (z @ A.T - target) @ A       # J_zᵀμ + ∇_zℓ
    grad_x = (s * mu) @ U + x                                 # J_xᵀμ + ∇_xℓ
    alpha = 0.3
    for what, project in (("no constraint (project = identity)", lambda v: v),
                          ("the ball ‖x‖ ≤ 0.5 (project = L2Ball(0.5))", L2Ball(0.5))):
        f = _CountedMap(W, U, b)
        got = _call(fn, "augmented_map", f, loss, z.clone(), mu.clone(), x.clone(), alpha, project)
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            raise CheckFailed(f"augmented_map should return three tensors (z_next, mu_next, x_next), "
                              f"got {type(got).__name__}.")
        z_next, mu_next, x_next = got
        _compare(z_next, fz, f"augmented_map's z part, {what}",
                 "The new z is f(z, x): one application of the cell at the current (z, x).",
                 rtol=1e-9, atol=1e-12)
        _compare(mu_next, adjoint, f"augmented_map's μ part, {what}",
                 "The new μ is J_zᵀμ + ∇_zℓ: the gradient with respect to z of "
                 "(f(z, x) · μ).sum() + loss(z, x).sum() — the loss at z (not at f(z, x)), and μ "
                 "as the weight of f's output (a vector–Jacobian product, J_zᵀμ, not J_z μ).",
                 rtol=1e-9, atol=1e-12)
        _compare(x_next, project(x - alpha * grad_x), f"augmented_map's x part, {what}",
                 "The new x is project(x − α (J_xᵀμ + ∇_xℓ)): a gradient *descent* step (minus) "
                 "on the Lagrangian, with the gradient with respect to x from the same backward "
                 "pass, then the projection, which keeps x feasible.", rtol=1e-9, atol=1e-12)
        if f.evaluations != 1 or f.vjps != 1:
            raise CheckFailed(
                f"augmented_map gives the right values, but it evaluated f {f.evaluations} time(s) "
                f"and made {f.vjps} reverse pass(es) through it; JIIO's saving is one of each per "
                f"iteration. Evaluate fz = f(z, x) once and take both gradients with one call: "
                f"torch.autograd.grad((fz * mu).sum() + loss(z, x).sum(), (z, x)).")
    return _passed("augmented_map", "the three parts of T(z, μ, x), with and without a projection, "
                   "for one f evaluation and one vector–Jacobian product")


def _pgd_variant(model, images, labels, eps, k, step, *, sign=1.0, normalize="sample",
                 order="ball_box"):
    """PGD with one plausible mistake: descent (sign −1), no or batch-wide normalization, or the
    box before the ball. The right one is sign 1, per-sample norm, ball then box."""
    ball, box = L2Ball(eps, center=images), Box(0.0, 1.0)
    project = (lambda v: box(ball(v))) if order == "ball_box" else (lambda v: ball(box(v)))
    x = images.clone()
    for _ in range(k):
        x.requires_grad_(True)
        loss = F.cross_entropy(model.head(model.deq(model.stem(x))), labels, reduction="sum")
        g, = torch.autograd.grad(loss, x)
        if normalize == "sample":
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
        elif normalize == "batch":
            g = g / g.norm()
        x = project(x.detach() + sign * step * g)
    return x.detach()


@exercise
def check_pgd(fn: Callable) -> bool:
    """fn(model, images, labels, eps, k, step) -> the last iterate of PGD-k: k normalized ascent
    steps on the cross-entropy, each projected onto the ball ‖x − images‖₂ ≤ eps, then the box."""
    torch.manual_seed(0)
    solve = dict(solver="anderson", tol=1e-11, max_iter=200, backward_tol=1e-11,
                 backward_max_iter=200, on_fail="ignore")
    model = DEQClassifier(image_size=8, channels=2, hidden=12, deq=solve).double().eval()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 1, 8, 8, generator=g, dtype=DT)
    images[0] = 1.0                                     # a white digit: the box binds
    labels = torch.randint(0, 10, (6,), generator=g)
    for eps, k, step in ((0.5, 1, 0.25), (0.5, 3, 0.4)):   # the ball binds in the second
        what = f"PGD-{k} with eps = {eps}, step = {step}"
        got = _call(fn, "pgd", model, images.clone(), labels.clone(), eps, k, step)
        if not isinstance(got, torch.Tensor) or got.shape != images.shape:
            raise CheckFailed(f"pgd should return the images' tensor of shape "
                              f"{tuple(images.shape)}, got {type(got).__name__}"
                              f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}.")
        if got.requires_grad:
            raise CheckFailed("pgd should return x detached (x.detach()): an adversarial example "
                              "is an input, not part of a graph.")
        expected = _pgd_variant(model, images, labels, eps, k, step)
        hint = _which(got, {
            "Your steps go downhill: the attack *maximizes* the cross-entropy, so x moves along "
            "+g/‖g‖.": _pgd_variant(model, images, labels, eps, k, step, sign=-1.0),
            "Divide g by each sample's own norm (g.flatten(1).norm(dim=1)), not skip it: PGD's "
            "step has length `step` whatever the size of the gradient.":
                _pgd_variant(model, images, labels, eps, k, step, normalize="none"),
            "The norm is per sample (g.flatten(1).norm(dim=1), reshaped to broadcast), not of the "
            "whole batch: each digit takes a step of length `step`.":
                _pgd_variant(model, images, labels, eps, k, step, normalize="batch"),
            "Project onto the ball first, then clip to the box: box(ball(x)). Clipping after the "
            "ball moves pixels towards the clean ones and stays in the ball; the other order can "
            "leave the box.": _pgd_variant(model, images, labels, eps, k, step, order="box_ball"),
        }, "Each step: g = ∇ₓ CE(head(deq(stem(x))), y) summed over the batch, x ← box(ball(x + "
           "step · g/‖g‖)) with the norm per sample and the ball around the clean images; return "
           "the last x.")
        _compare(got, expected, f"pgd, {what}", hint, rtol=1e-6, atol=1e-8)
    return _passed("pgd", "normalized ascent steps, projected onto the ball and the box, one and "
                   "three steps")
