"""`DEQ`: a cell, a solver and a gradient rule, as one ``nn.Module``.

Forward (no graph kept):      z* = f(z*, x),  found by a fixed-point solver from z0.

Backward: a gradient rule (``deqlite.gradients``) applies f once more at z* with a graph and
decides what the backward pass does there. The default, ``backward="ift"``, is the implicit
function theorem: ∂ℓ/∂θ = gᵀ ∂f(z*, x)/∂θ with the adjoint g solving g = Jᵀ g + ∂ℓ/∂z*, itself a
fixed point, so memory is that of one application of f whatever the number of iterations. The
shortcuts ``"jfb"``, ``"neumann"`` and ``"phantom"`` approximate g more cheaply, and
``"unrolled"`` backpropagates through the solver's iterations (see ``deqlite.gradients``).

The per-call knobs, set for a block of code with ``with deq.options(...):`` and restored after:
``pretrain_steps=k > 0`` (the warm-up, as the DEQ papers pretrain: apply the cell exactly k times
from z0 and backpropagate through them, no solve, ``forward_stats`` None); ``jac_probes=M > 0``
(Jacobian regularization, Bai, Koltun, Kolter, ICML 2021: a forward pass that builds a graph also
sets ``deq.jac_loss``, the batch mean of the Hutchinson estimate of ‖J_f(z*)‖²_F / d from M probes
of kind ``jac_probe_kind``, differentiable in the parameters with z* held fixed: add
γ · ``deq.jac_loss`` to the loss; otherwise it is None); ``max_iter=k`` (the forward solve's cap
in place of the solver's own, e.g. one drawn per training step; None: the solver's).

``deq(x, z0, **context)``: extra inputs of the injection, ``cell.inject(x, **context)``, computed
once per call and held fixed during the solve, e.g. a Transformer-XL memory of the previous
segment's equilibrium states (``fixed_point_map`` and ``equilibrium`` pass them on too).

After each call, ``deq.forward_stats`` holds the forward solve's ``SolverStats`` (None while
pretraining) and ``deq.backward_stats`` what the gradient rule spent on the gradient (the adjoint
solve's record for ``ift``, once ``.backward()`` has run; see ``deqlite.gradients``).

The model returns z* itself (not ``(z*, stats)`` as TorchDEQ does): a model calls its DEQ like
any layer; the records are attributes to read afterwards.

A call checks, once (never per iteration), that x is finite; that x, z0 and the cell share a dtype;
that z0 has the cell's state shape(s); that inject(x) is finite, else it names the cell's NaN/inf
parameters (also when a solve goes non-finite; ``deqlite._checks``); and each f(z) is shaped like z.

Also here, to look inside a DEQ: ``fixed_point_map`` (the map z ↦ f(z, x) at one input, on flat
states), ``find_deq`` (the DEQ inside a model) and ``equilibrium`` (a model's DEQ, its map and
its equilibrium on some inputs, for ``deqlite.diagnostics`` and the trainer's metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from ._checks import (check_dtypes, check_injection, check_input, check_parameters, check_start,
                      flat_map)
from ._validate import check_keys, check_options, check_range, lookup
from .gradients import GradientRule, make_rule
from .jacobian import PROBES, hutchinson_frobenius
from .solvers import SolverSpec, State, flatten_state, state_tensors, unflatten_state
from .stats import ON_FAIL, SolverStats, check_convergence

KNOBS = {"pretrain_steps": 0, "jac_probes": 0, "jac_probe_kind": "gaussian",   # options(), defaults
         "max_iter": None}


COMPILE_NOTE = ("a DEQ's solve is a Python loop that stops when the samples converge, which "
                "torch.compile cannot capture in one graph: compile the cell instead, "
                "DEQ(torch.compile(cell), ...)")


def _eager_under_compile(forward: Callable) -> Callable:
    """``forward`` as ``torch.compiler.disable(forward)`` makes it (run eagerly, also when a compiled
    model calls it), without importing torch._dynamo (seconds) before torch.compile has: the first
    eager call after that makes the disabled function. A trace before it stops with the reason."""
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        dynamo = sys.modules.get("torch._dynamo")
        if wrapper.eager is None and dynamo is not None and not torch.compiler.is_compiling():
            try:
                wrapper.eager = dynamo.disable(forward, reason=COMPILE_NOTE)
            except TypeError:                           # torch < 2.8: no reason
                wrapper.eager = dynamo.disable(forward)
        if wrapper.eager is not None:
            return wrapper.eager(*args, **kwargs)
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_NOTE)
        return forward(*args, **kwargs)
    wrapper.eager = None
    return wrapper


@dataclass
class FixedPointMap:
    """A DEQ's map at one input x, on flat states: ``f(z) = cell(z, inject(x))``, its starting
    point ``z0`` (batch, D), the ``spec`` that gives a flat state its own shape(s) back
    (``unflatten``), and ``injection = inject(x)``, computed once."""
    f: Callable[[torch.Tensor], torch.Tensor]
    z0: torch.Tensor
    spec: Any
    injection: Any

    def unflatten(self, z: torch.Tensor) -> State:
        return unflatten_state(z, self.spec)


class DEQ(nn.Module):
    """Deep equilibrium model around a cell with ``inject(x)``, ``init_state(inj)`` and
    ``forward(z, inj)`` (see ``deqlite.cells``).

    Args:
        cell: the weight-tied, input-injected layer f.
        solver: forward solver name (``"forward_iteration"``, ``"anderson"``, ``"broyden"``).
        tol, max_iter, stop: the forward solve's stopping rule (see ``deqlite.solvers``);
            ``tol=0`` runs exactly ``max_iter`` iterations (and does not warn).
        solver_options: extra options of the forward solver, e.g. ``{"m": 6, "beta": 1.0}``.
        backward: the gradient rule (``deqlite.gradients``): ``"ift"`` (implicit
            differentiation), ``"jfb"``, ``"phantom"``, ``"neumann"`` (shortcuts) or
            ``"unrolled"`` (backprop through the solver).
        backward_options: the rule's own options: ``{"k": 5, "tau": 0.5}`` for ``"phantom"``
            (damped steps, damping), ``{"k": 5}`` for ``"neumann"`` (terms); those are the
            defaults. The other rules take none. An unknown option is an error.
        backward_solver, backward_tol, backward_max_iter, backward_solver_options: the adjoint
            solve's settings (``"ift"``, and ``deqlite.jiio.attach``); each defaults to the
            forward one's.
        on_fail: what to do when a solve does not converge: ``"warn"`` (default), ``"raise"``,
            ``"ignore"``. The message carries the residual trace and what to try.

    Attributes: ``forward_solver`` and ``backward_solver`` (``SolverSpec``), ``gradient`` (the
    rule), ``adjoint`` (the ``IFT`` rule with the adjoint settings; ``gradient`` itself for
    ``"ift"``), the records ``forward_stats``, ``backward_stats``, ``jac_loss``, and the knobs
    ``pretrain_steps``, ``jac_probes``, ``jac_probe_kind``, ``max_iter`` (read-only: change
    them with ``options``).

    ``torch.compile``: compile the cell, ``DEQ(torch.compile(cell), ...)``: the solver's Python loop
    (and the IFT backward) runs around the compiled cell. The loop stops when the samples converge,
    a data-dependent decision no single graph holds: ``torch.compile(model)`` runs the DEQ eagerly
    inside the compiled model, and ``torch.compile(deq, fullgraph=True)`` fails at once, saying so.
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
        lookup(ON_FAIL, on_fail, "on_fail value")
        self.cell, self.on_fail = cell, on_fail
        self.forward_solver = SolverSpec(solver, tol, max_iter, stop, solver_options or {})
        same = backward_solver in (None, solver)
        self.backward_solver = SolverSpec(
            solver if backward_solver is None else backward_solver,
            tol if backward_tol is None else backward_tol,
            max_iter if backward_max_iter is None else backward_max_iter, stop,
            (backward_solver_options if backward_solver_options is not None
             else solver_options if same else None) or {})
        self.gradient: GradientRule = make_rule(backward, backward_options,
                                                adjoint=self.backward_solver, on_fail=on_fail)
        self.adjoint = self.gradient if backward == "ift" else \
            make_rule("ift", adjoint=self.backward_solver, on_fail=on_fail)
        self.forward_stats: Optional[SolverStats] = None
        self.jac_loss: Optional[torch.Tensor] = None
        self._knobs = dict(KNOBS)

    @classmethod
    def from_options(cls, cell: nn.Module, options: Optional[Mapping[str, Any]]) -> "DEQ":
        """``DEQ(cell, **options)``, an unknown option reported with the valid ones (what a
        model's ``deq=`` argument takes)."""
        options = dict(options or {})
        check_options(cls.__init__, options, "deq")
        return cls(cell, **options)

    # --- the rule, its record, and the knobs --------------------------------------------------

    @property
    def backward_rule(self) -> str:
        """The gradient rule's name (``"ift"``, ...)."""
        return self.gradient.name

    @property
    def backward_options(self) -> dict:
        """The gradient rule's options, with their defaults."""
        return self.gradient.options

    @property
    def backward_stats(self) -> Optional[SolverStats]:
        """What the gradient rule spent on the last gradient (see ``deqlite.gradients``)."""
        return self.gradient.stats

    pretrain_steps = property(lambda self: self._knobs["pretrain_steps"],
                              doc="Warm-up depth: apply f this many times instead of solving (0: solve).")
    jac_probes = property(lambda self: self._knobs["jac_probes"],
                          doc="Hutchinson probes of the Jacobian regularizer (0: no jac_loss).")
    jac_probe_kind = property(lambda self: self._knobs["jac_probe_kind"],
                              doc="The probes' distribution: 'gaussian' or 'rademacher'.")
    max_iter = property(lambda self: self._knobs["max_iter"],
                        doc="The forward solve's cap for this block (None: forward_solver.max_iter).")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in KNOBS:
            raise AttributeError(f"set {name} for a block of code with `with deq.options({name}="
                                 f"{value!r}): ...` (it is restored afterwards).")
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def options(self, **changes: Any) -> Iterator["DEQ"]:
        """Inside the ``with`` block, the knobs take the values given (``pretrain_steps``,
        ``jac_probes``, ``jac_probe_kind``, ``max_iter``; see the module docstring); on the way
        out they are what they were before, also after an error.

            with deq.options(jac_probes=1):
                loss = criterion(model(x), y) + gamma * deq.jac_loss
        """
        check_keys(changes, KNOBS, what="DEQ.options()")
        for name in ("pretrain_steps", "jac_probes"):
            if name in changes:
                check_range(changes[name], name, low=0, integer=True)
        if "jac_probe_kind" in changes:
            lookup(PROBES, changes["jac_probe_kind"], "probe kind")
        if changes.get("max_iter") is not None:
            check_range(changes["max_iter"], "max_iter", low=1, integer=True)
        saved = dict(self._knobs)
        self._knobs.update(changes)
        try:
            yield self
        finally:
            self._knobs = saved

    # --- the forward pass ---------------------------------------------------------------------

    def fixed_point_map(self, x: torch.Tensor, z0: Optional[State] = None,
                        **context: Any) -> FixedPointMap:
        """The map f(z) = ``cell(z, inject(x, **context))`` on flat states (batch, D) for the input x
        (and the `context`, e.g. a memory: the module docstring), its flat starting state (z0, or
        the cell's ``init_state``) and how to unflatten a state (a cell may keep a list of
        tensors, e.g. one per scale). The injection is computed once here, and x, z0 and the
        injection are checked (module docstring)."""
        check_input(x)
        check_dtypes(self.cell, x, z0)
        injection = self.cell.inject(x, **context) if context else self.cell.inject(x)
        check_injection(self.cell, x, injection)
        z0_flat, spec = flatten_state(self.cell.init_state(injection) if z0 is None else z0, "z0")
        if z0 is not None:
            check_start(z0, self.cell.init_state(injection))
        step = flat_map(self.cell, spec)
        return FixedPointMap(lambda z: step(z, injection), z0_flat, spec, injection)

    @_eager_under_compile
    def forward(self, x: torch.Tensor, z0: Optional[State] = None, **context: Any) -> State:
        """Return the equilibrium state z* for the batch x (warm-started from z0 if given);
        `context` goes to the cell's ``inject`` along with x (module docstring)."""
        m = self.fixed_point_map(x, z0, **context)
        self.forward_stats = self.jac_loss = self.gradient.stats = None
        needs_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in state_tensors(m.injection))
            or any(p.requires_grad for p in self.cell.parameters()))
        if self.pretrain_steps:     # warm-up: exactly k applications of f, backprop through them
            z = m.z0
            for _ in range(self.pretrain_steps):
                z = m.f(z)
        else:
            spec = self.forward_solver if self.max_iter is None else \
                dataclasses.replace(self.forward_solver, max_iter=self.max_iter)
            z, self.forward_stats = self.gradient.solve(spec, m.f, m.z0)
            if self.forward_stats.num_nonfinite:        # NaN/inf weights: name them
                check_parameters(self.cell, "the forward solve went NaN/inf")
            check_convergence(self.forward_stats, "forward", self.on_fail)
            if needs_grad:
                z = self.gradient.attach(z, m.f)
        if needs_grad and self.jac_probes:
            self._jacobian_loss_at(z, m.f)
        return m.unflatten(z)

    def _jacobian_loss_at(self, z: torch.Tensor, f) -> None:
        """jac_loss = batch mean of the Hutchinson estimate of ‖J‖²_F / d at z (z held fixed).
        Its own application of f: the backward pass must not free the adjoint's graph."""
        z_in = z.detach().requires_grad_()
        self.jac_loss = f(z_in).sum() if len(z_in) == 0 else \
            hutchinson_frobenius(f(z_in), z_in, n_probes=self.jac_probes,    # (an empty batch: 0)
                                 kind=self.jac_probe_kind, create_graph=True).mean()

    def extra_repr(self) -> str:
        text = f"solver={self.forward_solver!r}, backward={self.backward_rule!r}"
        if self.backward_rule == "ift":
            return text + f" (adjoint: {self.backward_solver!r})"
        options = ", ".join(f"{key}={value}" for key, value in self.backward_options.items())
        return text + (f" ({options})" if options else "")


# --- looking inside a model's DEQ -----------------------------------------------------------------

def find_deq(model: nn.Module) -> DEQ:
    """The model itself if it is a DEQ, else its only DEQ submodule."""
    if isinstance(model, DEQ):
        return model
    found = [m for m in model.modules() if isinstance(m, DEQ)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} DEQ modules; pass the DEQ "
                         f"you mean and its own input, e.g. diagnose(model.deq, features).")
    return found[0]


@torch.no_grad()
def equilibrium(model: nn.Module, inputs: torch.Tensor):
    """Run `model` on `inputs` and return ``(deq, f, z)``: its DEQ, the fixed-point map
    z ↦ f(z, x) on flat states (batch, D) for the DEQ's own input x and context (captured with a
    forward hook; module docstring), and the flat state the DEQ returned."""
    deq = find_deq(model)
    seen = {}

    def capture(module, args, kwargs, output):
        seen["x"] = args[0] if args else kwargs["x"]
        seen["context"] = {k: v for k, v in kwargs.items() if k not in ("x", "z0")}
        seen["z"] = output

    handle = deq.register_forward_hook(capture, with_kwargs=True)
    try:
        model(inputs)
    finally:
        handle.remove()
    return deq, deq.fixed_point_map(seen["x"], **seen["context"]).f, flatten_state(seen["z"])[0]
