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
f and ℓ with weights (μ, 1) gives J_zᵀμ + ∇_zℓ and J_xᵀμ + ∇_xℓ together. Iterates are::

    damped:    z ← z + a (f − z),  μ ← μ + b (J_zᵀμ + ∇_zℓ − μ),  x ← Π_C(x − α ∇_x L)
    anderson:  Anderson acceleration (``solvers.AndersonMixer``) on the joint state, then Π_C on x
               (an extrapolated x may leave C); a sample whose KKT residuals grew takes the damped
               step instead (plain joint Anderson can stall, extrapolating x far out).

Neither the equilibrium nor the adjoint is solved exactly while x still moves, which is where the
saving comes from. Convergence is judged per sample on the three KKT residuals (see ``jiio``).

Training with JIIO inside the loop (a decoder with latent optimization, no encoder): by the
envelope theorem the gradient of Φ(θ) = min_x ℓ(z*(x, θ), x) is ∂ℓ(z*(x*, θ), x*)/∂θ with x*
detached (the term through x* is (dx*/dθ)ᵀ (J_xᵀμ + ∇_xℓ), 0 by stationarity): ``attach``.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ._checks import check_dtypes, check_parameters, check_start, flat_map
from ._validate import check_range, check_tensor, lookup, strict_options
from .projections import CheckedProjection
from .solvers import AndersonMixer, detach_state, flatten_state, unflatten_state, where_state
from .stats import DEQNonFiniteWarning, InputOptStats, Snapshot, residuals

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # (z, x) -> (batch,) objective


# ---------------------------------------------------------------------------- the record

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
    """The optimized inputs ``x``, their equilibrium states ``z``, μ (flat, (batch, D); None for
    ``nested``) and the record ``stats``; x, z and μ per sample the best iterate seen."""
    x: torch.Tensor
    z: object
    adjoint: Optional[torch.Tensor]
    stats: InputOptStats


def _cell_map(deq: nn.Module, encode: Callable, x: torch.Tensor, z0=None):
    """``(f, z0_flat, spec)``: f(z_flat, x) = flat cell(z, inject(encode(x))) (the injection
    recomputed for every x), the flat z0 (checked) or the cell's ``init_state`` at x, its spec."""
    cell = deq.cell
    with torch.no_grad():
        state = cell.init_state(cell.inject(encode(x)))
        z0_flat, spec = flatten_state(state if z0 is None else z0, "z0")
    if z0 is not None:
        check_start(z0, state)
    step = flat_map(cell, spec)
    return (lambda z_flat, x: step(z_flat, cell.inject(encode(x)))), z0_flat, spec


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
    if encode is None:
        check_dtypes(deq.cell, x0)
    return encode or nn.Identity(), CheckedProjection(projection)


def _objective(loss: Loss, z, x: torch.Tensor) -> torch.Tensor:
    value = loss(z, x)
    if not isinstance(value, torch.Tensor) or value.shape != (x.shape[0],):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss(z, x) must return one value per sample, shape ({x.shape[0]},); "
                         f"got {got}. Sum over the other dimensions, not over the batch.")
    return value


def _lost(*tensors: torch.Tensor) -> torch.Tensor:
    """Per sample (row), whether any of the tensors holds a NaN/inf value there."""
    return torch.stack([~torch.isfinite(t.unsqueeze(-1).flatten(1)).all(1) for t in tensors]).any(0)


class _JointTracker:
    """JIIO's per-sample bookkeeping (as ``_tracker.Tracker`` is the solvers'): the three KKT
    residuals of every iterate, its merit (the largest residual over its tolerance), convergence
    (merit ≤ 1; frozen then), the best iterate by merit, the samples gone NaN/inf (frozen too)."""

    def __init__(self, w: tuple, *, tol: float, grad_tol: float, step_size: float):
        z = w[0]
        self.tol, self.grad_tol, self.step_size = tol, grad_tol, step_size
        self.traces: dict[str, list] = dict(primal=[], adjoint=[], stationarity=[])
        self.done = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        self.merit = self.best_merit = z.new_full((z.shape[0],), math.inf)
        self.best, self.best_iteration = w, torch.zeros_like(self.done, dtype=torch.long)
        self.failed, self.failed_at = torch.zeros_like(self.done), torch.zeros_like(self.best_iteration)

    def lose(self, k: int, lost: torch.Tensor) -> None:
        """The samples ``lost`` ((batch,) bool) went NaN/inf at iteration k."""
        self.failed_at = torch.where(lost & ~self.done & ~self.failed, k, self.failed_at)
        self.failed = self.failed | (lost & ~self.done)

    @torch.no_grad()
    def judge(self, k: int, w: tuple, Tw: tuple, objective: torch.Tensor) -> tuple:
        """Record iterate k, w = (z, μ, x), from its image Tw = (f, J_zᵀμ + ∇_zℓ, Π(x − α∇_xL))."""
        self.lose(k, _lost(*Tw, objective))
        (z, mu, x), (fz, adj, x_next) = w, Tw
        primal, adjoint = residuals(fz, z)[1], residuals(adj, mu)[1]
        stationarity = (x - x_next).flatten(1).norm(dim=1) / self.step_size
        self.merit = torch.maximum(torch.maximum(primal, adjoint) / self.tol,
                                   stationarity / self.grad_tol)
        better = ~self.done & ~self.failed & (self.merit < self.best_merit)
        self.best_merit = torch.where(better, self.merit, self.best_merit)
        self.best_iteration = torch.where(better, k, self.best_iteration)
        self.best = where_state(better, list(w), self.best)
        self.done = self.done | (~self.failed & (self.merit <= 1))
        for name, value in zip(self.traces, (primal, adjoint, stationarity)):
            self.traces[name].append(value)
        return primal, adjoint, stationarity

    def warn_if_lost(self, cell: nn.Module, solver: str, step_size: float) -> None:
        """If samples went NaN/inf: an error for NaN/inf parameters, or else a warning, with advice."""
        if not bool(self.failed.any()):
            return
        check_parameters(cell, "JIIO went NaN/inf")
        lost = self.failed.nonzero().flatten().tolist()
        k = int(self.failed_at[lost].min())
        warnings.warn(
            f"JIIO (solver={solver!r}, step_size={step_size:g}) went NaN/inf for sample(s) "
            f"{', '.join(map(str, lost[:8]))}{' ...' * (len(lost) > 8)}, first at iteration {k + 1}"
            f"{' (the start: check the loss and encode at x0)' * (k == 0)}; they are returned at "
            f"their best iterate before it, not converged. Try a smaller step_size, solver='damped' "
            f"with z_damping and adjoint_damping < 1, a stronger regularizer of x in the loss, or a "
            f"projection that bounds x.", DEQNonFiniteWarning, stacklevel=4)


class _JointStep:
    """The step on w = (z, μ, x): damped, w + D (T(w) − w) with D = (a, b, 1) per block, or
    Anderson on the joint state with the safeguard (see ``jiio``); x projected after it."""

    def __init__(self, solver: str, sizes: tuple, like: torch.Tensor, *, z_damping: float,
                 adjoint_damping: float, m: int, beta: float, lam: float, safeguard: float):
        for name, value in dict(z_damping=z_damping, adjoint_damping=adjoint_damping).items():
            check_range(value, name, low=0, high=1, low_open=True)
        check_range(safeguard, "safeguard", low=0)
        self.sizes, self.safeguard, self.previous_merit = sizes, safeguard, None
        self.mixer = AndersonMixer(like.shape[0], sum(sizes), m=m, beta=beta, lam=lam, like=like) \
            if solver == "anderson" else None
        self.damping = torch.cat([torch.full((sizes[0],), z_damping),
                                  torch.full((sizes[1],), adjoint_damping),
                                  torch.ones(sizes[2])]).to(like)

    @torch.no_grad()
    def __call__(self, w: tuple, Tw: tuple, merit: torch.Tensor, done: torch.Tensor,
                 project: Callable) -> tuple:
        x = w[2]
        w_flat = torch.cat([w[0], w[1], x.flatten(1)], dim=1)
        Tw_flat = torch.cat([Tw[0], Tw[1], Tw[2].flatten(1)], dim=1)
        w_damped = w_flat + self.damping * (Tw_flat - w_flat)
        if self.mixer is None:
            w_next = w_damped
        else:
            w_next = self.mixer.step(w_flat, Tw_flat, done)
            if self.safeguard and self.previous_merit is not None:   # merit rose: damped step
                rose = merit > self.safeguard * self.previous_merit
                w_next = torch.where(rose[:, None], w_damped, w_next)
        self.previous_merit = merit
        w_next = torch.where(done[:, None], w_flat, w_next)
        lost = _lost(w_next)                    # an overflowing step: the sample stays at w
        z, mu, x_flat = torch.where(lost[:, None], w_flat, w_next).split(self.sizes, dim=1)
        return (z, mu, project(x_flat.reshape(x.shape))), lost


JIIO_SOLVERS = ("damped", "anderson")


@strict_options
def jiio(deq: nn.Module, x0: torch.Tensor, loss: Loss, *, step_size: float = 0.1,
         solver: str = "anderson", projection: Optional[Callable] = None,
         encode: Optional[Callable] = None, tol: float = 1e-4, grad_tol: float = 1e-4,
         max_iter: int = 200, z_damping: float = 1.0, adjoint_damping: float = 1.0,
         m: int = 5, beta: float = 1.0, lam: float = 1e-4, safeguard: float = 1.0, z0=None,
         record_every: int = 0, callback: Optional[Callable] = None) -> JIIOResult:
    """Minimize ``loss(z*, x) -> (batch,)`` over x per sample, z* the equilibrium of ``deq``'s
    cell (not its solver settings) at input ``encode(x)`` (default: x), by one fixed point over
    (z, μ, x) from (z0 or the cell's ``init_state``, 0, Π(x0)) (see the module docstring).

    ``step_size`` α: the step on x (too large, and z, μ cannot follow x). ``solver``: ``"anderson"``
    (joint Anderson, history ``m``, mixing ``beta``, regularizer ``lam``, as ``solvers.anderson``)
    or ``"damped"`` (a = ``z_damping``, b = ``adjoint_damping``). ``projection``: Π_C, e.g. ``Box(0, 1)``
    or ``L2Ball(eps, center=x_clean)``; None: unconstrained. ``tol`` bounds the relative primal
    and adjoint residuals, ``grad_tol`` the gradient mapping's norm ‖x − Π(x − α∇_xL)‖/α (in units
    of ∇_xℓ); a sample is converged, and frozen, when all three are within. ``max_iter``:
    iterations, each f + one VJP. ``safeguard`` (Anderson): a sample whose merit (its largest
    residual over its tolerance) rose above ``safeguard`` × the previous one takes the damped step
    instead (0: never; without it joint Anderson can stall on ill-conditioned problems,
    ``benchmarks/README.md``). ``record_every``: keep a snapshot of x every this many iterations.
    ``callback(k, primal, adjoint, stationarity)`` sees each iterate's residuals, per sample.
    A sample gone NaN/inf (a step size too large) is frozen at its last finite iterate and named in
    a ``DEQNonFiniteWarning``; a bad projection's output is an error (``CheckedProjection``).
    """
    lookup(JIIO_SOLVERS, solver, "JIIO solver")
    for name, value in dict(step_size=step_size, tol=tol, grad_tol=grad_tol).items():
        check_range(value, name, low=0, low_open=True)
    check_range(max_iter, "max_iter", low=1, integer=True)
    encode, project = _check_problem(deq, x0, loss, encode, projection)
    x = project(x0.detach())
    f, z, spec = _cell_map(deq, encode, x, z0)
    flat_loss = lambda z_flat, x: _objective(loss, unflatten_state(z_flat, spec), x)  # noqa: E731
    w = (z, torch.zeros_like(z), x)                     # (z, μ, x)
    step = _JointStep(solver, (z.shape[1], z.shape[1], math.prod(x.shape[1:])), z, z_damping=z_damping,
                      adjoint_damping=adjoint_damping, m=m, beta=beta, lam=lam, safeguard=safeguard)
    tracker = _JointTracker(w, tol=tol, grad_tol=grad_tol, step_size=step_size)
    rec = _Recorder(record_every)
    for k in range(max_iter):
        project.where = f"JIIO iteration {k + 1}"
        *Tw, objective = augmented_map(f, flat_loss, *w, step_size, project)
        rec.f_evals, rec.vjps = rec.f_evals + 1, rec.vjps + 1
        kkt = tracker.judge(k, w, Tw, objective)
        rec.record(objective, w[2])
        if callback is not None:
            callback(k + 1, *kkt)
        frozen = tracker.done | tracker.failed
        if bool(frozen.all()):
            break
        w, lost = step(w, Tw, tracker.merit, frozen, project)
        tracker.lose(k, lost)
    tracker.warn_if_lost(deq.cell, solver, step_size)
    z_best, mu_best, x_best = tracker.best
    stats = rec.stats(f"jiio/{solver}", tracker.best_iteration, w[2], converged=tracker.done,
                      **{name: torch.stack(trace) for name, trace in tracker.traces.items()})
    return JIIOResult(x=x_best, z=unflatten_state(z_best, spec), adjoint=mu_best, stats=stats)


# ---------------------------------------------------------------------------- nested baseline

INPUT_OPTIMIZERS = ("sgd", "adam", "normalized", "lbfgs")


class _BestInput:
    """Per sample, the input with the lowest objective seen so far, its state and iteration."""

    def __init__(self):
        self.objective = self.x = self.z = self.iteration = None

    @torch.no_grad()
    def update(self, objective: torch.Tensor, x: torch.Tensor, z, iteration: int) -> None:
        if self.objective is None:
            self.objective, self.x, self.z = objective, x.clone(), z
            self.iteration = torch.full_like(objective, iteration, dtype=torch.long)
            return
        better = objective < self.objective
        self.objective = torch.where(better, objective, self.objective)
        self.x, self.z = where_state(better, x, self.x), where_state(better, z, self.z)
        self.iteration = torch.where(better, iteration, self.iteration)


def _input_optimizer(name: str, x: torch.Tensor, lr: float):
    """torch's Adam, or L-BFGS with a strong-Wolfe line search (one iteration per step, up to 25
    evaluations); None for the steps taken by hand (sgd, normalized)."""
    if name == "adam":
        return torch.optim.Adam([x], lr=lr)
    if name == "lbfgs":
        return torch.optim.LBFGS([x], lr=lr, max_iter=1, max_eval=25, tolerance_grad=1e-12,
                                 tolerance_change=1e-15, line_search_fn="strong_wolfe")
    return None


@torch.no_grad()
def _descend(name: str, opt, x: torch.Tensor, lr: float, project: Callable) -> bool:
    """One step on x from its gradient (adam, sgd or normalized), then Π; True: x went NaN/inf."""
    before = x.clone()
    if name == "adam":
        opt.step()
    elif name == "sgd":
        x -= lr * x.grad
    else:
        norm = x.grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        x -= lr * x.grad / norm.reshape(-1, *[1] * (x.dim() - 1))
    lost = bool(_lost(x).any())
    x.copy_(before if lost else project(x))
    return lost


@strict_options
def nested(deq: nn.Module, x0: torch.Tensor, loss: Loss, *, lr: float, steps: int,
           optimizer: str = "adam", projection: Optional[Callable] = None,
           encode: Optional[Callable] = None, warm_start: bool = True,
           record_every: int = 0, callback: Optional[Callable] = None) -> JIIOResult:
    """The baseline JIIO is measured against: at every step, solve the equilibrium z*(x) to the
    DEQ's own tolerance (forward solve), take ∇_x ℓ(z*(x), x) by the IFT backward (adjoint solve),
    then step x with ``optimizer`` and project.

    Optimizers (``INPUT_OPTIMIZERS``): ``"sgd"`` (x ← x − lr·g), ``"adam"`` (torch's Adam,
    elementwise so per sample), ``"normalized"`` (x ← x − lr·g/‖g‖ per sample: L2 PGD's step),
    ``"lbfgs"`` (torch's L-BFGS with a strong-Wolfe line search, on the summed objective; no
    projection; each step may evaluate several times: the reference optimum). ``warm_start``
    starts each forward solve from the last z*. Returns a ``JIIOResult`` (x the best iterate per
    sample, ``adjoint`` None); evaluations count every forward solve's NFE plus the application
    of f that carries the graph, VJPs every adjoint NFE plus the final pass to x.
    """
    encode, project = _check_problem(deq, x0, loss, encode, projection)
    lookup(INPUT_OPTIMIZERS, optimizer, "optimizer")
    check_range(lr, "lr", low=0, low_open=True)
    check_range(steps, "steps", low=1, integer=True)
    if optimizer == "lbfgs" and projection is not None:
        raise ValueError("optimizer='lbfgs' takes no projection; use 'adam', 'sgd' or 'normalized'.")
    x = project(x0.detach()).clone().requires_grad_()
    rec, best, last = _Recorder(record_every), _BestInput(), dict(z=None, objective=None, step=0)

    def evaluate() -> torch.Tensor:     # the objective and ∇_x at the current x; keep the best
        z = deq(encode(x), z0=last["z"] if warm_start else None)
        objective = _objective(loss, z, x)
        x.grad = None
        objective.sum().backward()
        rec.f_evals += deq.forward_stats.nfe + 1
        rec.vjps += (deq.backward_stats.nfe if deq.backward_stats is not None else 0) + 1
        last.update(z=detach_state(z), objective=objective.detach())
        best.update(last["objective"], x.detach(), last["z"], last["step"])
        return objective.sum()

    opt = _input_optimizer(optimizer, x, lr)
    for k in range(steps):
        last["step"] = k
        opt.step(evaluate) if optimizer == "lbfgs" else evaluate()
        rec.record(last["objective"], x)
        if callback is not None:
            callback(k + 1, last["objective"])
        if optimizer != "lbfgs" and _descend(optimizer, opt, x, lr, project):
            warnings.warn(f"nested ({optimizer}, lr={lr:g}): step {k + 1} took x to NaN/inf; the best "
                          f"iterates before it are returned. Try a smaller lr.", DEQNonFiniteWarning, 3)
            break
    stats = rec.stats(f"nested/{optimizer}", best.iteration, x)
    return JIIOResult(x=best.x, z=best.z, adjoint=None, stats=stats)


# ---------------------------------------------------------------------------- evaluation, training

def objective_at(deq: nn.Module, x: torch.Tensor, loss: Loss, *,
                 encode: Optional[Callable] = None) -> torch.Tensor:
    """ℓ(z*(x), x) per sample, with z* solved by the DEQ's own forward solve: the true objective
    of an input, for comparing methods fairly (not counted as work)."""
    encode = encode or nn.Identity()
    with torch.no_grad():
        return _objective(loss, deq(encode(x)), x)


def attach(deq: nn.Module, result: JIIOResult, *, encode: Optional[Callable] = None,
           scale: float = 1.0):
    """z = f(z*, x*) with a graph to the DEQ's parameters (x* detached), for training with JIIO in
    the loop: backpropagating a loss through z solves the adjoint g = Jᵀg + ∂ℓ/∂z with the DEQ's
    adjoint settings (``deq.adjoint``, an ``IFT`` rule: ``deq.gradient`` itself for
    ``backward="ift"``, whatever the DEQ's rule otherwise), warm-started from ``scale`` · μ* (μ*
    solves it for ℓ summed over the batch; pass ``scale=1/batch`` for a batch mean). Its record
    is ``deq.adjoint.stats``. Returns z in the cell's state shape."""
    if result.adjoint is None:
        raise ValueError("attach needs JIIO's adjoint μ* (result.adjoint); a nested() result has "
                         "none: use jiio() for training with input optimization in the loop.")
    encode = encode or nn.Identity()
    m = deq.fixed_point_map(encode(result.x.detach()), result.z)
    z = deq.adjoint.attach(m.z0.detach(), m.f, adjoint0=scale * result.adjoint.detach())
    return m.unflatten(z)
