"""`DEQ`: a cell, a solver and a gradient rule, as one ``nn.Module``.

Forward (no graph kept):      z* = f(z*, x),  found by a fixed-point solver from z0.

Backward: a gradient rule (``deqlite.gradients``) applies f once more at z* with a graph and
decides what the backward pass does there. The default, ``backward="ift"``, is the implicit
function theorem: ∂ℓ/∂θ = gᵀ ∂f(z*, x)/∂θ with the adjoint g solving g = Jᵀ g + ∂ℓ/∂z*, itself a
fixed point, so memory is that of one application of f whatever the number of iterations. The
shortcuts ``"jfb"``, ``"neumann"`` and ``"phantom"`` approximate g more cheaply, and
``"unrolled"`` backpropagates through the solver's iterations (see ``deqlite.gradients``).

The per-call knobs, set for a block of code with ``with deq.options(...):`` and restored after:

* warm-up (as the DEQ papers pretrain): ``pretrain_steps=k > 0`` makes the forward pass apply the
  cell exactly k times from z0 and backpropagate through them, a shallow weight-tied network (no
  solve, so ``forward_stats`` stays None);
* Jacobian regularization (Bai, Koltun, Kolter, ICML 2021): with ``jac_probes=M > 0`` a forward
  pass that builds a graph also sets ``deq.jac_loss``, the batch mean of the Hutchinson estimate of
  ‖J_f(z*)‖²_F / d from M probes (``deqlite.jacobian``; ``jac_probe_kind`` is ``"gaussian"`` or
  ``"rademacher"``), differentiable in the parameters with z* held fixed; add γ · ``deq.jac_loss``
  to the loss. Otherwise ``jac_loss`` is None;
* the forward solve's iteration cap: ``max_iter=k`` stops it after at most k iterations in place
  of the forward solver's own ``max_iter`` (None, the default: that one), e.g. a cap drawn anew
  for each training step (``deqlite.train.deq_hooks.forward_max_iter``).

Extra inputs of the injection: ``deq(x, z0, **context)`` passes the keyword arguments on to the
cell, ``cell.inject(x, **context)``, computed once per call like the rest of the injection and
held fixed during the solve: something the equilibrium depends on besides x, e.g. a
Transformer-XL memory, the previous segment's equilibrium states, attended to but not solved for
(``fixed_point_map`` and ``equilibrium`` take and pass them the same way). Without context a call
is ``cell.inject(x)``, as for a cell whose ``inject`` takes x alone.

After each call, ``deq.forward_stats`` holds the forward solve's ``SolverStats`` (None while
pretraining) and ``deq.backward_stats`` what the gradient rule spent on the gradient (the adjoint
solve's record for ``ift``, once ``.backward()`` has run; see ``deqlite.gradients``).

The model returns z* itself (not ``(z*, stats)``, as TorchDEQ does) so that a model calls its DEQ
like any layer inside its own ``forward``; the records are attributes to read afterwards.

A call checks, once (never per iteration), that x is finite; that x, z0 and the cell share a dtype;
that z0 has the cell's state shape(s); that inject(x) is finite, else it names the cell's NaN/inf
parameters (also when a solve goes non-finite); and each f(z) is shaped like z.

Also here, to look inside a DEQ: ``fixed_point_map`` (the map z ↦ f(z, x) at one input, on flat
states), ``find_deq`` (the DEQ inside a model) and ``equilibrium`` (a model's DEQ, its map and
its equilibrium on some inputs, for ``deqlite.diagnostics`` and the trainer's metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from ._validate import check_keys, check_options, check_range, check_tensor, lookup
from .gradients import GradientRule, make_rule
from .jacobian import PROBES, hutchinson_frobenius
from .solvers import SolverSpec, State, flatten_state, state_tensors, unflatten_state
from .stats import ON_FAIL, SolverStats, check_convergence

KNOBS = {"pretrain_steps": 0, "jac_probes": 0, "jac_probe_kind": "gaussian",   # options(), defaults
         "max_iter": None}


def _describe(value: Any) -> str:
    """A value as an error shows it: ``a tensor of shape (2, 4)``, ``a tuple of 2: (2, 4), (2, 4)``."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value)
    return "None" if value is None else f"a {type(value).__name__}"


def _layout(state: Any) -> Any:
    """A state's shape (a tuple), or the list of its tensors' shapes; None for what is no state."""
    if isinstance(state, torch.Tensor):
        return tuple(state.shape)
    if isinstance(state, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in state):
        return [tuple(t.shape) for t in state]
    return None


def flat_map(cell: nn.Module, spec: Any) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``step(z, injection)``: one application of the cell on flat states (batch, D), a state of
    the shape(s) ``spec`` (see ``solvers.flatten_state``) in between. The cell must return a state
    of those shapes (shapes compared in Python: no tensor is read)."""
    def step(z: torch.Tensor, injection) -> torch.Tensor:
        out = cell(unflatten_state(z, spec), injection)
        want = (z.shape[0], *spec) if isinstance(spec, tuple) else [(z.shape[0], *s) for s in spec]
        if _layout(out) != want:
            hint = " (Does its forward end without `return`?)" if out is None else \
                " (Return the new state only.)" if isinstance(out, (list, tuple)) else ""
            error = ValueError if isinstance(out, (torch.Tensor, list, tuple)) else TypeError
            raise error(f"the cell's forward(z, injection) ({type(cell).__name__}) returned "
                        f"{_describe(out)}; it must return a state of the same shape and structure "
                        f"as z: {'a tensor of shape' if isinstance(want, tuple) else 'a list of'} "
                        f"{want}.{hint}")
        return flatten_state(out, "the cell's output", check=False)[0]
    return step


# --- what a call is checked for: once per call, or only on the way to an error ------------------

COMPILE_NOTE = ("a DEQ's solve is a Python loop that stops when the samples converge, which "
                "torch.compile cannot capture in one graph: compile the cell instead, "
                "DEQ(torch.compile(cell), ...)")
CASTS = {torch.float32: ".float()", torch.float64: ".double()", torch.float16: ".half()"}


def _autocasting(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:                                   # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def check_dtypes(cell: nn.Module, x: torch.Tensor, z0: Optional[State] = None) -> None:
    """x and z0 have the dtype of the cell's parameters (torch's own error, from inside a layer,
    names none of them). No tensor is read. Skipped under autocast (it mixes dtypes on purpose)
    and for a cell without parameters or with parameters of several dtypes."""
    dtypes = {p.dtype for p in cell.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or _autocasting(x.device):
        return
    (dtype,) = dtypes
    starts = [("z0", z0)] if isinstance(z0, torch.Tensor) else \
        [(f"z0[{i}]", t) for i, t in enumerate(z0)] if isinstance(z0, (list, tuple)) else []
    for name, t in [("x", x), *starts]:
        if isinstance(t, torch.Tensor) and t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cell's parameters have dtype "
                            f"{dtype}; they must agree. Cast the model to {name}'s dtype (model"
                            f"{CASTS.get(t.dtype, f'.to({t.dtype})')}, e.g. for float64 gradient "
                            f"checks) or {name} to the model's ({name[:2]}{CASTS.get(dtype, '.to()')}).")


def check_start(z0: State, expected: State) -> None:
    """A given z0 has the structure and shapes of ``expected``, the cell's own state at this input;
    for a list state (one tensor per scale) the first branch that differs is named."""
    got, want = _layout(z0), _layout(expected)
    if got == want:
        return
    problem = f"z0 is {_describe(z0)}"
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        problem = f"branch {i} of z0, z0[{i}], has shape {got[i]} where {want[i]} is expected"
        if sorted(got) == sorted(want):
            problem += (" (the branches are in another order than the cell's: MultiscaleCell's go "
                        "from the highest resolution down)")
    raise ValueError(f"{problem}; the cell's state for this x has shape{'s' * isinstance(want, list)}"
                     f" {want}. Start from the cell's own state, cell.init_state(cell.inject(x)), "
                     f"or from a z* of this cell at an input of the same shape.")


def _check_input(x: Any) -> None:
    """x is a floating-point batch of finite values; for NaN/inf the message says where they can
    come from besides the data: the layers before the DEQ."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1):
        check_tensor(x, "x")                        # its error: the type, dtype or shape
    elif not bool(torch.isfinite(x.detach()).all()):    # (detached: isfinite saves for backward)
        bad = ~torch.isfinite(x.detach()).reshape(len(x), -1)
        samples = bad.any(1).nonzero().flatten().tolist()
        raise ValueError(f"x, the DEQ's input, contains {int(bad.sum())} NaN/inf value(s) (in "
                         f"sample(s) {', '.join(map(str, samples[:8]))}{' ...' * (len(samples) > 8)}"
                         f"); clean or normalize the data. If x comes out of layers before the DEQ, "
                         f"check their parameters too (a diverged training step or a corrupt "
                         f"checkpoint leaves NaN/inf there).")


def check_parameters(cell: nn.Module, symptom: str) -> None:
    """Raise a ValueError naming the parameters and buffers of ``cell`` that hold NaN/inf values
    as the cause of ``symptom``, if any do (a pass over them all: for the way to an error)."""
    bad = [(name, int((~torch.isfinite(t.detach())).sum()), t.numel()) for name, t in
           itertools.chain(cell.named_parameters(), cell.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
    if not bad:
        return
    names = ", ".join(f"{name} ({count} of {size} values)" for name, count, size in bad[:4])
    raise ValueError(f"{symptom}: the cell's parameters contain NaN/inf, in {names}"
                      f"{', ...' * (len(bad) > 4)}. They come from a diverged training step or a "
                      f"corrupt checkpoint: load an earlier checkpoint, or train with a lower "
                      f"learning rate, gradient clipping or Jacobian regularization.")


def check_injection(cell: nn.Module, x: torch.Tensor, injection: Any) -> None:
    """inject(x) of a finite x is finite (one synchronization); if not, the cell's NaN/inf
    parameters are named, or else the overflow is reported (not under autocast: a float16
    overflow there is the gradient scaler's business)."""
    parts = injection if isinstance(injection, (list, tuple)) else [injection]
    tensors = [t.detach() for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    check_parameters(cell, "x is finite but the cell's inject(x) is not")
    if not _autocasting(x.device):
        raise ValueError(f"x is finite but the cell's inject(x) is not, though the cell's parameters"
                         f" are: an overflow (|x| is up to {x.abs().max().item():.3g}, dtype "
                         f"{x.dtype}). Normalize x, or compute in a wider dtype.")


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
        """The map f(z) = cell(z, inject(x, **context)) on flat states (batch, D) for the input x
        (and the `context`, e.g. a memory: the module docstring), its flat starting state (z0, or
        the cell's ``init_state``) and how to unflatten a state (a cell may keep a list of
        tensors, e.g. one per scale). The injection is computed once here, and x, z0 and the
        injection are checked (module docstring)."""
        _check_input(x)
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
