"""Joint inference and input optimization (JIIO) in equilibrium networks.

Gurumurthy, Bai, Manchester, Kolter, "Joint inference and input optimization in equilibrium
networks", NeurIPS 2021.

Many tasks optimize a DEQ's *input*: a latent code that a DEQ decoder turns into an image
(inpainting, denoising, training a decoder without an encoder), or a perturbation of an image that
fools a DEQ classifier. Per sample, with a loss ℓ that includes any regularizer of x,

    minimize_x  ℓ(z*, x)   subject to   z* = f(z*, x),   x ∈ C.

With the Lagrangian  L = ℓ(z, x) + μᵀ (f(z, x) − z),  a solution satisfies (KKT)

    z = f(z, x)                                    the equilibrium
    μ = J_zᵀ μ + ∇_z ℓ(z, x)                       the adjoint (the IFT backward's fixed point)
    x = Π_C(x − α (J_xᵀ μ + ∇_x ℓ(z, x)))          stationarity (∇_x L = 0 when C is everything)

with J_z = ∂f/∂z, J_x = ∂f/∂x and Π_C the projection onto C.

*Nested* optimization (``nested``) meets them one after the other, at every step on x: solve
the equilibrium to tolerance, then the adjoint, then step. JIIO (``jiio``) instead solves all three
at once, as ONE fixed point of the augmented map over w = (z, μ, x):

    T(z, μ, x) = ( f(z, x),  J_zᵀμ + ∇_zℓ,  Π_C(x − α (J_xᵀμ + ∇_xℓ)) ).

One T costs one evaluation of f and one vector–Jacobian product: a single reverse pass through
f and ℓ with weights (μ, 1) gives J_zᵀμ + ∇_zℓ and J_xᵀμ + ∇_xℓ together. Iterates are

    damped:    z ← z + a (f − z),  μ ← μ + b (J_zᵀμ + ∇_zℓ − μ),  x ← Π_C(x − α ∇_x L)
    anderson:  Anderson acceleration (``solvers.AndersonMixer``) on the joint state, then Π_C on x
               (an extrapolated x may leave C); safeguarded: a sample whose KKT residuals grew
               takes the damped step instead (plain joint Anderson can stall on ill-conditioned
               problems, extrapolating x far out).

Neither the equilibrium nor the adjoint is solved exactly while x still moves, which is where the
saving comes from. Convergence is judged per sample on the three KKT residuals (see ``jiio``).

Training with JIIO inside the loop (a decoder with latent optimization and no encoder): the outer
gradient is taken at (z*, x*) with x* detached (by the envelope theorem ∂ℓ/∂x* ≈ 0 there), through
``attach(deq, result)``: one application of f with a graph, whose backward solves the adjoint
warm-started from μ*, which already solves it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ._validate import check_range, check_tensor, lookup, strict_options
from .solvers import AndersonMixer, flatten_state, unflatten_state
from .stats import EPS

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # (z, x) -> (batch,) objective


# ---------------------------------------------------------------------------- projections

class Box:
    """Π(x) = min(max(x, low), high): the box low ≤ x ≤ high (numbers, or tensors that
    broadcast against x, e.g. a pixel range [0, 1])."""

    def __init__(self, low=-math.inf, high=math.inf):
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not low < high:
            raise ValueError(f"Box needs low < high, got low={low}, high={high}.")
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device)
        return torch.minimum(torch.maximum(x, low), high)

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far x lies outside the box (0 inside)."""
        return (x - self(x)).flatten(1).norm(dim=1)

    def __repr__(self) -> str:
        return f"Box(low={self.low}, high={self.high})"


class L2Ball:
    """Π(x) = c + (x − c) · min(1, r / ‖x − c‖₂), per sample: the ball ‖x − c‖₂ ≤ r around the
    center c (default 0; shape of x, e.g. the clean images of an attack) with radius r (a number
    or one per sample)."""

    def __init__(self, radius, center: Optional[torch.Tensor] = None):
        if isinstance(radius, torch.Tensor):
            if radius.dim() != 1 or not bool((radius >= 0).all()):
                raise ValueError("L2Ball's radius tensor must hold one radius ≥ 0 per sample, "
                                 f"shape (batch,); got shape {tuple(radius.shape)}.")
        else:
            check_range(radius, "radius", low=0)
        if center is not None:
            check_tensor(center, "center")
        self.radius, self.center = radius, center

    def _offset(self, x: torch.Tensor) -> torch.Tensor:
        if self.center is not None and self.center.shape != x.shape:
            raise ValueError(f"L2Ball's center has shape {tuple(self.center.shape)}, x has shape "
                             f"{tuple(x.shape)}; they must match.")
        return x if self.center is None else x - self.center

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = self._offset(x)
        norm = d.flatten(1).norm(dim=1)
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        factor = torch.clamp(r / norm.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)
        d = d * factor.reshape(-1, *[1] * (x.dim() - 1))
        return d if self.center is None else self.center + d

    def violation(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample, how far x lies outside the ball (0 inside)."""
        r = torch.as_tensor(self.radius, dtype=x.dtype, device=x.device)
        return (self._offset(x).flatten(1).norm(dim=1) - r).clamp_min(0)

    def __repr__(self) -> str:
        return f"L2Ball(radius={self.radius}, center={'0' if self.center is None else 'given'})"


def _identity(x):
    return x


# ---------------------------------------------------------------------------- the record

@dataclass
class Snapshot:
    """x as it was after ``iteration`` iterations (or outer steps), with the work spent so far."""
    iteration: int
    f_evals: int
    vjps: int
    seconds: float
    x: torch.Tensor

    @property
    def evaluations(self) -> int:
        return self.f_evals + self.vjps


@dataclass
class InputOptStats:
    """The record of one input optimization, JIIO or nested, per iteration (JIIO) or per outer
    step (nested).

    Attributes:
        method: ``"jiio/damped"``, ``"jiio/anderson"`` or ``"nested/<optimizer>"``.
        iterations: JIIO iterations, or nested outer steps.
        f_evals, vjps: evaluations of f and vector–Jacobian products through f, counted apart
            (a VJP costs about as much as an evaluation; ``evaluations`` is their sum).
        objective: ``(iterations, batch)`` ℓ(z, x) at each iterate (for nested, at the solved z*;
            for JIIO at the current z, which is only near z*(x): use ``objective_at`` on the
            ``snapshots`` to compare methods fairly).
        evaluations_at, seconds_at: ``(iterations,)`` work and wall time spent up to each iterate.
        primal, adjoint, stationarity: ``(iterations, batch)`` KKT residuals (JIIO only, else
            None): ‖f(z, x) − z‖/‖f(z, x)‖, ‖J_zᵀμ + ∇_zℓ − μ‖/‖J_zᵀμ + ∇_zℓ‖, and the norm of
            the gradient mapping ‖x − Π(x − α ∇_x L)‖ / α (= ‖∇_x L‖ without constraints).
        converged: ``(batch,)`` all three below tolerance (JIIO); None for nested.
        best_iteration: ``(batch,)`` the iterate returned, per sample.
        snapshots: x every ``record_every`` iterations (and the last), for ``objective_at``.
        wall_time: seconds.
    """

    method: str
    iterations: int
    f_evals: int
    vjps: int
    objective: torch.Tensor
    evaluations_at: torch.Tensor
    seconds_at: torch.Tensor
    best_iteration: torch.Tensor
    wall_time: float
    primal: Optional[torch.Tensor] = None
    adjoint: Optional[torch.Tensor] = None
    stationarity: Optional[torch.Tensor] = None
    converged: Optional[torch.Tensor] = None
    snapshots: list = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return self.f_evals + self.vjps

    def final(self, trace: torch.Tensor) -> torch.Tensor:
        """Per sample, the value of a ``(iterations, batch)`` trace at the returned iterate."""
        return trace.gather(0, self.best_iteration[None]).squeeze(0)

    def __repr__(self) -> str:
        done = "" if self.converged is None else \
            f", converged {int(self.converged.sum())}/{self.converged.numel()}"
        return (f"InputOptStats({self.method}: {self.iterations} iterations, {self.f_evals} f "
                f"evaluations + {self.vjps} VJPs{done}, mean objective "
                f"{self.final(self.objective).mean().item():.4g}, {self.wall_time:.2f} s)")


class _Recorder:
    """Bookkeeping shared by jiio and nested: traces, counters, snapshots, the per-sample best."""

    def __init__(self, record_every: int):
        check_range(record_every, "record_every", low=0, integer=True)
        self.record_every, self.start = record_every, time.perf_counter()
        self.f_evals = self.vjps = 0
        self.objective, self.evaluations_at, self.seconds_at, self.snapshots = [], [], [], []

    def record(self, objective: torch.Tensor, x: torch.Tensor) -> None:
        self.objective.append(objective.detach())
        self.evaluations_at.append(self.f_evals + self.vjps)
        self.seconds_at.append(time.perf_counter() - self.start)
        k = len(self.objective)
        if self.record_every and (k - 1) % self.record_every == 0:
            self.snapshot(x, k)

    def snapshot(self, x: torch.Tensor, k: int) -> None:
        self.snapshots.append(Snapshot(k, self.f_evals, self.vjps,
                                       time.perf_counter() - self.start, x.detach().clone()))

    def stats(self, method: str, best_iteration: torch.Tensor, x_last: torch.Tensor,
              **kkt) -> InputOptStats:
        if self.record_every and (not self.snapshots or self.snapshots[-1].iteration
                                  != len(self.objective)):
            self.snapshot(x_last, len(self.objective))
        return InputOptStats(
            method=method, iterations=len(self.objective), f_evals=self.f_evals, vjps=self.vjps,
            objective=torch.stack(self.objective), evaluations_at=torch.tensor(self.evaluations_at),
            seconds_at=torch.tensor(self.seconds_at), best_iteration=best_iteration,
            wall_time=time.perf_counter() - self.start, snapshots=self.snapshots, **kkt)


# ---------------------------------------------------------------------------- JIIO

@dataclass
class JIIOResult:
    """``x``: the optimized inputs, ``z``: their equilibrium states, ``adjoint``: μ (flat,
    (batch, D)), ``stats``: the record. Each is, per sample, the best iterate seen."""
    x: torch.Tensor
    z: object
    adjoint: torch.Tensor
    stats: InputOptStats


def _cell_map(deq: nn.Module, encode: Callable, x: torch.Tensor, z0=None):
    """``(f, z0_flat, spec)``: f(z_flat, x) = flat cell(z, inject(encode(x))) (the injection
    recomputed for every x), the flat starting state (z0, or the cell's ``init_state`` at x) and
    the spec of the state's shape."""
    cell = deq.cell
    with torch.no_grad():
        z0_flat, spec = flatten_state(cell.init_state(cell.inject(encode(x))) if z0 is None
                                      else z0, "z0")

    def f(z_flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = unflatten_state(z_flat, spec)
        return flatten_state(cell(z, cell.inject(encode(x))), check=False)[0]
    return f, z0_flat, spec


def augmented_map(f: Callable, loss: Loss, z: torch.Tensor, mu: torch.Tensor, x: torch.Tensor,
                  step_size: float, project: Callable):
    """JIIO's T(z, μ, x) for one iterate, with ONE evaluation of f and ONE reverse pass: the
    gradient of (f(z, x) · μ).sum() + ℓ(z, x).sum() with respect to (z, x) is
    (J_zᵀμ + ∇_zℓ, J_xᵀμ + ∇_xℓ). Returns (f(z, x), J_zᵀμ + ∇_zℓ, Π(x − α (J_xᵀμ + ∇_xℓ)),
    ℓ(z, x)), all detached."""
    with torch.enable_grad():
        z_in, x_in = z.detach().requires_grad_(), x.detach().requires_grad_()
        fz = f(z_in, x_in)
        objective = loss(z_in, x_in)
        adjoint, grad_x = torch.autograd.grad((fz * mu).sum() + objective.sum(), (z_in, x_in))
    with torch.no_grad():
        return fz.detach(), adjoint, project(x - step_size * grad_x), objective.detach()


def _check_problem(deq, x0, loss, encode, projection):
    if not (isinstance(deq, nn.Module) and hasattr(deq, "cell")):
        raise TypeError(f"expected a deqlite.DEQ (a module with .cell), got {type(deq).__name__}.")
    check_tensor(x0, "x0")
    for name, fn in (("loss", loss), ("encode", encode), ("projection", projection)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")


def _objective(loss: Loss, z, x: torch.Tensor) -> torch.Tensor:
    value = loss(z, x)
    if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss(z, x) must return one value per sample, shape ({x.shape[0]},); "
                         f"got {got}. Sum over the other dimensions, not over the batch.")
    return value


JIIO_SOLVERS = ("damped", "anderson")


@strict_options
def jiio(deq: nn.Module, x0: torch.Tensor, loss: Loss, *, step_size: float,
         solver: str = "anderson", projection: Optional[Callable] = None,
         encode: Optional[Callable] = None, tol: float = 1e-4, grad_tol: float = 1e-4,
         max_iter: int = 200, z_damping: float = 1.0, adjoint_damping: float = 1.0,
         m: int = 5, beta: float = 1.0, lam: float = 1e-4, safeguard: float = 1.0, z0=None,
         record_every: int = 0, callback: Optional[Callable] = None) -> JIIOResult:
    """Minimize ``loss(z*, x)`` over x per sample, z* the equilibrium of ``deq`` at input
    ``encode(x)``, by one fixed point over (z, μ, x) (see the module docstring).

    Args:
        deq: a ``deqlite.DEQ`` (its cell is used; its own solver settings are not).
        x0: starting inputs (batch, ...); projected onto C first.
        loss: ``loss(z, x) -> (batch,)``, one objective per sample (z in the cell's state shape).
        step_size: α, the step on x.
        solver: ``"anderson"`` (joint Anderson acceleration) or ``"damped"`` iteration.
        projection: Π_C, e.g. ``Box(0, 1)`` or ``L2Ball(eps, center=x_clean)``; None: no constraint.
        encode: maps x to the DEQ's input (e.g. a classifier's stem); default the identity.
        tol: bound on the primal and adjoint residuals (relative, as the solvers' ``stop="rel"``).
        grad_tol: bound on the gradient mapping's norm (absolute: in units of ∇_x ℓ).
        max_iter: iteration budget (each one f evaluation + one VJP).
        z_damping, adjoint_damping: a and b of the damped iteration (``solver="damped"`` only).
        m, beta, lam: Anderson's history size, mixing and regularizer (``solvers.anderson``).
        safeguard: Anderson only: a sample whose KKT merit (its largest residual over its
            tolerance) rose above ``safeguard`` × the previous iterate's takes the damped step
            next instead of the extrapolated one (0: never). Without it joint Anderson can stall
            on ill-conditioned input problems (see ``benchmarks/README.md``).
        z0: starting state (default the cell's ``init_state``); μ starts at 0.
        record_every: keep a snapshot of x every this many iterations (0: none).
        callback: called after each iteration as ``callback(k, primal, adjoint, stationarity)``
            with that iterate's three residuals, per sample.

    Returns a ``JIIOResult``; a sample is ``converged`` when all three residuals are within
    tolerance, and it stops changing from then on.
    """
    _check_problem(deq, x0, loss, encode, projection)
    lookup(JIIO_SOLVERS, solver, "JIIO solver")
    check_range(step_size, "step_size", low=0, low_open=True)
    check_range(tol, "tol", low=0, low_open=True)
    check_range(grad_tol, "grad_tol", low=0, low_open=True)
    check_range(max_iter, "max_iter", low=1, integer=True)
    check_range(z_damping, "z_damping", low=0, high=1, low_open=True)
    check_range(adjoint_damping, "adjoint_damping", low=0, high=1, low_open=True)
    check_range(safeguard, "safeguard", low=0)
    encode = encode or _identity
    project = projection or _identity
    x = project(x0.detach())
    f, z, spec = _cell_map(deq, encode, x, z0)

    def flat_loss(z_flat, x):
        return _objective(loss, unflatten_state(z_flat, spec), x)
    mu = torch.zeros_like(z)
    sizes = (z.shape[1], mu.shape[1], x[0].numel())
    batch = x.shape[0]
    mixer = AndersonMixer(batch, sum(sizes), m=m, beta=beta, lam=lam, like=z) \
        if solver == "anderson" else None
    damping = torch.cat([torch.full((sizes[0],), z_damping), torch.full((sizes[1],), adjoint_damping),
                         torch.ones(sizes[2])]).to(z)
    rec = _Recorder(record_every)
    primal_t, adjoint_t, stat_t = [], [], []
    done = torch.zeros(batch, dtype=torch.bool, device=z.device)
    best_merit = torch.full((batch,), math.inf, dtype=z.dtype, device=z.device)
    best = (z, mu, x)
    best_iteration = torch.zeros(batch, dtype=torch.long, device=z.device)
    for k in range(max_iter):
        fz, adj, x_next, obj = augmented_map(f, flat_loss, z, mu, x, step_size, project)
        rec.f_evals += 1
        rec.vjps += 1
        with torch.no_grad():
            primal = (fz - z).norm(dim=1) / (fz.norm(dim=1) + EPS)
            adjoint = (adj - mu).norm(dim=1) / (adj.norm(dim=1) + EPS)
            stationarity = (x - x_next).flatten(1).norm(dim=1) / step_size
            merit = torch.maximum(torch.maximum(primal, adjoint) / tol, stationarity / grad_tol)
            better = ~done & (merit < best_merit)
            best_merit = torch.where(better, merit, best_merit)
            best_iteration = torch.where(better, k, best_iteration)
            best = _where_state(better, [z, mu, x], best)
            done = done | (merit <= 1)
        for trace, value in ((primal_t, primal), (adjoint_t, adjoint), (stat_t, stationarity)):
            trace.append(value)
        rec.record(obj, x)
        if callback is not None:
            callback(k + 1, primal, adjoint, stationarity)
        if bool(done.all()):
            break
        with torch.no_grad():                            # the step on w = (z, μ, x)
            w = torch.cat([z, mu, x.flatten(1)], dim=1)
            Tw = torch.cat([fz, adj, x_next.flatten(1)], dim=1)
            w_damped = w + damping * (Tw - w)
            if mixer is None:
                w_next = w_damped
            else:
                w_next = mixer.step(w, Tw, done)
                if safeguard and k > 0:          # merit rose: a damped step for that sample
                    rose = merit > safeguard * previous_merit
                    w_next = torch.where(rose[:, None], w_damped, w_next)
            previous_merit = merit
            w_next = torch.where(done[:, None], w, w_next)
            z, mu, x_flat = w_next.split(sizes, dim=1)
            x = project(x_flat.reshape(x.shape))
    z_best, mu_best, x_best = best
    stats = rec.stats(f"jiio/{solver}", best_iteration, x,
                      primal=torch.stack(primal_t), adjoint=torch.stack(adjoint_t),
                      stationarity=torch.stack(stat_t), converged=done)
    return JIIOResult(x=x_best, z=unflatten_state(z_best, spec), adjoint=mu_best, stats=stats)


# ---------------------------------------------------------------------------- nested baseline

OPTIMIZERS = ("sgd", "adam", "normalized", "lbfgs")


@strict_options
def nested(deq: nn.Module, x0: torch.Tensor, loss: Loss, *, lr: float, steps: int,
           optimizer: str = "adam", projection: Optional[Callable] = None,
           encode: Optional[Callable] = None, warm_start: bool = True,
           record_every: int = 0, callback: Optional[Callable] = None):
    """The baseline JIIO is measured against: at every step, solve the equilibrium z*(x) to the
    DEQ's own tolerance (forward solve), take ∇_x ℓ(z*(x), x) by the IFT backward (adjoint solve),
    then step x with ``optimizer`` and project.

    Optimizers: ``"sgd"`` (x ← x − lr·g), ``"adam"`` (torch's Adam, elementwise so per sample),
    ``"normalized"`` (x ← x − lr·g/‖g‖ per sample: L2 PGD's step), ``"lbfgs"`` (torch's L-BFGS with
    a strong-Wolfe line search, on the summed objective; no projection; each step may evaluate
    several times: the reference optimum). ``warm_start`` starts each forward solve from the last
    z*. Returns ``(x, z, stats)`` with x the best iterate per sample and ``stats`` an
    ``InputOptStats``; evaluations count every forward solve's NFE plus the application of f that
    carries the graph, VJPs every adjoint NFE plus the final pass to x.
    """
    _check_problem(deq, x0, loss, encode, projection)
    lookup(OPTIMIZERS, optimizer, "optimizer")
    check_range(lr, "lr", low=0, low_open=True)
    check_range(steps, "steps", low=1, integer=True)
    if optimizer == "lbfgs" and projection is not None:
        raise ValueError("optimizer='lbfgs' takes no projection; use 'adam', 'sgd' or 'normalized'.")
    encode = encode or _identity
    project = projection or _identity
    x = project(x0.detach()).clone().requires_grad_()
    rec = _Recorder(record_every)
    shape = (-1, *[1] * (x.dim() - 1))
    best = dict(objective=None, x=None, z=None, iteration=None)
    state = dict(z=None, objective=None, step=0)

    def evaluate() -> torch.Tensor:     # the objective and ∇_x at the current x; keep the best
        z = deq(encode(x), z0=state["z"] if warm_start else None)
        obj = _objective(loss, z, x)
        x.grad = None
        obj.sum().backward()
        rec.f_evals += deq.forward_stats.nfe + 1
        rec.vjps += (deq.backward_stats.nfe if deq.backward_stats is not None else 0) + 1
        with torch.no_grad():
            z, obj = _detach_state(z), obj.detach()
            if best["objective"] is None:
                best.update(objective=obj, x=x.detach().clone(), z=z,
                            iteration=torch.full_like(obj, state["step"], dtype=torch.long))
            else:
                better = obj < best["objective"]
                best.update(objective=torch.where(better, obj, best["objective"]),
                            x=_where_state(better, x.detach(), best["x"]),
                            z=_where_state(better, z, best["z"]),
                            iteration=torch.where(better, state["step"], best["iteration"]))
        state.update(z=z, objective=obj)
        return obj.sum()

    if optimizer == "adam":
        opt = torch.optim.Adam([x], lr=lr)
    elif optimizer == "lbfgs":    # one L-BFGS iteration per step, its line search up to 25 calls
        opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, max_eval=25, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")
    for k in range(steps):
        state["step"] = k
        if optimizer == "lbfgs":
            opt.step(evaluate)
        else:
            evaluate()
        rec.record(state["objective"], x)
        if callback is not None:
            callback(k + 1, state["objective"])
        if optimizer == "lbfgs":
            continue
        with torch.no_grad():
            if optimizer == "adam":
                opt.step()
            elif optimizer == "sgd":
                x -= lr * x.grad
            else:
                norm = x.grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
                x -= lr * x.grad / norm.reshape(shape)
            x.copy_(project(x))
    stats = rec.stats(f"nested/{optimizer}", best["iteration"], x)
    return best["x"], best["z"], stats


def _detach_state(z):
    return z.detach() if isinstance(z, torch.Tensor) else [t.detach() for t in z]


def _where_state(mask, new, old):
    """Per sample (``mask``: (batch,)), ``new`` where true, ``old`` elsewhere; tensors of any
    shape (batch, ...) or lists of them."""
    if isinstance(new, torch.Tensor):
        return torch.where(mask.reshape(-1, *[1] * (new.dim() - 1)), new, old)
    return [_where_state(mask, n, o) for n, o in zip(new, old)]


# ---------------------------------------------------------------------------- evaluation, training

def objective_at(deq: nn.Module, x: torch.Tensor, loss: Loss, *,
                 encode: Optional[Callable] = None) -> torch.Tensor:
    """ℓ(z*(x), x) per sample, with z* solved by the DEQ's own forward solve: the true objective
    of an input, for comparing methods fairly (not counted as work)."""
    encode = encode or _identity
    with torch.no_grad():
        return _objective(loss, deq(encode(x)), x)


def attach(deq: nn.Module, result: JIIOResult, *, encode: Optional[Callable] = None,
           scale: float = 1.0):
    """z = f(z*, x*) with a graph to the DEQ's parameters (x* detached), for training with JIIO in
    the loop: backpropagating a loss through z solves the adjoint g = Jᵀg + ∂ℓ/∂z with the DEQ's
    backward settings, warm-started from ``scale`` · μ* (μ* solves it for ℓ summed over the batch;
    pass ``scale=1/batch`` for a batch mean). The gradient is the IFT one, warm-started, whatever
    the DEQ's ``backward`` rule, except ``"neumann"``, whose truncated series is summed from
    ∂ℓ/∂z as usual (no warm start). Returns z in the cell's state shape."""
    encode = encode or _identity
    x = result.x.detach()
    f, z0, spec = deq.fixed_point_map(encode(x), result.z)
    z = deq._attach_adjoint(z0.detach(), f, adjoint0=scale * result.adjoint.detach())
    return unflatten_state(z, spec)
