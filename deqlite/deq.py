"""`DEQ`: a cell, a solver and a gradient rule, as one ``nn.Module``.

Forward (no graph kept):      z* = f(z*, x),  found by a fixed-point solver from z0.

Backward, ``backward="ift"`` (implicit function theorem; Bai, Kolter, Koltun 2019).
Differentiating z* = f(z*, x) gives dz*/dθ = (I − J)⁻¹ ∂f/∂θ with J = ∂f/∂z at z*. For a loss ℓ,

    ∂ℓ/∂θ = gᵀ ∂f(z*, x)/∂θ,   where the adjoint g solves   g = Jᵀ g + ∂ℓ/∂z*,

itself a fixed point, solved with any of the solvers using vector–Jacobian products (Jᵀ g is
one ``autograd.grad`` call). Memory is that of a single application of f, whatever the number of
iterations. In code: after the solve we apply f once more with a graph, z = f(z*, x), and a hook
on z replaces the incoming gradient ∂ℓ/∂z* by g; autograd then computes gᵀ ∂f/∂θ and gᵀ ∂f/∂x.

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

After each call, ``deq.forward_stats`` holds the forward solve's ``SolverStats`` and, once
``.backward()`` has run, ``deq.backward_stats`` the adjoint solve's.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ._validate import check_options, check_range, check_stop, check_tensor, lookup
from .jacobian import hutchinson_frobenius
from .solvers import State, flatten_state, get_solver, unflatten_state
from .stats import SolverStats

BACKWARDS = ("ift", "unrolled")
ON_FAIL = ("warn", "raise", "ignore")


def _tensors(state) -> list:
    return [state] if isinstance(state, torch.Tensor) else list(state)


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
        backward: ``"ift"`` (implicit differentiation) or ``"unrolled"`` (backprop through the solver).
        backward_solver, backward_tol, backward_max_iter, backward_solver_options: the adjoint
            solve's settings; each defaults to the forward one's.
        on_fail: what to do when a solve does not converge: ``"warn"`` (default), ``"raise"``,
            ``"ignore"``. The message carries the residual trace and what to try.
    """

    def __init__(self, cell: nn.Module, *, solver: str = "anderson", tol: float = 1e-4,
                 max_iter: int = 50, stop: str = "rel",
                 solver_options: Optional[Mapping[str, Any]] = None, backward: str = "ift",
                 backward_solver: Optional[str] = None, backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None,
                 backward_solver_options: Optional[Mapping[str, Any]] = None,
                 on_fail: str = "warn"):
        super().__init__()
        for method in ("inject", "init_state", "forward"):
            if not callable(getattr(cell, method, None)):
                raise TypeError(f"cell {type(cell).__name__} has no {method}() method; a DEQ cell needs "
                                f"inject(x), init_state(injection) and forward(z, injection).")
        lookup(BACKWARDS, backward, "backward rule")
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
                z = self._attach_ift(z, f)
        if needs_grad and self.jac_probes:
            self._jacobian_loss_at(z, f)
        return unflatten_state(z, spec)

    def _jacobian_loss_at(self, z: torch.Tensor, f) -> None:
        """jac_loss = batch mean of the Hutchinson estimate of ‖J‖²_F / d at z (z held fixed).
        Its own application of f: the backward pass must not free the adjoint's graph."""
        z_in = z.detach().requires_grad_()
        self.jac_loss = hutchinson_frobenius(f(z_in), z_in, n_probes=self.jac_probes,
                                             kind=self.jac_probe_kind, create_graph=True).mean()

    def _attach_ift(self, z_star: torch.Tensor, f) -> torch.Tensor:
        """z = f(z*, x) with a graph to x, θ and z*, and a hook turning ∂ℓ/∂z into the adjoint g.
        The one graph serves both: the adjoint's Jᵀ y are vector–Jacobian products through it
        (``retain_graph``), and autograd then takes gᵀ ∂f/∂θ and gᵀ ∂f/∂x through it too."""
        z_in = z_star.detach().requires_grad_()
        z = f(z_in)
        solving = []                  # non-empty while the hook's own Jᵀ y calls run through z

        def adjoint_hook(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if grad is None or solving:     # no gradient, or our own vector–Jacobian product
                return grad
            def adjoint_map(y):                              # y ↦ Jᵀ y + ∂ℓ/∂z*
                return torch.autograd.grad(z, z_in, y, retain_graph=True)[0] + grad
            solving.append(True)
            try:
                g, self.backward_stats = self._run(self.backward_solve, adjoint_map,
                                                   torch.zeros_like(grad))
            finally:
                solving.clear()
            self._check(self.backward_stats, "backward (adjoint)")
            return g

        z.register_hook(adjoint_hook)
        return z

    def extra_repr(self) -> str:
        fwd, bwd = self.forward_solve, self.backward_solve
        return (f"solver={fwd['fn'].__name__}, tol={fwd['tol']:g}, max_iter={fwd['max_iter']}, "
                f"stop={fwd['stop']!r}, backward={self.backward_rule!r} "
                f"(adjoint: {bwd['fn'].__name__}, tol={bwd['tol']:g}, max_iter={bwd['max_iter']})")
