"""Checks for the notebooks' exercises: run the student's function on a few inputs, compare it
with deqlite's reference, and say what is wrong in words a student can act on.

A notebook calls a check on the student's function and keeps what it returns:

    weight_tied_forward = checks.check_weight_tied_forward(weight_tied_forward)

* right: a one-line confirmation (✓), and the student's function comes back;
* not written yet (its body still raises ``NotImplementedError``, as in the generated student
  notebooks): the check says so and hands back deqlite's reference implementation
  (``deqlite.classroom.references``), so the rest of the notebook still runs;
* wrong: ``CheckFailed``, naming the failing input, what was expected, what came back, and a
  hint about the usual mistake.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import lookup
from ..models import DEQClassifier
from ..projections import L2Ball
from ..solvers import forward_iteration
from . import references

DT = torch.float64


class CheckFailed(AssertionError):
    """The student's answer is not right yet; the message says why and what to look at."""


class NotWrittenYet(CheckFailed):
    """The student's function still raises NotImplementedError."""


def _call(fn: Callable, name: str, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotWrittenYet(f"{name} is not written yet: replace `raise NotImplementedError()` with "
                            f"your code, run that cell again, then this check.") from None
    except CheckFailed:
        raise
    except Exception as e:  # the student's own bug: show it, plus where it happened
        raise CheckFailed(f"{name} raised {type(e).__name__}: {e}") from e


def _compare(got: Any, expected: torch.Tensor, what: str, hint: str, *, rtol: float = 1e-6,
             atol: float = 1e-8) -> None:
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}. {hint}")
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. "
                          f"{hint}")
    got = got.detach().to(expected.dtype)
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        err = (got - expected).abs().max().item()
        i = (got - expected).abs().flatten().argmax().item()
        raise CheckFailed(f"{what}: values differ (largest error {err:.2e} at flat index {i}: "
                          f"expected {expected.flatten()[i].item():.6g}, got {got.flatten()[i].item():.6g}). "
                          f"{hint}")


def _passed(name: str, detail: str) -> bool:
    print(f"✓ {name}: {detail}")
    return True


def exercise(check: Callable) -> Callable:
    """Turn ``check_<name>(fn)`` into what the notebooks call: it returns fn when fn is right,
    deqlite's ``references.<name>`` (with a notice) when fn is not written yet, and raises
    ``CheckFailed`` when fn is wrong. The reference is at ``check_<name>.reference``."""
    name = check.__name__.removeprefix("check_")
    reference = getattr(references, name)

    @functools.wraps(check)
    def run(fn: Callable) -> Callable:
        VERDICTS[name] = False
        try:
            check(fn)
        except NotWrittenYet as e:
            print(f"… {e}\n  Until then, the rest of this notebook uses deqlite's reference "
                  f"implementation (deqlite.classroom.references.{name}).")
            return reference
        VERDICTS[name] = True
        return fn

    run.reference = reference
    return run


VERDICTS: dict[str, bool] = {}
"""Exercise name → whether the student's own function passed its check last time it was run."""


def graded(name: str) -> None:
    """The autograder's test for exercise ``name`` (a hidden test in the nbgrader cell after the
    check): passes only if the student's *own* function passed the check, not when the check handed
    back deqlite's reference because the exercise was not written yet."""
    lookup(_exercise_names(), name, "exercise")
    if not VERDICTS.get(name):
        raise CheckFailed(f"{name}: no points yet: the exercise is not written, or its check did "
                          f"not pass (run the check cell above to see why).")


def _exercise_names() -> list[str]:
    return [n.removeprefix("check_") for n, v in globals().items()
            if n.startswith("check_") and hasattr(v, "reference")]


def reference(name: str) -> Callable:
    """deqlite's reference implementation of the exercise ``name`` (e.g. "anderson")."""
    return lookup({n: getattr(references, n) for n in _exercise_names()}, name, "exercise")


def _tanh_problem(seed: int, batch: int = 4, d_in: int = 3, d: int = 6, scale: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W *= scale / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(d, d_in, generator=g, dtype=DT)
    b = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(batch, d_in, generator=g, dtype=DT)
    return W, U, b, x


# ---------------------------------------------------------------- notebook 01

@exercise
def check_weight_tied_forward(fn: Callable) -> bool:
    """fn(W, U, b, x, n_layers) -> z after n_layers of z ← tanh(z Wᵀ + x Uᵀ + b), from z = 0."""
    for seed, n in [(0, 1), (1, 5), (2, 30)]:
        W, U, b, x = _tanh_problem(seed)
        z = torch.zeros(x.shape[0], W.shape[0], dtype=DT)
        for _ in range(n):
            z = torch.tanh(z @ W.T + x @ U.T + b)
        got = _call(fn, "weight_tied_forward", W, U, b, x, n)
        _compare(got, z, f"weight_tied_forward with n_layers={n} (seed {seed})",
                 "Start from z = 0 of shape (batch, hidden); use the *same* W, U, b in every layer "
                 "and add the input injection x Uᵀ + b at every layer, not only the first.")
    return _passed("weight_tied_forward", "matches the weight-tied network for 1, 5 and 30 layers")


@exercise
def check_lipschitz_bound(fn: Callable) -> bool:
    """fn(W) -> the Lipschitz constant bound ‖W‖₂ of z ↦ tanh(W z + u)."""
    for seed in range(3):
        W = torch.randn(7, 7, generator=torch.Generator().manual_seed(seed), dtype=DT)
        expected = torch.linalg.matrix_norm(W, ord=2)
        got = _call(fn, "lipschitz_bound", W)
        got = torch.as_tensor(got, dtype=DT)
        _compare(got.reshape(()), expected, f"lipschitz_bound (seed {seed})",
                 "tanh' ≤ 1, so the bound is the largest singular value of W (the spectral norm), "
                 "not the Frobenius norm and not the largest |eigenvalue|.")
    return _passed("lipschitz_bound", "equals the spectral norm ‖W‖₂ on 3 random matrices")


@exercise
def check_linear_fixed_point(fn: Callable) -> bool:
    """fn(W, b) -> z* of z = z Wᵀ + b for a batch b of shape (batch, d)."""
    for seed in range(3):
        W, _, _, x = _tanh_problem(seed, d_in=6)
        b = x
        expected = torch.linalg.solve(torch.eye(6, dtype=DT) - W, b.T).T
        got = _call(fn, "linear_fixed_point", W, b)
        _compare(got, expected, f"linear_fixed_point (seed {seed})",
                 "z = W z + b  ⇔  (I − W) z = b; solve that system (torch.linalg.solve) for every "
                 "row of b — mind the transposes for a batch of row vectors.")
    return _passed("linear_fixed_point", "(I − W)⁻¹ b on 3 random problems")


# ---------------------------------------------------------------- notebook 02

def _reference_fixed_point(W, U, b, x):
    f = lambda z: torch.tanh(z @ W.T + x @ U.T + b)  # noqa: E731
    z, _ = forward_iteration(f, torch.zeros(x.shape[0], W.shape[0], dtype=DT), tol=1e-13,
                             max_iter=2000)
    return f, z


def _check_solver(fn: Callable, name: str, hint: str, **kwargs) -> int:
    """The student's solver must return (z, residuals) with z the fixed point; returns its steps."""
    steps = 0
    for seed in range(2):
        W, U, b, x = _tanh_problem(seed, scale=0.9)
        f, z_star = _reference_fixed_point(W, U, b, x)
        out = _call(fn, name, f, torch.zeros_like(z_star), tol=1e-10, max_iter=500, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"{name} should return a pair (z, residuals), got {type(out).__name__}.")
        z, residuals = out
        _compare(z, z_star, f"{name}'s fixed point (seed {seed})", hint, rtol=1e-7, atol=1e-8)
        if len(residuals) < 2 or not float(residuals[-1]) < float(residuals[0]):
            raise CheckFailed(f"{name}: `residuals` should list one residual per iteration, "
                              f"decreasing overall; got {list(map(float, residuals))[:5]}...")
        steps = max(steps, len(residuals))
    return steps


@exercise
def check_forward_iteration(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter) -> (z, residuals) with plain forward iteration."""
    steps = _check_solver(fn, "forward_iteration", "Iterate z ← f(z) and stop when the relative "
                          "residual ‖f(z) − z‖ / ‖f(z)‖ is below tol (or after max_iter steps).")
    return _passed("forward_iteration", f"reaches the fixed point (≤ {steps} iterations)")


@exercise
def check_anderson(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter, m) -> (z, residuals) with Anderson acceleration."""
    hint = ("Keep the last m pairs (x_i, f(x_i)); solve for weights α with Σα = 1 minimising "
            "‖Σ α_i (f(x_i) − x_i)‖, then step to Σ α_i f(x_i). Check the history window drops the "
            "oldest pair once it holds m.")
    steps = _check_solver(fn, "anderson", hint, m=5)
    W, U, b, x = _tanh_problem(0, scale=0.9)
    f, z_star = _reference_fixed_point(W, U, b, x)
    _, plain = _call(fn, "anderson", f, torch.zeros_like(z_star), tol=1e-10, max_iter=500, m=1)
    if steps >= len(plain):
        raise CheckFailed(f"anderson with m=5 took {steps} iterations, no fewer than with m=1 "
                          f"({len(plain)}): the history is not being used. {hint}")
    # Step by step against the reference: the same iterates, so the same residuals, for a small
    # window (where keeping one pair too many or too few shows at once).
    _, expected = references.anderson(f, torch.zeros_like(z_star), tol=1e-10, max_iter=12, m=2)
    _, got = _call(fn, "anderson", f, torch.zeros_like(z_star), tol=1e-10, max_iter=12, m=2)
    got = [float(r) for r in got][:len(expected)]
    for i, (r_got, r_ref) in enumerate(zip(got, expected)):
        if not abs(r_got - r_ref) <= 1e-4 * r_ref:
            raise CheckFailed(f"anderson with m=2: residual {i} is {r_got:.6e}, the reference's is "
                              f"{r_ref:.6e} (the first {i} agree). The history must hold exactly the "
                              f"last m pairs (drop the oldest once it holds m: not m + 1, not m − 1), "
                              f"and the new iterate is Σ α_i f(x_i), not Σ α_i x_i. {hint}")
    return _passed("anderson", f"reaches the fixed point in ≤ {steps} iterations (m=1: {len(plain)})")


@exercise
def check_relative_residual(fn: Callable) -> bool:
    """fn(z, fz) -> per-sample ‖f(z) − z‖ / ‖f(z)‖, shape (batch,)."""
    g = torch.Generator().manual_seed(0)
    z, fz = torch.randn(5, 3, 4, generator=g, dtype=DT), torch.randn(5, 3, 4, generator=g, dtype=DT)
    expected = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
    got = _call(fn, "relative_residual", z, fz)
    _compare(got, expected, "relative_residual on a batch of shape (5, 3, 4)",
             "One number per sample: flatten everything but the batch dimension (z.flatten(1)), "
             "take norms along dim=1, and divide by ‖f(z)‖, not by ‖z‖.")
    return _passed("relative_residual", "one correct value per sample")


@exercise
def check_anderson_weights(fn: Callable) -> bool:
    """fn(G) -> α (n,) minimising ‖αᵀ G‖ subject to Σα = 1, for G of shape (n, D)."""
    for seed, n in [(0, 2), (1, 4)]:
        G = torch.randn(n, 10, generator=torch.Generator().manual_seed(seed), dtype=DT)
        y = torch.linalg.solve(G @ G.T, torch.ones(n, dtype=DT))
        expected = y / y.sum()
        got = _call(fn, "anderson_weights", G)
        _compare(got, expected, f"anderson_weights for n={n} (seed {seed})",
                 "With H = G Gᵀ, the constrained minimiser is α = H⁻¹1 / (1ᵀ H⁻¹ 1); "
                 "the weights must sum to one.", rtol=1e-6, atol=1e-9)
    return _passed("anderson_weights", "the constrained least-squares weights, summing to 1")


# ---------------------------------------------------------------- notebook 03

@exercise
def check_adjoint_solve(fn: Callable) -> bool:
    """fn(vjp, grad, tol, max_iter) -> g solving g = Jᵀ g + grad, where vjp(y) = Jᵀ y."""
    g_ = torch.Generator().manual_seed(0)
    J = torch.randn(4, 6, 6, generator=g_, dtype=DT)
    J *= 0.8 / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    grad = torch.randn(4, 6, generator=g_, dtype=DT)
    vjp = lambda y: (y[:, None, :] @ J).squeeze(1)  # noqa: E731  (yᵀ J, i.e. Jᵀ y, per sample)
    expected = torch.linalg.solve(torch.eye(6, dtype=DT) - J.transpose(1, 2), grad[..., None])[..., 0]
    got = _call(fn, "adjoint_solve", vjp, grad, tol=1e-12, max_iter=1000)
    _compare(got, expected, "adjoint_solve on a batch of 4 random 6×6 Jacobians",
             "Iterate g ← vjp(g) + grad (the upstream gradient is added at *every* step) until "
             "‖g_new − g‖ is tiny; starting from g = grad or g = 0 both work.", rtol=1e-7, atol=1e-9)
    return _passed("adjoint_solve", "g = (I − Jᵀ)⁻¹ ∂ℓ/∂z* on 4 random Jacobians")


@exercise
def check_linear_deq_grad(fn: Callable) -> bool:
    """fn(W, b, dl_dz) -> ∂ℓ/∂b for z* = W z* + b (batch of row vectors) given ∂ℓ/∂z*."""
    for seed in range(2):
        W, _, _, b = _tanh_problem(seed, d_in=6, scale=0.8)
        dl_dz = torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=DT)
        expected = torch.linalg.solve(torch.eye(6, dtype=DT) - W.T, dl_dz.T).T
        got = _call(fn, "linear_deq_grad", W, b, dl_dz)
        _compare(got, expected, f"linear_deq_grad (seed {seed})",
                 "z* = (I − W)⁻¹ b, so ∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z*: note the transpose — using "
                 "(I − W)⁻¹ instead is the classic mistake.")
    return _passed("linear_deq_grad", "∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z* on 2 problems")


# ---------------------------------------------------------------- notebook 04

def _tiny_classifier(seed: int):
    torch.manual_seed(seed)
    return DEQClassifier(channels=2, hidden=8, deq=dict(tol=1e-6, max_iter=100)).double()


@exercise
def check_train_step(fn: Callable) -> bool:
    """fn(model, optimizer, x, y) -> loss (float) after one cross-entropy optimizer step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 28, 28, generator=g, dtype=DT), torch.randint(0, 10, (6,), generator=g)
    ref, mine = _tiny_classifier(1), _tiny_classifier(1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    my_opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    for step in range(2):                     # two steps: catches a forgotten zero_grad
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        got = _call(fn, "train_step", mine, my_opt, x, y)
        if not isinstance(got, (float, int)) and not (isinstance(got, torch.Tensor) and got.numel() == 1):
            raise CheckFailed(f"train_step should return the loss as a number (loss.item()), "
                              f"got {type(got).__name__}.")
        if abs(float(got) - ref_loss.item()) > 1e-6 * max(1.0, abs(ref_loss.item())):
            raise CheckFailed(f"train_step, step {step + 1}: loss {float(got):.6f}, expected "
                              f"{ref_loss.item():.6f}. Use F.cross_entropy(model(x), y) on the raw "
                              f"logits (no softmax first), computed before the optimizer step.")
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            _compare(q, p.detach(), f"train_step, parameter {name} after step {step + 1}",
                     "The order is: optimizer.zero_grad(), loss.backward(), optimizer.step(). "
                     "Forgetting zero_grad() adds up gradients across steps; forgetting step() "
                     "changes nothing.", rtol=1e-6, atol=1e-9)
    return _passed("train_step", "same loss and same parameters as the reference, two steps running")


@exercise
def check_count_parameters(fn: Callable) -> bool:
    """fn(model) -> number of trainable parameters."""
    model = _tiny_classifier(0)
    model.head.bias.requires_grad_(False)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = _call(fn, "count_parameters", model)
    if int(got) != expected:
        total = sum(p.numel() for p in model.parameters())
        hint = (" You counted frozen parameters too: keep only those with p.requires_grad."
                if int(got) == total else
                " Sum p.numel() (the number of entries), not len(p) or the number of tensors.")
        raise CheckFailed(f"count_parameters: got {int(got)}, expected {expected}.{hint}")
    return _passed("count_parameters", f"{expected} trainable parameters")


@exercise
def check_nfe_by_epoch(fn: Callable) -> bool:
    """fn(history) -> {epoch: mean forward NFE of that epoch's train records}."""
    history = [dict(split="train", epoch=e, step=3 * e + i + 1, fwd_nfe=n)
               for e, ns in enumerate([(6, 6, 6), (9, 10, 11), (12, 15, 15)]) for i, n in enumerate(ns)]
    history.insert(3, dict(split="test", epoch=0, step=3, fwd_nfe=100))
    expected = {0: 6.0, 1: 10.0, 2: 14.0}
    got = _call(fn, "nfe_by_epoch", history)
    if not isinstance(got, dict) or {k: round(float(v), 6) for k, v in got.items()} != expected:
        raise CheckFailed(f"nfe_by_epoch: expected {expected}, got {got}. Average `fwd_nfe` over the "
                          f"records with split == 'train' only (test records are evaluations), "
                          f"grouped by their `epoch`.")
    return _passed("nfe_by_epoch", "mean forward NFE per epoch, train records only")


# ---------------------------------------------------------------- notebook 05

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
    f_z, z, exact = _tanh_state(1)
    probes = torch.randn(4000, *z.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = _call(fn, "hutchinson", f_z, z, probes)
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
        got = _call(fn, "power_method", lambda v: A @ v, v0.clone(), 300)
        got = float(got)
        if abs(got - abs(top)) > 1e-6 * abs(top):
            hint = ("It came out negative: the dominant eigenvalue here is negative, and the spectral "
                    "radius is its modulus |λ|." if got < 0 else
                    "Repeat v ← A v / ‖A v‖ n_iter times, then return |vᵀ A v| (v has norm 1).")
            raise CheckFailed(f"power_method on a symmetric 8×8 matrix with largest |λ| = {abs(top)} "
                              f"(λ = {top}) returned {got:.6g}. {hint}")
    return _passed("power_method", "finds |λ_max| of 3 symmetric matrices (one with λ_max < 0)")


# ---------------------------------------------------------------- notebook 06

@exercise
def check_fuse_two(fn: Callable) -> bool:
    """fn(b0, b1, down, up) -> [f0, f1]: two-branch multiscale fusion,
    f0 = b0 + nearest-upsample(up(b1)) to b0's size, f1 = b1 + down(b0)."""
    for seed, size in [(0, 8), (1, 7)]:                 # an odd size: 7 → 4 → back to 7
        torch.manual_seed(seed)
        b0 = torch.randn(2, 4, size, size, dtype=DT)
        b1 = torch.randn(2, 6, (size + 1) // 2, (size + 1) // 2, dtype=DT)
        down = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
        up = nn.Conv2d(6, 4, 1).double()
        expected = [b0 + F.interpolate(up(b1), size=b0.shape[-2:], mode="nearest"), b1 + down(b0)]
        got = _call(fn, "fuse_two", b0, b1, down, up)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            raise CheckFailed(f"fuse_two should return a list [f0, f1] of two feature maps, got "
                              f"{type(got).__name__}.")
        hint = ("f0 keeps b0 and adds the low-resolution branch brought up: up(b1) (a 1×1 conv to "
                "b0's channels), then F.interpolate(..., size=b0.shape[-2:], mode='nearest') — "
                "`size=`, not scale_factor=2, so odd sizes work; f1 keeps b1 and adds down(b0).")
        for i in range(2):
            _compare(got[i], expected[i], f"fuse_two output f{i} (branch-0 size {size}×{size})",
                     hint, rtol=1e-10, atol=1e-12)
    return _passed("fuse_two", "both outputs right, for even and odd resolutions")


@exercise
def check_state_numel(fn: Callable) -> bool:
    """fn(channels, height, width) -> entries of one sample's multiscale state, branch i at
    ⌈H/2^i⌉ × ⌈W/2^i⌉ (each stride-2 conv maps a side s to ⌈s/2⌉)."""
    for channels, h, w in [([24, 24], 32, 32), ([32, 64, 128, 256], 56, 56), ([4, 8, 16], 7, 9)]:
        got = _call(fn, "state_numel", list(channels), h, w)
        # halving i times rounding up each time is one division rounding up: ⌈s / 2^i⌉
        expected = sum(c * -(-h // 2 ** i) * -(-w // 2 ** i) for i, c in enumerate(channels))
        if int(got) != expected:
            raise CheckFailed(
                f"state_numel({channels}, {h}, {w}): expected {expected}, got {got}. Branch i has "
                f"channels[i] maps of size ⌈H/2^i⌉ × ⌈W/2^i⌉: halve the sides *rounding up* after "
                f"each branch (-(-h // 2) in Python), starting from the full size for branch 0.")
    return _passed("state_numel", "right for 3 multiscale states, odd sizes included")


# ---------------------------------------------------------------- notebook 07

@exercise
def check_causal_attention(fn: Callable) -> bool:
    """fn(q, k, v) -> softmax(q kᵀ / √d with the future masked out) v, for (batch, T, d) inputs."""
    g = torch.Generator().manual_seed(0)
    for T, d in [(5, 4), (9, 8)]:
        q, k, v = (torch.randn(2, T, d, generator=g, dtype=DT) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = _call(fn, "causal_attention", q, k, v)
        _compare(got, expected, f"causal_attention on (batch 2, T {T}, d {d})",
                 "Scores q kᵀ / √d (shape (batch, T, T)); set the entries above the diagonal "
                 "(key position > query position) to -inf, so position t sees positions ≤ t "
                 "(itself included); softmax over the last dimension (the keys); multiply by v.",
                 rtol=1e-8, atol=1e-10)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        k2[:, -1], v2[:, -1] = 100.0, 100.0                  # change only the last position
        again = _call(fn, "causal_attention", q2, k2, v2)
        if not torch.allclose(again[:, :-1].detach().to(DT), got[:, :-1].detach().to(DT)):
            raise CheckFailed("causal_attention: changing the key and value of the *last* position "
                              "changed the outputs of earlier positions: the future leaks.")
    return _passed("causal_attention", "matches PyTorch's causal attention; no future leaks")


@exercise
def check_unigram_bits(fn: Callable) -> bool:
    """fn(counts) -> entropy in bits of the distribution counts / counts.sum() (zeros allowed)."""
    cases = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([8.0, 0.0, 4.0, 2.0, 2.0]),
             torch.tensor([5.0])]
    for counts in cases:
        p = counts / counts.sum()
        p = p[p > 0]
        expected = float(-(p * p.log2()).sum())
        got = _call(fn, "unigram_bits", counts.clone())
        try:
            got = float(got)
        except (TypeError, ValueError):
            raise CheckFailed(f"unigram_bits should return a number, got {type(got).__name__}.")
        if not abs(got - expected) < 1e-6:
            hint = ("A symbol with count 0 contributes 0 (p log p → 0), not NaN: drop the zero "
                    "counts first." if got != got else
                    "H = −Σ p log₂ p with p = counts / counts.sum(): base 2 for bits, and "
                    "normalize the counts to probabilities first.")
            raise CheckFailed(f"unigram_bits({counts.tolist()}): expected {expected:.6f} bits, got "
                              f"{got}. {hint}")
    return _passed("unigram_bits", "right for uniform, skewed (with a zero count) and one-symbol counts")


# ---------------------------------------------------------------- notebook 08

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


# ---------------------------------------------------------------- notebook 09

@exercise
def check_neumann_adjoint(fn: Callable) -> bool:
    """fn(vjp, grad, k) -> g = Σ_{i<k} (Jᵀ)ⁱ grad, the first k terms of the Neumann series of
    (I − Jᵀ)⁻¹ grad, where vjp(y) = Jᵀ y (per sample)."""
    g_ = torch.Generator().manual_seed(0)
    J = torch.randn(4, 6, 6, generator=g_, dtype=DT)                 # not symmetric: Jᵀ ≠ J
    J *= 0.8 / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    grad = torch.randn(4, 6, generator=g_, dtype=DT)
    vjp = lambda y: (y[:, None, :] @ J).squeeze(1)  # noqa: E731  (yᵀ J, i.e. Jᵀ y, per sample)
    hint = ("k terms: i = 0, …, k − 1. The first term is grad itself (i = 0, no product), and "
            "each next term is vjp of the previous *term* (not of the running sum): "
            "term ← vjp(term), g ← g + term. With k = 1 the answer is grad (that is JFB).")
    for k in (1, 2, 3, 10):
        expected, term = torch.zeros_like(grad), grad
        for _ in range(k):
            expected, term = expected + term, vjp(term)
        got = _call(fn, "neumann_adjoint", vjp, grad.clone(), k)
        _compare(got, expected, f"neumann_adjoint with k={k} on a batch of 4 random 6×6 Jacobians",
                 hint, rtol=1e-10, atol=1e-12)
    exact = torch.linalg.solve(torch.eye(6, dtype=DT) - J.transpose(1, 2), grad[..., None])[..., 0]
    got = _call(fn, "neumann_adjoint", vjp, grad.clone(), 200)
    _compare(got, exact, "neumann_adjoint with k=200 against the exact adjoint (I − Jᵀ)⁻¹ grad",
             hint, rtol=1e-8, atol=1e-10)
    return _passed("neumann_adjoint", "the truncated series for k = 1, 2, 3, 10; the exact adjoint "
                   "for k = 200")


# ---------------------------------------------------------------- notebook 10

def _tiny_deq_classifier(seed: int, hidden: int = 6):
    torch.manual_seed(seed)
    return DEQClassifier(in_channels=1, image_size=8, n_classes=4, channels=2, hidden=hidden,
                         deq=dict(solver="anderson", tol=1e-12, max_iter=200)).double()


@exercise
def check_data_parallel_gradient(fn: Callable) -> bool:
    """fn(model, x, y, world_size) -> the gradients DistributedDataParallel gives: the mean over
    world_size contiguous equal shards of each shard's mean cross-entropy gradient, one tensor per
    parameter (in model.parameters() order), leaving the model's .grad and weights as they were."""
    g = torch.Generator().manual_seed(0)
    for seed, batch, world in [(0, 12, 3), (1, 8, 2), (2, 8, 4)]:
        model = _tiny_deq_classifier(seed)
        x = torch.rand(batch, 1, 8, 8, generator=g, dtype=DT)
        y = torch.randint(0, 4, (batch,), generator=g)
        before = [p.detach().clone() for p in model.parameters()]
        expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        got = _call(fn, "data_parallel_gradient", model, x.clone(), y.clone(), world)
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            raise CheckFailed(f"data_parallel_gradient should return a list with one gradient per "
                              f"parameter ({len(expected)} here, in model.parameters() order), got "
                              f"{type(got).__name__}"
                              f"{f' of length {len(got)}' if isinstance(got, (list, tuple)) else ''}.")
        if any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)):
            raise CheckFailed("data_parallel_gradient changed the model's weights: only compute the "
                              "gradients (torch.autograd.grad), take no optimizer step.")
        ratio = (torch.cat([t.flatten() for t in got]).norm() /
                 torch.cat([t.flatten() for t in expected]).norm()).item() if all(
            isinstance(t, torch.Tensor) for t in got) else float("nan")
        hint = ("Split x and y into world_size contiguous shards (x.tensor_split(world_size)), take "
                "each shard's gradient of its *mean* loss F.cross_entropy(model(x_r), y_r), and "
                "average the shards' gradients: with equal shards that is exactly the gradient of "
                "the whole batch's mean loss.")
        if abs(ratio - world) < 1e-6 * world:
            hint = ("Your gradients are world_size times too large: DDP *averages* the processes' "
                    "gradients (all-reduce, then divide by world_size); it does not sum them.")
        elif abs(ratio * world - 1) < 1e-6:
            hint = ("Your gradients are world_size times too small: either you divided a shard's "
                    "gradient by world_size twice, or you took only one shard's gradient.")
        for i, (a, b) in enumerate(zip(got, expected)):
            _compare(a, b, f"data_parallel_gradient, parameter {i} (batch {batch}, world_size "
                           f"{world})", hint, rtol=1e-8, atol=1e-11)
    return _passed("data_parallel_gradient", "the averaged shard gradients equal the whole "
                   "batch's gradient, for 2, 3 and 4 processes")
