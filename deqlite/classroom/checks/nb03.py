"""Checks for notebook 03's exercises (implicit differentiation)."""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import nn

from ._harness import (_call, CheckFailed, _compare, _Counted, DT, _exception_hint, exercise,
                       _fail, _jacobians, NotWrittenYet, _numbered, _passed, _tanh_problem,
                       _TooManyCalls, _vjp_of, _which)


@exercise
def check_adjoint_solve(fn: Callable) -> bool:
    """fn(vjp, grad, tol, max_iter) -> g solving g = Jᵀ g + grad, where vjp(y) = Jᵀ y."""
    hint = ("Iterate g ← vjp(g) + grad (the upstream gradient is added at *every* step) until "
            "‖g_new − g‖ ≤ tol · ‖g_new‖, at most max_iter times; starting from g = 0 or g = grad "
            "both work.")
    for what, seed, shape in [("a batch of 4 random 6×6 Jacobians", 0, (4, 6)),
                              ("one sample", 1, (1, 6)),
                              ("image-shaped gradients (2, 2, 2, 2)", 2, (2, 2, 2, 2))]:
        J, grad = _jacobians(seed, batch=shape[0], d=math.prod(shape[1:]))
        grad = grad.reshape(shape)
        expected = torch.linalg.solve(torch.eye(J.shape[1], dtype=DT) - J.transpose(1, 2),
                                      grad.flatten(1)[..., None])[..., 0].reshape(shape)
        vjp = _Counted(_vjp_of(J, shape), "vjp", 3000, " with max_iter=1000")
        got = _call(fn, "adjoint_solve", vjp, grad, tol=1e-12, max_iter=1000)
        _compare(got, expected, f"adjoint_solve on {what}", hint, rtol=1e-7, atol=1e-9)
        if vjp.calls > 1001:
            raise _fail(f"adjoint_solve on {what}", f"{vjp.calls} vector–Jacobian products for "
                        f"max_iter=1000.", "One vjp per iteration, at most max_iter of them.")
    J, grad = _jacobians(3, scale=1.5)                         # ‖J‖ > 1: the iteration diverges
    vjp = _Counted(_vjp_of(J, grad.shape), "vjp", 100, " with max_iter=20")
    _call(fn, "adjoint_solve", vjp, grad, tol=1e-12, max_iter=20)
    if vjp.calls > 21:
        raise _fail("adjoint_solve with max_iter=20 on Jacobians with ‖J‖ = 1.5 (no convergence)",
                    f"{vjp.calls} vector–Jacobian products.", "Stop after max_iter iterations even "
                    "when ‖g_new − g‖ never reaches tol.")
    return _passed("adjoint_solve", "g = (I − Jᵀ)⁻¹ ∂ℓ/∂z* for vectors, one sample and image "
                   "shapes; stops at max_iter when the iteration diverges")


@exercise
def check_linear_deq_grad(fn: Callable) -> bool:
    """fn(W, b, dl_dz) -> ∂ℓ/∂b for z* = W z* + b (batch of row vectors) given ∂ℓ/∂z*."""
    hint = ("z* = (I − W)⁻¹ b, so ∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z*: note the transpose (using (I − W)⁻¹ "
            "instead is the classic mistake), and solve exactly rather than truncating the series.")
    for seed, shape in [(0, dict(d_in=6)), (1, dict(d_in=6, scale=0.95)),
                        (2, dict(batch=1, d=3, d_in=3)), (3, dict(d_in=6, dtype=torch.float32))]:
        W, _, _, b = _tanh_problem(seed, **shape)
        dl_dz = torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 10),
                            dtype=DT).to(b.dtype)
        eye = torch.eye(W.shape[0], dtype=DT)
        expected = torch.linalg.solve(eye - W.double().T, dl_dz.double().T).T.to(b.dtype)
        got = _call(fn, "linear_deq_grad", W, b, dl_dz)
        f32 = b.dtype == torch.float32
        _compare(got, expected, f"linear_deq_grad (batch {b.shape[0]}, d {W.shape[0]}, "
                 f"{str(b.dtype).removeprefix('torch.')})", hint, rtol=1e-4 if f32 else 1e-10,
                 atol=1e-5 if f32 else 1e-12)
    return _passed("linear_deq_grad", "∂ℓ/∂b = (I − W)⁻ᵀ ∂ℓ/∂z*, batches of 1 and 4, float32 too")


class _Cell(nn.Module):
    """f(z, x) = tanh(z Wᵀ + x Uᵀ + b) on states of any shape (batch, ...), through a flattening.
    It counts its applications (``calls``, stopping a runaway loop past ``limit``) and, through a
    hook registered on each output *before* the student's, the backward passes through each of
    them (``passes``: a list, one count per application), i.e. the vector–Jacobian products."""

    def __init__(self, W, U, b, limit: int = 20):
        super().__init__()
        self.W, self.U, self.b = (nn.Parameter(t.clone()) for t in (W, U, b))
        self.calls, self.limit, self.passes, self.pass_limit = 0, limit, [], None

    def plain(self, z, x):
        """f itself, uncounted (for the check's own computations)."""
        return torch.tanh((z.flatten(1) @ self.W.T + x @ self.U.T + self.b).reshape(z.shape))

    def forward(self, z, x):
        self.calls += 1
        if self.calls > self.limit:
            raise _TooManyCalls(f"attach_ift applied f more than {self.limit} times, so this "
                                f"check stopped it. Two applications are enough: z = f(z*, x) "
                                f"with its graph, and f0 = f(z0, x) once for all the VJPs.")
        out = self.plain(z, x)
        if out.requires_grad:
            i = len(self.passes)
            self.passes.append(0)

            def count(grad, i=i):
                self.passes[i] += 1
                if _backward_depth() > 2:
                    raise _TooManyCalls(
                        "attach_ift: your hook ran again inside its own VJPs: they are taken "
                        "back through the very tensor that carries the hook, so each product "
                        "starts another adjoint solve (an endless recursion). Take the VJPs "
                        "through a separate "
                        "f0 = f(z0, x), z0 = z*.detach().requires_grad_(), or let the hook pass "
                        "its own products through unchanged.")
                if self.pass_limit is not None and sum(self.passes) > self.pass_limit:
                    raise _TooManyCalls(
                        f"attach_ift: one backward pass made more than {self.pass_limit} "
                        f"vector–Jacobian products through f, so this check stopped it: one VJP "
                        f"per adjoint iteration, at most max_iter of them (pass max_iter on to "
                        f"adjoint_solve), plus the one that carries u through z to θ and x.")
                return grad
            try:
                out.register_hook(count)
            except RuntimeError:             # a transform that does not allow hooks: not counted
                pass
        return out


_BACKWARD_CODES = (torch.autograd.grad.__code__, torch.autograd.backward.__code__)


def _backward_depth() -> int:
    """How many autograd.grad / backward calls are running, nested, in this thread."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        depth += frame.f_code in _BACKWARD_CODES
        frame = frame.f_back
    return depth


def _ift_problem(seed: int, shape=(4, 6), d_in: int = 3, scale: float = 0.7,
                 dtype: torch.dtype = DT, limit: int = 20):
    """A tanh cell with ‖W‖₂ = scale acting on states of ``shape``, its fixed point z* (no graph;
    60 steps: the exact gradient is the IFT's at whatever z* is passed), an input x (requires
    grad) and a cotangent c for the losses."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape[1:])
    W = torch.randn(d, d, generator=g, dtype=DT)
    W *= scale / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(d, d_in, generator=g, dtype=DT)
    b = 0.5 * torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(shape[0], d_in, generator=g, dtype=DT)
    cell = _Cell(W, U, b, limit).to(dtype)
    W, U, b, x = (t.to(dtype).double() for t in (W, U, b, x))    # the problem's own rounding
    z, injection = torch.zeros(shape[0], d, dtype=DT), x @ U.T + b
    for _ in range(60):              # near z* (the exact gradient is taken at the z* passed)
        z = torch.tanh(z @ W.T + injection)
    c = torch.randn(shape, generator=g, dtype=DT)
    return cell, z.reshape(shape).to(dtype), x.to(dtype).requires_grad_(), c


def _exact_ift(cell: _Cell, z_star, x, dl_dz, adjoint: str = "ift"):
    """(∂ℓ/∂x, ∂ℓ/∂W, ∂ℓ/∂U, ∂ℓ/∂b) in float64 by linear algebra, for z = f(z*, x) with
    ∂ℓ/∂z = dl_dz: u = (I − Jᵀ)⁻¹ ∂ℓ/∂z per sample, J = diag(1 − z²) W (``adjoint="ift"``), or the
    adjoints of typical mistakes: ∂ℓ/∂z itself ("jfb"), u + ∂ℓ/∂z ("twice counted"),
    (I − Jᵀ)⁻² ∂ℓ/∂z ("solved twice")."""
    W, U, b = (p.detach().double() for p in (cell.W, cell.U, cell.b))
    zs, xd = z_star.detach().double().flatten(1), x.detach().double()
    s = 1 - torch.tanh(zs @ W.T + xd @ U.T + b) ** 2                    # tanh' at f(z*, x)
    J = s[:, :, None] * W                                                 # (batch, d, d)
    I = torch.eye(W.shape[0], dtype=DT)
    g = dl_dz.detach().double().flatten(1)
    solve = lambda A, v: torch.linalg.solve(A, v[..., None])[..., 0]     # noqa: E731
    u = {"ift": lambda: solve(I - J.transpose(1, 2), g), "jfb": lambda: g,
         "twice counted": lambda: solve(I - J.transpose(1, 2), g) + g,
         "solved twice": lambda: solve(I - J.transpose(1, 2), solve(I - J.transpose(1, 2), g)),
         }[adjoint]()
    a = s * u                                                             # ∂ℓ/∂(pre-activation)
    dt = x.dtype
    return [(a @ U).to(dt), (a.T @ zs).to(dt), (a.T @ xd).to(dt), a.sum(0).to(dt)]


_NAMES = ["x", "the weight W", "the input weight U", "the bias b"]


def _backward(loss, cell, x, what, calls_before):
    """∂loss/∂(x, W, U, b), with the student's hook running inside: its exceptions are the
    student's bugs, reported in words."""
    try:
        return torch.autograd.grad(loss, [x, cell.W, cell.U, cell.b], retain_graph=True,
                                   allow_unused=True)
    except CheckFailed:
        raise
    except RecursionError:
        raise _fail(what, "backward hit Python's recursion limit.",
                    "Your hook runs again inside its own VJPs: they are taken through the tensor "
                    "that carries the hook. Take them through a separate application "
                    "f0 = f(z0, x), z0 = z*.detach().requires_grad_().") from None
    except Exception as e:  # noqa: BLE001  (the student's hook raised)
        text = str(e)
        hint = _exception_hint(e)
        if ("does not require grad" in text or "does not have a grad_fn" in text) and \
                cell.calls > calls_before:
            hint = (" — f was applied inside the backward pass, where autograd records nothing: "
                    "build f0 = f(z0, x) once, in attach_ift, and take every VJP through it.")
        elif "does not require grad" in text or "does not have a grad_fn" in text:
            hint = (" — the VJPs need a graph from z0 to f0: z0 = z*.detach().requires_grad_() "
                    "and f0 = f(z0, x), built outside torch.no_grad().")
        elif "changed the type" in text or "dtype" in text:
            hint = (" — the hook must return a gradient of z's dtype (float32 stays float32): "
                    "do not call .double() or create float64 tensors.")
        raise _fail(what, f"backward through your output raised {type(e).__name__}: {e}" + hint)\
            from None


def _attach_hints(got, exact: dict[str, list], default: str) -> str:
    """The hint for the wrong adjoint the gradients match (by ∂ℓ/∂W, the first parameter)."""
    return _which(got, {
        "These are the gradients with u = ∂ℓ/∂z itself (Jacobian-free backprop): your hook never "
        "replaced the gradient that reaches θ and x. Register it on the output z = f(z*, x), the "
        "tensor you return (not on z* or z0), and return the adjoint from it.": exact["jfb"][1],
        "These are the gradients with u + ∂ℓ/∂z: the incoming gradient is counted twice. The "
        "adjoint u = Jᵀu + ∂ℓ/∂z already contains ∂ℓ/∂z: the hook returns u alone.":
            exact["twice counted"][1],
        "These are the gradients with (I − Jᵀ)⁻² ∂ℓ/∂z: the adjoint solve ran twice per backward "
        "(two hooks, or a hook that fires on its own output again).": exact["solved twice"][1],
    }, default)


@exercise
def check_attach_ift(fn: Callable) -> bool:
    """fn(f, z_star, x, tol, max_iter) -> z = f(z*, x) whose backward replaces ∂ℓ/∂z by the
    adjoint u = Jᵀu + ∂ℓ/∂z: the implicit function theorem's gradient for x and f's parameters.
    Budget: two applications of f in all (however many backward passes); at most max_iter + 2
    vector–Jacobian products through f per backward pass."""
    hint = ("Return z = f(z*.detach(), x) (graph to θ and x), build f0 = f(z0, x) at "
            "z0 = z*.detach().requires_grad_() (J is ∂f/∂z at z*, not at any other point) for "
            "the products Jᵀy = autograd.grad(f0, z0, y, "
            "retain_graph=True) (not f0.backward(y), which accumulates into z0.grad), and "
            "register on z a hook that returns adjoint_solve(vjp, grad, tol, max_iter) in place "
            "of grad.")
    families = [("a batch of 4 vector states", dict(seed=0), 1e-12, 500),
                ("one sample", dict(seed=1, shape=(1, 5), d_in=2), 1e-12, 500),
                ("image-shaped states (2, 2, 3, 2)", dict(seed=2, shape=(2, 2, 3, 2)), 1e-12, 500),
                ("float32 states", dict(seed=3, shape=(3, 5), dtype=torch.float32), 1e-7, 200),
                ("z* from a solver that kept its graph", dict(seed=4, shape=(2, 6)), 1e-12, 500),
                ("‖W‖₂ = 0.95 with tol=0, max_iter=10 (the VJP budget)",
                 dict(seed=5, shape=(3, 6), scale=0.95), 0.0, 10)]
    for what, spec, tol, max_iter in families:
        cell, z_star, x, c = _ift_problem(**spec)
        f32 = z_star.dtype == torch.float32
        rtol, atol = (2e-4, 1e-5) if f32 else (1e-7, 1e-10)
        unrolled_reached = []
        if "graph" in what:                  # z* = the last of 30 recorded steps, a graph to W, x
            z_k = z_star.clone()
            for _ in range(30):
                z_k = cell.plain(z_k, x)
            z_k.register_hook(lambda grad: unrolled_reached.append(True) or grad)
            z_star = z_k
        flag = z_star.requires_grad
        what = f"attach_ift on {what}"
        z = _call(fn, "attach_ift", cell, z_star, x, tol=tol, max_iter=max_iter)
        if z_star.requires_grad != flag or (z_star.is_leaf and z_star.grad is not None):
            raise _fail(what, "z_star's requires_grad flag was changed.", "Leave the caller's z* "
                        "alone: take z0 = z_star.detach().requires_grad_() (a new tensor) for the "
                        "VJPs, and apply f to z_star.detach() for the output.")
        with torch.no_grad():
            value = cell.plain(z_star.detach(), x)
        _compare(z, value, f"{what}: the value returned", "The forward value is f(z*, x), one "
                 "application of f at the fixed point (≈ z*), with z*'s shape and dtype.",
                 rtol=1e-6 if f32 else 1e-12, atol=1e-7 if f32 else 1e-14)
        if not z.requires_grad:
            raise _fail(what, "the tensor returned has no graph (requires_grad is False), so no "
                        "gradient can reach x or the parameters.", "Apply f(z*, x) with autograd "
                        "on (not under torch.no_grad()) and return that tensor.")
        if cell.calls > 2:
            raise _fail(what, f"f was applied {cell.calls} times.", "Two applications are "
                        "enough: the output z = f(z*, x) and f0 = f(z0, x) for all the VJPs; do "
                        "not solve for z* again.")
        calls_before, cell.pass_limit = cell.calls, max_iter + 2
        losses = [("a first loss", (z * c).sum(), c),
                  ("a second loss from the same output", (0.5 * z ** 2 * c).sum(), z.detach() * c)]
        for n_loss, (which, loss, dl_dz) in enumerate(losses[:1] if "budget" in what else losses):
            cell.passes = [0] * len(cell.passes)
            grads = _backward(loss, cell, x, f"{what}, backward of {which}", calls_before)
            if sum(cell.passes) > max_iter + 2:
                raise _fail(f"{what}, backward of {which}", f"{sum(cell.passes)} vector–Jacobian "
                            f"products through f for max_iter={max_iter}.", "One VJP per adjoint "
                            "iteration, at most max_iter of them (pass max_iter on to "
                            "adjoint_solve), plus the one that carries u through z to θ and x.")
            if "budget" in what:             # max_iter ends the adjoint solve: no exact value
                break
            for name, got in zip(_NAMES, grads):
                if got is None:
                    raise _fail(f"{what}, backward of {which}", f"no gradient reached {name}.",
                                f"z = f(z*, x) must be computed with a graph to {name}: do not "
                                f"detach x or use a copy of f's parameters; and return that z.")
            exact = {k: _exact_ift(cell, z_star, x, dl_dz, k)
                     for k in ("ift", "jfb", "twice counted", "solved twice")}
            specific = _attach_hints(grads[1], exact, hint)
            if n_loss == 1:
                specific = _which(grads[1], {
                    "The second backward got the first loss's gradient: the hook must solve "
                    "for the gradient it is given each time, not reuse a stored adjoint.":
                        _exact_ift(cell, z_star, x, c)[1],
                    "The second backward got the gradient with u = ∂ℓ/∂z (no adjoint solve): "
                    "the hook must stay registered and work for every backward pass from z, "
                    "not remove itself after the first.": exact["jfb"][1]}, specific)
            if unrolled_reached:
                specific = ("Your gradient went back through the iterations that produced z* "
                            "(its graph): the IFT gradient depends on z* alone. Use "
                            "z_star.detach() for both applications of f.")
            for name, got, expected in zip(_NAMES, grads, exact["ift"]):
                _compare(got, expected, f"{what}, ∂ℓ/∂{name.split()[-1]} for {which}", specific,
                         rtol=rtol, atol=atol)
        if any(t.grad is not None for t in (x, cell.W, cell.U, cell.b)):
            raise _fail(what, "the backward passes left gradients in .grad of x or of f's "
                        "parameters.", "Take the VJPs with torch.autograd.grad(f0, z0, y, "
                        "retain_graph=True), which returns Jᵀy; f0.backward(y) accumulates into "
                        "the .grad of every leaf it reaches (z0, and θ and x through f0).")
        if cell.calls > 2:
            raise _fail(what, f"f was applied {cell.calls} times in all, "
                        f"{cell.calls - calls_before} of them during the backward passes.",
                        "Two applications are enough, however many backward passes follow: the "
                        "output z = f(z*, x) and one f0 = f(z0, x) kept for all the VJPs (build "
                        "it once, not per backward or per product).")
    return _passed("attach_ift", "the exact IFT gradient for x, W, U and b (float64 linear "
                   "algebra), one sample to image-shaped states, float32, two losses from one "
                   "output; two applications of f, z* untouched")


def _adjoint_runs(L: float, tol: float, seed: int) -> list[tuple[str, float]]:
    """(what, ‖g_new − g*‖ / (tol_run · ‖g_new‖)) for real runs of the adjoint iteration
    g ← Jᵀ g + grad from g = 0 that stops at ‖g_new − g‖ ≤ tol ‖g_new‖, on maps with ‖J‖₂ = L:
    random non-normal J (a batch of 3, 6×6), and J = L·I stopping where the relative step only
    just meets tol (the worst case: there the bound is an equality)."""
    g_ = torch.Generator().manual_seed(seed)

    def run(J, grad, stop):
        exact = torch.linalg.solve(torch.eye(J.shape[-1], dtype=DT) - J.transpose(-1, -2),
                                   grad[..., None])[..., 0]
        g, steps = torch.zeros_like(grad), []
        for _ in range(100_000):
            g_new = (g[:, None, :] @ J).squeeze(1) + grad
            steps.append(((g_new - g).norm() / g_new.norm()).item())
            if steps[-1] <= stop:
                break
            g = g_new
        return ((g_new - exact).norm() / g_new.norm()).item(), steps

    runs = []
    for _ in range(3):
        J = torch.randn(3, 6, 6, generator=g_, dtype=DT)
        J *= L / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
        grad = torch.randn(3, 6, generator=g_, dtype=DT)
        runs.append((f"random 6×6 Jacobians with ‖J‖₂ = {L}", run(J, grad, tol)[0] / tol))
    J = L * torch.eye(6, dtype=DT).expand(1, 6, 6)
    grad = torch.randn(1, 6, generator=g_, dtype=DT)
    _, steps = run(J, grad, tol)
    just = steps[-1] * (1 + 1e-12)             # the largest tolerance that stops at that step
    if 0 < just <= tol:                        # J = 0 stops with a zero step: nothing to stretch
        error, _ = run(J, grad, just)
        runs.append((f"J = {L}·I with the last step just meeting its tol", error / just))
    return runs


@exercise
def check_adjoint_error_bound(fn: Callable) -> bool:
    """fn(tol, lipschitz) -> the smallest B with ‖g_new − g*‖ ≤ B ‖g_new‖ guaranteed for the g_new
    an adjoint iteration g ← Jᵀ g + grad returns when it stops at ‖g_new − g‖ ≤ tol ‖g_new‖,
    for every J with ‖J‖₂ ≤ lipschitz; math.inf when lipschitz ≥ 1."""
    hint = ("The step does not bound the error one for one: g_new − g* = Jᵀ (g − g*), so "
            "(I − Jᵀ)(g_new − g*) = Jᵀ (g − g_new); take norms with ‖J‖₂ ≤ L.")
    name = "adjoint_error_bound"

    def ask(tol, L):
        try:
            return _call(fn, name, tol, L, convert=_numbered(name))
        except NotWrittenYet:
            raise
        except CheckFailed as e:
            edge = {0.0: " With lipschitz = 0 (J = 0) one step is exact: the bound is 0; write "
                         "it so that it needs no division by L.",
                    1.0: " For lipschitz ≥ 1 return math.inf before dividing by 1 − L."}
            raise CheckFailed(f"{e} (called with tol={tol:g}, lipschitz={L}).{edge.get(L, '')}")\
                from None

    for seed, L in enumerate((0.9, 0.6, 0.3, 0.99, 0.0)):
        for tol in (1e-3, 1e-8):
            got = ask(tol, L)
            runs = _adjoint_runs(L, tol, seed)
            worst_what, worst = max(runs, key=lambda r: r[1])
            what = f"{name}(tol={tol:g}, lipschitz={L})"
            if not math.isfinite(got) or got < 0:
                raise _fail(what, f"got {got!r}; for lipschitz < 1 the bound is a finite number "
                            f"≥ 0.", hint)
            if got < worst * tol * (1 - 1e-6):
                raise _fail(what, f"a real run exceeds your bound: on {worst_what}, the error "
                            f"‖g_new − g*‖ was {worst:.6g} · tol · ‖g_new‖ (= {worst * tol:.6g} · "
                            f"‖g_new‖ at this tol), your bound {got:.6g}.",
                            "The error can be larger than tol: the stopping rule bounds the "
                            "last step, not the distance to g*. " + hint if got <= tol * 1.000001
                            else hint)
            if got > worst * tol * (1 + 1e-3) + 1e-300:
                detail = (f"your bound {got:.6g} is valid but not the smallest: the worst real "
                          f"run, on {worst_what}, reached {worst:.6g} · tol (= {worst * tol:.6g} "
                          f"at this tol), and that case is the worst there is.")
                loose = hint
                if L and abs(got - tol / (1 - L)) <= 1e-9 * tol / (1 - L):
                    loose = ("tol/(1 − L) bounds the distance of the previous iterate g; the "
                             "iteration returns g_new = Jᵀ g + grad, one more step, which is "
                             "closer to g*. " + hint)
                raise _fail(what, detail, loose)
    for L in (1.0, 1.5):
        got = ask(1e-6, L)
        if got != math.inf:
            raise _fail(f"{name}(1e-6, {L})", f"expected math.inf, got {got!r}.", "With ‖J‖₂ ≥ 1 "
                        "nothing is guaranteed (for J = I the adjoint does not even exist, yet the "
                        "relative step 1/k falls below any tol): return math.inf.")
    return _passed(name, "never below a real run's error, reached by J = L·I, for L from 0 to "
                   "0.99; math.inf for L ≥ 1")
