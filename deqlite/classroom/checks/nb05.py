"""Checks for notebook 05's exercises (Jacobian regularization)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...cells import MLPCell
from ...jacobian import hutchinson_frobenius
from .. import references
from ._harness import (_call, CheckFailed, _compare, _Counted, DT, exercise, _fail, _numbered,
                       _passed, _tanh_problem, _which)


def _tanh_state(seed: int):
    """A tanh cell's f_z = f(z) with a graph to z (z requires grad), and its exact ‖J‖²_F / d."""
    W, U, b, x = _tanh_problem(seed, scale=1.2)
    injection = x @ U.T + b
    z = torch.randn(injection.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=DT)
    J = (1 - torch.tanh(z @ W.T + injection) ** 2)[:, :, None] * W       # diag(tanh') W per sample
    z = z.requires_grad_()
    return torch.tanh(z @ W.T + injection), z, J.square().sum((1, 2)) / W.shape[0]


@exercise
def check_hutchinson(fn: Callable) -> bool:
    """fn(f_z, z, probes) -> (batch,) estimate of ‖J‖²_F / d, kept differentiable."""
    f_z, z, exact = _tanh_state(0)
    d = z.shape[1]
    # probes √d·e_i (i = 1..d) have (1/d) Σ v vᵀ = I exactly: the estimate must be the exact value
    probes = (d ** 0.5) * torch.eye(d, dtype=DT)[:, None, :].expand(d, *z.shape).clone()
    got = _call(fn, "hutchinson", f_z, z, probes)
    _compare(got, exact, "hutchinson with the d probes √d·e_i (which make it exact)",
             "For each probe v compute vᵀJ = torch.autograd.grad(f_z, z, v, create_graph=True, "
             "retain_graph=True)[0], square and sum it per sample (over dim 1, not the batch), "
             "average over the probes, and divide by d = z.shape[1].", rtol=1e-8, atol=1e-10)
    if not got.requires_grad:
        raise CheckFailed("hutchinson: the value is right, but it carries no graph, so γ·(estimate) "
                          "in a loss would not train anything. Pass create_graph=True to autograd.grad.")
    # the gradient of the estimate, what Jacobian regularization trains with
    (grad_got,) = torch.autograd.grad(got.sum(), z, retain_graph=True, allow_unused=True)
    (grad_expected,) = torch.autograd.grad(references.hutchinson(f_z, z, probes).sum(), z)
    _compare(torch.zeros_like(z) if grad_got is None else grad_got, grad_expected, "the gradient of hutchinson's estimate with respect to z "
             "(basis probes)", "The estimate must stay a function of z all the way: no .detach(), "
             ".item() or torch.no_grad() between autograd.grad(..., create_graph=True) and the "
             "result.", rtol=1e-8, atol=1e-10)
    f_z, z, exact = _tanh_state(1)
    probes = torch.randn(4000, *z.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = _call(fn, "hutchinson", f_z, z, probes)
    if not (isinstance(got, torch.Tensor) and got.shape == exact.shape):
        raise _fail("hutchinson with 4000 Gaussian probes", f"expected a tensor of shape "
                    f"{tuple(exact.shape)}, got {type(got).__name__} "
                    f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}.")
    err = ((got.detach() - exact).abs() / exact).max().item()
    if err > 0.1:
        raise CheckFailed(f"hutchinson with 4000 Gaussian probes is off by {err:.0%} from the exact "
                          f"‖J‖²_F / d; an unbiased estimate is within a few percent.")
    return _passed("hutchinson", f"exact with basis probes; within {err:.1%} with 4000 random ones")


@exercise
def check_power_method(fn: Callable) -> bool:
    """fn(matvec, v0, n_iter) -> |λ_max| of a symmetric matrix by power iteration."""
    for seed, top in [(0, 2.0), (1, -2.0), (2, 0.9)]:
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=DT))
        rest = torch.tensor([1.2, -1.0, 0.7, 0.5, -0.3, 0.2, 0.1], dtype=DT) * (abs(top) / 2)
        eigs = torch.cat([torch.tensor([top], dtype=DT), rest])
        A = Q @ torch.diag(eigs) @ Q.T
        v0 = torch.randn(8, generator=g, dtype=DT)
        matvec = _Counted(lambda v: A @ v, "matvec", 1000, " with n_iter=300")
        got = _call(fn, "power_method", matvec, v0, 300, convert=_numbered("power_method"))
        if not 300 <= matvec.calls <= 302:
            raise _fail(f"power_method with n_iter=300 (λ = {top})", f"it called matvec "
                        f"{matvec.calls} times.", "One matrix–vector product per iteration, "
                        "n_iter iterations (and one more for the final estimate, if you need it).")
        if abs(got - abs(top)) > 1e-6 * abs(top):
            hint = ("It came out negative: the dominant eigenvalue here is negative, and the spectral "
                    "radius is its modulus |λ|." if got < 0 else
                    "Repeat v ← A v / ‖A v‖ n_iter times, then return |vᵀ A v| (v has norm 1).")
            raise CheckFailed(f"power_method on a symmetric 8×8 matrix with largest |λ| = {abs(top)} "
                              f"(λ = {top}) returned {got:.6g}. {hint}")
    return _passed("power_method", "finds |λ_max| of 3 symmetric matrices (one with λ_max < 0)")


def _variance_problems():
    """(what, J) for the variance check: non-symmetric Jacobians, one sample, float32, and a
    Jacobian with a large diagonal (where Gaussian and Rademacher probes differ most)."""
    g = torch.Generator().manual_seed(0)
    big_diagonal = torch.diag_embed(torch.tensor([[1.5, -1.0, 0.8, 1.2, 0.5, -0.7]] * 2, dtype=DT))
    big_diagonal = big_diagonal + 0.3 * torch.randn(2, 6, 6, generator=g, dtype=DT)
    return [("a batch of 3 random 5×5 Jacobians", 0.5 * torch.randn(3, 5, 5, generator=g, dtype=DT),
             [("gaussian", 1), ("rademacher", 1), ("gaussian", 4), ("rademacher", 3)]),
            ("one sample's 4×4 Jacobian", torch.randn(1, 4, 4, generator=g, dtype=DT),
             [("gaussian", 2), ("rademacher", 1)]),
            ("2 Jacobians with a large diagonal, float32", big_diagonal.float(),
             [("gaussian", 1), ("rademacher", 2)])]


def _sampled_variance(J: torch.Tensor, kind: str, n_probes: int, n_draws: int, seed: int):
    """The variance over n_draws of the M-probe Hutchinson estimate, per sample (a real run)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_draws, n_probes, *J.shape[:2])
    v = (torch.randn(shape, generator=g, dtype=J.dtype) if kind == "gaussian" else
         2 * torch.randint(0, 2, shape, generator=g).to(J.dtype) - 1)
    vJ = torch.einsum("nmbi,bij->nmbj", v, J)
    return (vJ.square().sum(-1).mean(1) / J.shape[-1]).var(0)


@exercise
def check_hutchinson_variance(fn: Callable) -> bool:
    """fn(J, kind, n_probes) -> (batch,) variance of the n_probes-probe Hutchinson estimate of
    ‖J‖²_F / d for "gaussian" or "rademacher" probes."""
    hint = ("With A = J Jᵀ one probe's estimate is vᵀAv / d; expand vᵀAv into the diagonal terms "
            "A_ii v_i² and the off-diagonal pairs 2 A_ij v_i v_j (i < j), which are uncorrelated, "
            "and add up their variances; then divide by d² and by M.")
    for what, J, settings in _variance_problems():
        d, f32 = J.shape[-1], J.dtype == torch.float32
        for kind, M in settings:
            expected = references.hutchinson_variance(J.double(), kind, M).to(J.dtype)
            got = _call(fn, "hutchinson_variance", J.clone(), kind, M)
            At = J.double().transpose(-2, -1) @ J.double()
            other = "rademacher" if kind == "gaussian" else "gaussian"
            wrong = {
                "That is the standard deviation; the exercise asks for the variance (its square).":
                    expected.double().sqrt(),
                "The diagonal terms are treated the wrong way round: for ±1 probes v_i² = 1 does "
                "not fluctuate, so the diagonal drops out of the Rademacher variance; for Gaussian "
                "probes Var(v_i²) = 2, so it stays in.": references.hutchinson_variance(J.double(), other, M),
                "Your A is JᵀJ, the matrix of ‖Jv‖²; the estimate is ‖vᵀJ‖² = vᵀ(J Jᵀ)v, so A = "
                "J Jᵀ (its diagonal holds the squared row norms of J).":
                    2 * (At.square().sum((-2, -1)) - (kind == "rademacher") *
                         At.diagonal(dim1=-2, dim2=-1).square().sum(-1)) / (d * d * M),
                "The factor 2 is missing: Var(v_i²) = 2 for a Gaussian entry, and each pair i < j "
                "appears twice in vᵀAv (A_ij = A_ji), so its variance is 4 A_ij².":
                    expected.double() / 2,
                "The estimate ‖vᵀJ‖² / d is divided by d, so its variance is divided by d², not "
                "by d.": expected.double() * d,
                "The estimate ‖vᵀJ‖² / d is divided by d, so its variance is divided by d².":
                    expected.double() * d * d,
                "The estimate averages M independent single-probe estimates: its variance is that "
                "of one divided by M (not M², not 1).": expected.double() * M,
                "The variance of a mean of M independent estimates is Var(one) / M, not / M².":
                    expected.double() / M,
            }
            if M == 1:              # ×M and /M are the right answer when M = 1
                wrong = {k: v for k, v in wrong.items() if "/ M" not in k and "divided by M" not in k}
            if kind == "gaussian":  # JᵀJ gives the same Gaussian variance: not a mistake to name here
                wrong = {k: v for k, v in wrong.items() if "JᵀJ" not in k}
            specific = _which(got, wrong, hint)
            if isinstance(got, torch.Tensor) and got.dim() == 0 and J.shape[0] > 1:
                specific = ("One variance per sample: reduce over the matrix dimensions (-2, -1) "
                            "only, never over the batch.")
            _compare(got, expected, f"hutchinson_variance on {what}, {kind} probes, "
                     f"n_probes={M}", specific, rtol=1e-4 if f32 else 1e-10,
                     atol=1e-7 if f32 else 1e-14)
    # a real run: the prediction against the variance of many sampled estimates
    J = _variance_problems()[0][1][:2, :4, :4].contiguous()
    worst = 0.0
    for kind, M in [("gaussian", 2), ("rademacher", 2)]:
        predicted = _call(fn, "hutchinson_variance", J.clone(), kind, M)
        sampled = _sampled_variance(J, kind, M, 40000, seed=1)
        err = ((predicted.detach() - sampled).abs() / sampled).max().item()
        if err > 0.1:
            raise _fail(f"hutchinson_variance against 40000 sampled {kind} estimates (M = {M})",
                        f"predicted {predicted.tolist()}, sampled {sampled.tolist()}.", hint)
        worst = max(worst, err)
    return _passed("hutchinson_variance", f"exact for Gaussian and Rademacher probes, M = 1 to 4, "
                   f"one sample, float32; within {worst:.1%} of the variance of 40000 sampled "
                   f"estimates")


class _CountedCell(MLPCell):
    """An MLPCell that counts its applications (the check's budget: one per jr_loss call)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, z, injection):
        self.calls += 1
        return super().forward(z, injection)


def _jr_problem(seed: int, *, batch: int, d_in: int, d: int, n_probes: int, gamma: float,
                graph: bool, dtype: torch.dtype = DT) -> dict[str, Any]:
    """A stem, a tanh cell and a head; z* a state that is not a fixed point (so that z*, f(z*)
    and 0 give different Jacobians): a detached leaf (as a solver returns it) or, with ``graph``,
    one application of the cell with a graph to the weights (as a DEQ's output is). The task loss
    is the head's cross-entropy at z*."""
    torch.manual_seed(seed)
    stem, cell, head = nn.Linear(5, d_in), _CountedCell(d_in, d, weight_scale=1.3), nn.Linear(d, 3)
    for module in (stem, cell, head):
        module.to(DT)
    g = torch.Generator().manual_seed(seed + 100)
    x, y = torch.randn(batch, 5, generator=g, dtype=DT), torch.randint(0, 3, (batch,), generator=g)
    z = 0.8 * torch.randn(batch, d, generator=g, dtype=DT)
    probes = torch.randn(n_probes, batch, d, generator=g, dtype=DT)
    for module in (stem, cell, head):
        module.to(dtype)
    x, z, probes = x.to(dtype), z.to(dtype), probes.to(dtype)
    injection = cell.inject(stem(x))
    z_star = cell(z, injection) if graph else z
    cell.calls = 0
    params = {f"{part}.{name}": p for part, module in (("stem", stem), ("cell", cell), ("head", head))
              for name, p in module.named_parameters()}
    return dict(cell=cell, z_star=z_star, injection=injection,
                task_loss=F.cross_entropy(head(z_star), y), gamma=gamma, probes=probes,
                params=params, batch=batch, d=d)


def _jr_variant(problem: dict, *, at: str = "z_star", hold: bool = True, detach_injection=False,
                reduce: str = "mean", detach_penalty=False, task: str = "yes", weight=True,
                extra_d=False, first_probe=False) -> torch.Tensor:
    """The total loss, right or with one known mistake (for the hints)."""
    cell, z_star, injection = problem["cell"], problem["z_star"], problem["injection"]
    if at == "zeros":
        z_star = torch.zeros_like(z_star)
    elif at == "f":
        z_star = cell(z_star.detach(), injection)
    z = z_star.detach().requires_grad_() if hold or not z_star.requires_grad else z_star
    f_z = cell(z, injection.detach() if detach_injection else injection)
    probes = problem["probes"][:1] if first_probe else problem["probes"]
    est = hutchinson_frobenius(f_z, z, probes=probes, create_graph=True)
    penalty = (est.sum() if reduce == "sum" else est.mean()) / (problem["d"] if extra_d else 1)
    penalty = penalty.detach() if detach_penalty else penalty
    task_loss = {"yes": problem["task_loss"], "no": 0,
                 "detached": problem["task_loss"].detach()}[task]
    return task_loss + (problem["gamma"] if weight else 1) * penalty


def _gradients(total: torch.Tensor, params: dict) -> torch.Tensor:
    """The gradient of total with respect to every parameter, concatenated (0 where unused)."""
    names = list(params)
    if not total.requires_grad:
        return torch.cat([torch.zeros_like(params[n]).flatten() for n in names])
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    return torch.cat([(torch.zeros_like(params[n]) if g is None else g).flatten()
                      for n, g in zip(names, grads)])


def _split(flat: torch.Tensor, params: dict):
    out, i = {}, 0
    for name, p in params.items():
        out[name], i = flat[i:i + p.numel()].reshape(p.shape), i + p.numel()
    return out


def _compare_or_explain(got, expected, what, hint, wrong: Callable[[], dict], **tol) -> None:
    """_compare, with the hint chosen among the known wrong answers (computed only on failure)."""
    try:
        _compare(got, expected, what, hint, **tol)
    except CheckFailed:
        _compare(got, expected, what, _which(got, wrong(), hint), **tol)


_JR_FAMILIES = [
    ("a batch of 4, z* a detached leaf, M = 3 probes, γ = 2", 0,
     dict(batch=4, d_in=3, d=6, n_probes=3, gamma=2.0, graph=False)),
    ("one sample, z* with a graph to the weights (as a DEQ returns it), M = 2, γ = 0.5", 1,
     dict(batch=1, d_in=2, d=5, n_probes=2, gamma=0.5, graph=True)),
    ("a batch of 5, z* with a graph, γ = 0 (the plain task loss)", 2,
     dict(batch=5, d_in=3, d=4, n_probes=1, gamma=0.0, graph=True)),
    ("a batch of 3 in float32, z* with a graph, M = 2, γ = 1.5", 3,
     dict(batch=3, d_in=3, d=6, n_probes=2, gamma=1.5, graph=True, dtype=torch.float32)),
]


@exercise
def check_jr_loss(fn: Callable) -> bool:
    """fn(cell, z_star, injection, task_loss, gamma, probes) -> the scalar loss
    task_loss + γ · (batch mean of the Hutchinson estimate of ‖J_f(z*)‖²_F / d), z* held fixed,
    with one application of the cell."""
    hint = ("Return task_loss + γ · (the batch mean of hutchinson(f_z, z, probes)), where z is a "
            "fresh leaf copy of z_star that requires grad and f_z = cell(z, injection).")
    for what, seed, options in _JR_FAMILIES:
        f32 = options.get("dtype") == torch.float32
        tol = dict(rtol=1e-5, atol=1e-6) if f32 else dict(rtol=1e-10, atol=1e-12)
        what = f"jr_loss on {what}"
        p = _jr_problem(seed, **options)
        leaf = not p["z_star"].requires_grad
        try:
            got = _call(fn, "jr_loss", p["cell"], p["z_star"], p["injection"], p["task_loss"],
                        p["gamma"], p["probes"])
        except CheckFailed as e:
            if "does not require grad" not in str(e) or type(e) is not CheckFailed:
                raise
            raise CheckFailed(f"{e}\nHint: hutchinson differentiates f_z with respect to z, so z "
                              f"must require grad: make a fresh leaf copy of z_star, z = "
                              f"z_star.detach().requires_grad_(), and compute f_z = "
                              f"cell(z, injection) from it.") from None
        if leaf and p["z_star"].requires_grad:
            raise CheckFailed(f"{what}: jr_loss turned on requires_grad of the caller's z_star "
                              f"(z_star.requires_grad_()), a change to a tensor that is not yours. "
                              f"Make a fresh leaf copy instead: z = z_star.detach().requires_grad_().")
        if any(q.grad is not None for q in p["params"].values()):
            raise CheckFailed(f"{what}: jr_loss filled the parameters' .grad (it called "
                              f".backward()). Return the loss only: the training step calls "
                              f"optimizer.zero_grad(), loss.backward() once, then optimizer.step().")
        if isinstance(got, torch.Tensor) and got.dim() > 0:
            raise _fail(what, f"expected one number (a 0-d tensor), got shape {tuple(got.shape)}.",
                        "The loss is one number: average the per-sample estimates over the batch "
                        "(.mean()), as the task loss (a mean cross-entropy) is averaged.")
        values = {
            "The JR term is summed over the batch: average it (.mean()), as the task loss is "
            "averaged, so that γ does not depend on the batch size.": dict(reduce="sum"),
            "That is the estimate at z = 0: take the Jacobian at the z_star you were given.":
                dict(at="zeros"),
            "That is the Jacobian at f(z*): apply the cell once, at a leaf copy of z_star itself, "
            "and differentiate that f_z with respect to that copy.": dict(at="f"),
            "hutchinson already divides by d: do not divide the estimate by d again.":
                dict(extra_d=True),
            "Only the first probe was used: pass all M probes to hutchinson (it averages them).":
                dict(first_probe=True),
            "The task loss is missing: return task_loss + γ · penalty.": dict(task="no"),
            "The penalty must be weighted by γ: task_loss + γ · penalty.": dict(weight=False),
        }
        q = _jr_problem(seed, **options)
        expected = _jr_variant(q)
        _compare_or_explain(got, expected.detach(), f"{what}: the loss", hint, lambda: {
            h: _jr_variant(_jr_problem(seed, **options), **v).detach() for h, v in values.items()},
            **tol)
        # the gradient with respect to every parameter: stem, cell and head
        expected_grad = _gradients(expected, q["params"])
        grads = {
            "The gradient is the task loss's alone: the JR term carries no gradient. Keep "
            "hutchinson's estimate in the graph (no .detach(), .item() or torch.no_grad()) so that "
            "γ · ‖J‖²_F / d trains the cell.": dict(detach_penalty=True),
            "The JR term's gradient also flowed back through z* into what computed it. Hold z* "
            "fixed: differentiate at a fresh leaf copy, z = z_star.detach().requires_grad_() (not "
            "z_star itself, not z_star.clone()), so that the penalty reaches the weights only "
            "through the one application cell(z, injection).": dict(hold=False),
            "The JR term's gradient must also reach the injection's parameters (U, b and the "
            "layers before it): pass the injection as given, not injection.detach().":
                dict(detach_injection=True),
            "The task loss's gradient is missing (with γ = 0 the gradient must be exactly the task "
            "loss's): add the task_loss tensor itself, not task_loss.item() or .detach().":
                dict(task="detached"),
        }

        def wrong_grads():
            out = {}
            for h, v in grads.items():
                q = _jr_problem(seed, **options)
                out[h] = _gradients(_jr_variant(q, **v), q["params"])
            return out

        if not got.requires_grad:
            raise _fail(f"{what}: the gradient", "the loss carries no graph: backward() would "
                        "train nothing.", "Add the task_loss tensor itself and keep the JR term "
                        "in the graph (no .item(), .detach(), torch.no_grad()).")
        got_grad = _gradients(got, p["params"])
        grad_tol = dict(rtol=1e-4, atol=1e-6) if f32 else dict(rtol=1e-9, atol=1e-12)
        if not torch.allclose(got_grad.to(expected_grad.dtype), expected_grad, **grad_tol):
            specific = _which(got_grad, wrong_grads(), hint)
            for (name, g_got), g_exp in zip(_split(got_grad, p["params"]).items(),
                                             _split(expected_grad, p["params"]).values()):
                _compare(g_got, g_exp, f"{what}: the gradient with respect to {name}", specific,
                         **grad_tol)
        if p["cell"].calls > 1:
            raise _fail(what, f"the value and the gradient are right, but jr_loss applied the cell "
                        f"{p['cell'].calls} times for {options['n_probes']} probe(s).",
                        "One application f_z = cell(z, injection) at z* serves every probe: "
                        "hutchinson takes them all at once through that one graph (retain_graph).")
    return _passed("jr_loss", "the loss and its gradient for the stem, the cell and the head, with "
                   "z* held fixed, batches of 1 to 5, γ = 0, float32; one application of the cell")
