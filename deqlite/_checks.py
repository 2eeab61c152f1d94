"""What a DEQ call is checked for, once per call (never per iteration) or only on the way to an
error: the input is finite; x, z0 and the cell share a dtype; z0 has the cell's state shape(s);
the injection is finite, else the cell's NaN/inf parameters are named; each f(z) is shaped like z
(``flat_map``). ``deqlite.deq`` and ``deqlite.jiio`` call these; each message says what is wrong
and what to do.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._validate import check_tensor
from .solvers import State, flatten_state, unflatten_state


def describe(value: Any) -> str:
    """A value as an error shows it: ``a tensor of shape (2, 4)``, ``a tuple of 2: (2, 4), (2, 4)``."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}: " + ", ".join(
            str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value)
    return "None" if value is None else f"a {type(value).__name__}"


def layout(state: Any) -> Any:
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
        if layout(out) != want:
            hint = " (Does its forward end without `return`?)" if out is None else \
                " (Return the new state only.)" if isinstance(out, (list, tuple)) else ""
            error = ValueError if isinstance(out, (torch.Tensor, list, tuple)) else TypeError
            raise error(f"the cell's forward(z, injection) ({type(cell).__name__}) returned "
                        f"{describe(out)}; it must return a state of the same shape and structure "
                        f"as z: {'a tensor of shape' if isinstance(want, tuple) else 'a list of'} "
                        f"{want}.{hint}")
        return flatten_state(out, "the cell's output", check=False)[0]
    return step


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
    got, want = layout(z0), layout(expected)
    if got == want:
        return
    problem = f"z0 is {describe(z0)}"
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        problem = f"branch {i} of z0, z0[{i}], has shape {got[i]} where {want[i]} is expected"
        if sorted(got) == sorted(want):
            problem += (" (the branches are in another order than the cell's: MultiscaleCell's go "
                        "from the highest resolution down)")
    raise ValueError(f"{problem}; the cell's state for this x has shape{'s' * isinstance(want, list)}"
                     f" {want}. Start from the cell's own state, cell.init_state(cell.inject(x)), "
                     f"or from a z* of this cell at an input of the same shape.")


def check_input(x: Any) -> None:
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
