"""`DEQ`: a cell, a solver and a gradient rule, as one ``nn.Module``.

Forward (no graph kept):      z* = f(z*, x),  found by a fixed-point solver from z0.

Backward, ``backward="ift"`` (implicit function theorem; Bai, Kolter, Koltun 2019).
Differentiating z* = f(z*, x) gives dz*/dθ = (I − J)⁻¹ ∂f/∂θ with J = ∂f/∂z at z*. For a loss ℓ,

    ∂ℓ/∂θ = gᵀ ∂f(z*, x)/∂θ,   where the adjoint g solves   g = Jᵀ g + ∂ℓ/∂z*,

itself a fixed point, solved with any of the solvers using vector–Jacobian products (Jᵀ g is
one ``autograd.grad`` call). Memory is that of a single application of f, whatever the number of
iterations. In code: after the solve we apply f once more with a graph, z = f(z*, x), and a hook
on z replaces the incoming gradient ∂ℓ/∂z* by g; autograd then computes gᵀ ∂f/∂θ and gᵀ ∂f/∂x.

The gradient shortcuts replace the exact adjoint g = (I − Jᵀ)⁻¹ ∂ℓ/∂z* by a cheaper one. They are
good when the spectral radius ρ(J) is well below 1 and degrade as it approaches 1 (notebook 09):

* ``backward="jfb"`` (Jacobian-free backprop; Fung et al., AAAI 2022): drop (I − Jᵀ)⁻¹, i.e.
  g = ∂ℓ/∂z*, and backpropagate through the single application z = f(z*, x):
  ∂ℓ/∂θ ≈ (∂ℓ/∂z*)ᵀ ∂f(z*, x)/∂θ. No adjoint solve; the cost of one step of an explicit net.
* ``backward="neumann"``, ``backward_options={"k": k}``: the first k terms of the Neumann series
  (I − Jᵀ)⁻¹ = Σ_i (Jᵀ)ⁱ, i.e. g = Σ_{i<k} (Jᵀ)ⁱ ∂ℓ/∂z* (k − 1 vector–Jacobian products in the
  hook, the same one as IFT's, plus autograd's own through f). Its error is Σ_{i≥k} (Jᵀ)ⁱ ∂ℓ/∂z*,
  of size ~ρᵏ/(1 − ρ). k = 1 is JFB; k → ∞ is IFT when ρ(J) < 1.
* ``backward="phantom"``, ``backward_options={"k": k, "tau": τ}`` (unrolling-based phantom
  gradient; Geng et al., NeurIPS 2021): from z₀ = z* (detached) take k damped steps with a graph,

      z_{j+1} = (1 − τ) z_j + τ f(z_j, x),   output z_k,

  and backpropagate through them. At z* this gives ∂ℓ/∂θ ≈ (∂ℓ/∂z*)ᵀ A ∂f/∂θ with
  A = τ Σ_{j<k} ((1 − τ) I + τ J)ʲ → (I − J)⁻¹ as k → ∞ whenever the damped map contracts.
  k = 1, τ = 1 is JFB; τ = 1 is the Neumann series (with J taken along the k steps).

Backward, ``backward="unrolled"``: the solver runs with autograd recording every iteration, and
backpropagation goes through all of them (memory grows with the number of iterations). It is
here to compare against.

Warm-up (as the DEQ papers pretrain): with ``deq.pretrain_steps = k > 0`` the forward pass instead
applies the cell exactly k times from z0 and backpropagates through them, a shallow weight-tied
network (no solve, so ``forward_stats`` stays None); set it back to 0 to switch to the
equilibrium solve.

Jacobian regularization (Bai, Koltun, Kolter, ICML 2021): with ``deq.jac_probes = M > 0``, a
forward pass that builds a graph also sets ``deq.jac_loss``, the batch mean of the Hutchinson
estimate of ‖J_f(z*)‖²_F / d from M probes (``deqlite.jacobian``; ``deq.jac_probe_kind`` is
``"gaussian"`` or ``"rademacher"``), differentiable in the
parameters with z* held fixed; add ``γ · deq.jac_loss`` to the loss. Otherwise ``jac_loss`` is None.

After each call, ``deq.forward_stats`` holds the forward solve's ``SolverStats`` (None while
pretraining). ``deq.backward_stats`` holds what the gradient rule spent on the gradient:

* ``ift``: the adjoint solve's ``SolverStats``, set once ``.backward()`` has run.
* ``neumann``: set once ``.backward()`` has run, a ``SolverStats`` with ``solver="neumann"`` that
  reads like k steps of forward iteration on g = Jᵀ g + ∂ℓ/∂z* from g = 0 (``tol=0``):
  ``nfe = k`` (the first step, Jᵀ0 = 0, is free: k − 1 products), row j of ``abs_residuals`` is
  ‖(Jᵀ)ʲ ∂ℓ/∂z*‖, the j-th term of the series (= the adjoint residual of the partial sum before
  it), ``rel_residuals`` that over the norm of the partial sum after it. Terms that do not
  shrink (``stats.diverged``) mean the series is not converging: ρ(J) ≥ 1.
* ``phantom``: set by the forward pass, ``solver="phantom"``, ``nfe = k``, row j the residual
  ‖f(z_j) − z_j‖ (and relative) of the j-th damped step.
* ``jfb`` and ``unrolled``: None (no extra evaluations beyond one application of f, or the
  solver's own recorded iterations).

The adjoint settings (``backward_solver``, ``backward_tol``, ...) only apply to ``ift``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ._validate import check_options, check_range, check_stop, check_tensor, did_you_mean, lookup
from .jacobian import hutchinson_frobenius
from .solvers import State, flatten_state, get_solver, unflatten_state
from .stats import EPS, SolverStats

BACKWARDS = {               # gradient rule -> the backward_options it takes, with their defaults
    "ift": {},
    "unrolled": {},
    "jfb": {},
    "phantom": {"k": 5, "tau": 0.5},
    "neumann": {"k": 5},
}
ON_FAIL = ("warn", "raise", "ignore")


def _tensors(state) -> list:
    return [state] if isinstance(state, torch.Tensor) else list(state)


def check_backward_options(rule: str, options: Optional[Mapping[str, Any]] = None) -> dict:
    """The options of gradient rule ``rule`` with defaults filled in, validated: an unknown
    option is a TypeError naming the valid ones, a value out of range a ValueError.
    ``k`` (steps or terms) is an integer ≥ 1, ``tau`` (damping) lies in (0, 1]."""
    lookup(BACKWARDS, rule, "backward rule")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"backward_options must be a dict such as {{'k': 5}}, got "
                        f"{type(options).__name__}.")
    defaults = BACKWARDS[rule]
    for key in options:
        if key in defaults:
            continue
        if not defaults:
            extra = (" Its adjoint solve is set by backward_solver, backward_tol, backward_max_iter "
                     "and backward_solver_options." if rule == "ift" else "")
            raise TypeError(f"backward {rule!r} takes no backward_options, got {key!r}.{extra}")
        raise TypeError(f"backward {rule!r} got an unknown option {key!r}."
                        f"{did_you_mean(str(key), defaults)} Valid options: {', '.join(defaults)}.")
    merged = {**defaults, **options}
    if "k" in merged:
        check_range(merged["k"], f"backward_options['k'] of {rule!r}", low=1, integer=True)
    if "tau" in merged:
        check_range(merged["tau"], f"backward_options['tau'] of {rule!r}", low=0, high=1,
                    low_open=True)
    return merged


def neumann_series(vjp, v: torch.Tensor, k: int) -> tuple[torch.Tensor, SolverStats]:
    """g = Σ_{i<k} (Jᵀ)ⁱ v with ``vjp(y) = Jᵀ y``: k − 1 products, each term from the last.
    Also returns the record described in the module docstring (row j: the j-th term's norm)."""
    start = time.perf_counter()
    g, term, abs_res, rel_res = torch.zeros_like(v), v, [], []
    for i in range(k):
        if i:
            term = vjp(term)                                   # (Jᵀ)ⁱ v from (Jᵀ)ⁱ⁻¹ v
        g = g + term
        abs_res.append(term.detach().flatten(1).norm(dim=1))
        rel_res.append(abs_res[-1] / (g.detach().flatten(1).norm(dim=1) + EPS))
    return g, _fixed_count_stats("neumann", abs_res, rel_res, start)


def _fixed_count_stats(name: str, abs_res: list, rel_res: list, start: float) -> SolverStats:
    """A ``SolverStats`` for a fixed number of steps (tol = 0: nothing was asked to converge)."""
    abs_res, rel_res = torch.stack(abs_res), torch.stack(rel_res)
    return SolverStats(solver=name, nfe=len(abs_res), abs_residuals=abs_res,
                       rel_residuals=rel_res, converged=torch.zeros_like(abs_res[-1], dtype=torch.bool),
                       final_abs=abs_res[-1], final_rel=rel_res[-1], tol=0.0, stop="abs",
                       wall_time=time.perf_counter() - start)


class DEQConvergenceWarning(RuntimeWarning):
    """A forward or adjoint solve stopped before every sample reached the tolerance."""


class DEQConvergenceError(RuntimeError):
    """Raised instead of the warning when ``on_fail="raise"``."""


class DEQ(nn.Module):
    """Deep equilibrium model around a cell with ``inject(x)``, ``init_state(inj)`` and
    ``forward(z, inj)`` (see ``deqlite.cells``).

    Args:
        cell: the weight-tied, input-injected layer f.
        solver: forward solver name (``"forward_iteration"``, ``"anderson"``, ``"broyden"``).
        tol, max_iter, stop: the forward solve's stopping rule (see ``deqlite.solvers``);
            ``tol=0`` runs exactly ``max_iter`` iterations (and does not warn).
        solver_options: extra options of the forward solver, e.g. ``{"m": 6, "beta": 1.0}``.
        backward: the gradient rule (see the module docstring): ``"ift"`` (implicit
            differentiation), ``"jfb"``, ``"phantom"``, ``"neumann"`` (shortcuts) or
            ``"unrolled"`` (backprop through the solver).
        backward_options: the rule's own options: ``{"k": 5, "tau": 0.5}`` for ``"phantom"``
            (damped steps, damping), ``{"k": 5}`` for ``"neumann"`` (terms); those are the
            defaults. The other rules take none. An unknown option is an error.
        backward_solver, backward_tol, backward_max_iter, backward_solver_options: the adjoint
            solve's settings (``"ift"`` only); each defaults to the forward one's.
        on_fail: what to do when a solve does not converge: ``"warn"`` (default), ``"raise"``,
            ``"ignore"``. The message carries the residual trace and what to try.
    """

    def __init__(self, cell: nn.Module, *, solver: str = "anderson", tol: float = 1e-4,
                 max_iter: int = 50, stop: str = "rel",
                 solver_options: Optional[Mapping[str, Any]] = None, backward: str = "ift",
                 backward_options: Optional[Mapping[str, Any]] = None,
                 backward_solver: Optional[str] = None, backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None,
                 backward_solver_options: Optional[Mapping[str, Any]] = None,
                 on_fail: str = "warn"):
        super().__init__()
        for method in ("inject", "init_state", "forward"):
            if not callable(getattr(cell, method, None)):
                raise TypeError(f"cell {type(cell).__name__} has no {method}() method; a DEQ cell needs "
                                f"inject(x), init_state(injection) and forward(z, injection).")
        self.backward_options = check_backward_options(backward, backward_options)
        lookup(ON_FAIL, on_fail, "on_fail value")
        self.cell = cell
        self.backward_rule, self.on_fail = backward, on_fail
        self.forward_solve = self._solve_settings("solver", solver, tol, max_iter, stop, solver_options)
        same = backward_solver in (None, solver)
        self.backward_solve = self._solve_settings(
            "backward_solver", solver if backward_solver is None else backward_solver,
            tol if backward_tol is None else backward_tol,
            max_iter if backward_max_iter is None else backward_max_iter, stop,
            backward_solver_options if backward_solver_options is not None
            else (solver_options if same else None))
        self.forward_stats: Optional[SolverStats] = None
        self.backward_stats: Optional[SolverStats] = None
        self.pretrain_steps = 0
        self.jac_probes = 0
        self.jac_probe_kind = "gaussian"
        self.jac_loss: Optional[torch.Tensor] = None

    @staticmethod
    def _solve_settings(what, name, tol, max_iter, stop, options) -> dict:
        """Validate one solve's settings now, so a typo fails at construction, not mid-training."""
        fn = get_solver(name)
        options = dict(options or {})
        check_options(fn, options, f"{what} {name!r}")
        for key in ("tol", "max_iter", "stop", "callback"):
            if key in options:
                raise TypeError(f"pass {key!r} as DEQ's own argument, not inside {what}'s options.")
        check_range(tol, "tol", low=0)
        check_range(max_iter, "max_iter", low=1, integer=True)
        check_stop(stop)
        return dict(fn=fn, tol=tol, max_iter=max_iter, stop=stop, **options)

    @staticmethod
    def _run(settings: dict, f, z0):
        opts = dict(settings)
        return opts.pop("fn")(f, z0, **opts)

    def _check(self, stats: SolverStats, which: str) -> None:
        if stats.all_converged or self.on_fail == "ignore" or stats.tol == 0:
            return                      # tol = 0 asks for exactly max_iter steps: not a failure
        message = f"DEQ {which} solve did not converge.\n{stats.report()}"
        if self.on_fail == "raise":
            raise DEQConvergenceError(message)
        warnings.warn(message, DEQConvergenceWarning, stacklevel=3)

    def fixed_point_map(self, x: torch.Tensor, z0: Optional[State] = None):
        """``(f, z0_flat, spec)`` for the input x: the map f(z) = cell(z, inject(x)) on flat states
        (batch, D), the flat starting state, and the spec that ``unflatten_state`` needs to give
        a state its own shape(s) back (a cell may keep a list of tensors, e.g. one per scale).
        ``f.injection`` holds inject(x)."""
        check_tensor(x, "x")
        injection = self.cell.inject(x)
        z0_flat, spec = flatten_state(self.cell.init_state(injection) if z0 is None else z0, "z0")

        def f(z: torch.Tensor) -> torch.Tensor:
            return flatten_state(self.cell(unflatten_state(z, spec), injection), check=False)[0]

        f.injection = injection
        return f, z0_flat, spec

    def forward(self, x: torch.Tensor, z0: Optional[State] = None) -> State:
        """Return the equilibrium state z* for the batch x (warm-started from z0 if given)."""
        f, z0, spec = self.fixed_point_map(x, z0)
        self.forward_stats = self.backward_stats = self.jac_loss = None
        check_range(self.pretrain_steps, "pretrain_steps", low=0, integer=True)
        check_range(self.jac_probes, "jac_probes", low=0, integer=True)
        needs_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in _tensors(f.injection))
            or any(p.requires_grad for p in self.cell.parameters()))
        if self.pretrain_steps:     # warm-up: exactly k applications of f, backprop through them
            z = z0
            for _ in range(self.pretrain_steps):
                z = f(z)
        elif needs_grad and self.backward_rule == "unrolled":
            z, self.forward_stats = self._run(self.forward_solve, f, z0)
            self._check(self.forward_stats, "forward")
        else:
            with torch.no_grad():
                z, self.forward_stats = self._run(self.forward_solve, f, z0)
            self._check(self.forward_stats, "forward")
            if needs_grad:
                z = self._attach_gradient(z, f)
        if needs_grad and self.jac_probes:
            self._jacobian_loss_at(z, f)
        return unflatten_state(z, spec)

    def _jacobian_loss_at(self, z: torch.Tensor, f) -> None:
        """jac_loss = batch mean of the Hutchinson estimate of ‖J‖²_F / d at z (z held fixed).
        Its own application of f: the backward pass must not free the adjoint's graph."""
        z_in = z.detach().requires_grad_()
        self.jac_loss = hutchinson_frobenius(f(z_in), z_in, n_probes=self.jac_probes,
                                             kind=self.jac_probe_kind, create_graph=True).mean()

    def _attach_gradient(self, z_star: torch.Tensor, f) -> torch.Tensor:
        """The output z, with a graph that gives the rule's gradient (module docstring)."""
        if self.backward_rule == "phantom":
            return self._phantom(z_star, f)
        if self.backward_rule == "jfb":
            return f(z_star.detach())               # backprop through this one application only
        return self._attach_adjoint(z_star, f)

    def _phantom(self, z_star: torch.Tensor, f) -> torch.Tensor:
        """k damped steps z ← (1 − τ) z + τ f(z) from z* (detached), recorded by autograd."""
        k, tau = self.backward_options["k"], self.backward_options["tau"]
        start, abs_res, rel_res = time.perf_counter(), [], []
        z = z_star.detach()
        for _ in range(k):
            fz = f(z)
            with torch.no_grad():
                abs_res.append((fz - z).norm(dim=1))
                rel_res.append(abs_res[-1] / (fz.norm(dim=1) + EPS))
            z = z + tau * (fz - z) if tau != 1 else fz
        self.backward_stats = _fixed_count_stats("phantom", abs_res, rel_res, start)
        return z

    def _attach_adjoint(self, z_star: torch.Tensor, f,
                        adjoint0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = f(z*, x) with a graph to x, θ and z*, and a hook turning ∂ℓ/∂z into the adjoint g
        (``ift``: the solution of g = Jᵀ g + ∂ℓ/∂z*; ``neumann``: its truncated series).
        The one graph serves both: the adjoint's Jᵀ y are vector–Jacobian products through it
        (``retain_graph``), and autograd then takes gᵀ ∂f/∂θ and gᵀ ∂f/∂x through it too."""
        z_in = z_star.detach().requires_grad_()
        z = f(z_in)
        solving = []                  # non-empty while the hook's own Jᵀ y calls run through z

        def vjp(y):                                          # y ↦ Jᵀ y
            return torch.autograd.grad(z, z_in, y, retain_graph=True)[0]

        def adjoint_hook(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if grad is None or solving:     # no gradient, or our own vector–Jacobian product
                return grad
            solving.append(True)
            try:
                if self.backward_rule == "neumann":
                    g, self.backward_stats = neumann_series(vjp, grad, self.backward_options["k"])
                    return g
                g, self.backward_stats = self._run(self.backward_solve,
                                                   lambda y: vjp(y) + grad,   # y ↦ Jᵀ y + ∂ℓ/∂z*
                                                   torch.zeros_like(grad) if adjoint0 is None
                                                   else adjoint0)   # a warm start (deqlite.jiio)
            finally:
                solving.clear()
            self._check(self.backward_stats, "backward (adjoint)")
            return g

        z.register_hook(adjoint_hook)
        return z

    def extra_repr(self) -> str:
        fwd, bwd = self.forward_solve, self.backward_solve
        text = (f"solver={fwd['fn'].__name__}, tol={fwd['tol']:g}, max_iter={fwd['max_iter']}, "
                f"stop={fwd['stop']!r}, backward={self.backward_rule!r}")
        if self.backward_rule == "ift":
            return text + (f" (adjoint: {bwd['fn'].__name__}, tol={bwd['tol']:g}, "
                           f"max_iter={bwd['max_iter']})")
        options = ", ".join(f"{key}={value}" for key, value in self.backward_options.items())
        return text + (f" ({options})" if options else "")
