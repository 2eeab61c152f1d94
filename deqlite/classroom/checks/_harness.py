"""The harness every exercise check uses: the guarded call of the student's function, the
comparisons, the counted callables, and the ``exercise`` decorator (see the package's docstring)."""
from __future__ import annotations

import functools
import inspect
import math
import sys
import textwrap
from typing import Any, Callable

import torch
from torch import nn

from ..._validate import lookup
from .. import references

DT = torch.float64


class CheckFailed(AssertionError):
    """The student's answer is not right yet; the message says why and what to look at."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: the feedback alone, marked and wrapped (the
        traceback through this module's internals would only hide it)."""
        lines = []
        for i, paragraph in enumerate(str(self).split("\n")):
            wrapped = textwrap.wrap(paragraph, 100) or [""]
            lines += [("✗ " if i == 0 and j == 0 else "  ") + line for j, line in enumerate(wrapped)]
        return ["\x1b[1;31m" + lines[0] + "\x1b[0m", *lines[1:]]


class NotWrittenYet(CheckFailed):
    """The student's function is still only ``raise NotImplementedError()``."""


class _TooManyCalls(CheckFailed):
    """A counted callable was called more often than the exercise can need: stop the student's loop."""


def _fail(what: str, detail: str, hint: str = "") -> CheckFailed:
    return CheckFailed(f"{what}: {detail}" + (f"\nHint: {hint}" if hint else ""))


# ---------------------------------------------------------------- calling the student's function

def _tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors a student could change through one argument: itself, the items of a list,
    tuple or dict, a module's parameters."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors_in(item)]
    if isinstance(obj, nn.Module):       # not its buffers: a forward pass may update those
        return list(obj.parameters())
    return []


def _snapshot(obj: Any) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    return [(t, t._version, t.detach().clone()) for t in _tensors_in(obj)]


def _changed(snapshot) -> bool:
    def differs(t, copy):
        t = t.detach()
        if t.is_floating_point() or t.is_complex():
            return not torch.allclose(t, copy, rtol=0, atol=0, equal_nan=True)
        return not torch.equal(t, copy)
    return any(t._version != version or differs(t, copy) for t, version, copy in snapshot)


def _lines_run(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, int]:
    """fn(*args, **kwargs) and how many lines of fn's own body ran (``sys.settrace``): a body that
    is still only ``raise NotImplementedError()`` runs one line."""
    code, lines = getattr(fn, "__code__", None), 0

    def local(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        return fn(*args, **kwargs), lines
    except NotImplementedError as e:
        e.lines_run = lines
        raise
    finally:
        sys.settrace(previous)


def _argument_names(name: str, n: int) -> list[str]:
    try:
        names = list(inspect.signature(getattr(references, name)).parameters)
    except (AttributeError, TypeError, ValueError):
        names = []
    return (names + [f"argument {i + 1}" for i in range(len(names), n)])[:n]


def _call(fn: Callable, name: str, *args, convert: Callable | None = None,
          may_change: tuple[str, ...] = (), **kwargs) -> Any:
    """fn(*args, **kwargs), then ``convert`` of its result, with the common rules (module doc);
    the arguments named in ``may_change`` are the student's to change (a model a step trains)."""
    if not callable(fn):
        raise CheckFailed(f"{name} should be a function, got {type(fn).__name__}.")
    watched = [(label, _snapshot(a)) for label, a in zip(_argument_names(name, len(args)), args)]
    watched += [(label, _snapshot(a)) for label, a in kwargs.items()]
    try:
        out, _ = _lines_run(fn, args, kwargs)
        if convert is not None:
            out = convert(out)
    except NotImplementedError as e:
        if getattr(e, "lines_run", 0) <= 1:
            raise NotWrittenYet(f"{name} is not written yet: replace `raise NotImplementedError()` "
                                f"with your code, run that cell again, then this check.") from None
        raise CheckFailed(f"{name} raised NotImplementedError after {e.lines_run} lines of your "
                          f"code ran{f' ({e})' if str(e) else ''}: once your code is written, "
                          f"delete the `raise NotImplementedError()` line.") from None
    except CheckFailed:
        raise
    except Exception as e:  # the student's own bug: show it, and a hint where one is known
        raise CheckFailed(f"{name} raised {type(e).__name__}: {e}" + _exception_hint(e)) from None
    for (label, snapshot), a in zip(watched, list(args) + list(kwargs.values())):
        if label not in may_change and isinstance(a, nn.Module) and _changed(snapshot):
            raise CheckFailed(f"{name} changed the parameters of `{label}` (an optimizer step or an "
                              f"in-place update): this exercise only computes, it does not train.")
        if label not in may_change and _changed(snapshot):
            raise CheckFailed(
                f"{name} changed its argument `{label}` in place (an in-place operation such as "
                f"`+=`, `.mul_()`, `.copy_()` or item assignment on it, or on a variable that is "
                f"the same tensor). The caller's tensor is not yours to change: later cells would "
                f"see the modified values. Compute into a new tensor (`z = z + ...`, or `.clone()` "
                f"first).")
    return out


def _exception_hint(e: Exception) -> str:
    text = str(e)
    if "dtype" in text or "Double" in text and "Float" in text:
        return (" — two tensors of different dtypes met: create new tensors with the inputs' "
                "dtype (torch.zeros_like(z), torch.eye(n, dtype=W.dtype)), never a fixed one.")
    if "backward through the graph a second time" in text:
        return " — pass retain_graph=True to every autograd.grad call but the last."
    if "shape" in text or "size" in text and "match" in text:
        return " — shapes do not fit: print the shapes of the tensors in that line."
    return ""


class _Counted:
    """A callable handed to the student (f, vjp, matvec) that counts its calls and stops a loop
    that calls it more than ``limit`` times."""

    def __init__(self, fn: Callable, name: str, limit: int | None = None, why: str = ""):
        self.fn, self.name, self.limit, self.why, self.calls = fn, name, limit, why, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise _TooManyCalls(f"called {self.name} more than {self.limit} times{self.why}, so "
                                f"this check stopped it.")
        return self.fn(*args, **kwargs)


# ---------------------------------------------------------------- comparing results

def _compare(got: Any, expected: torch.Tensor, what: str, hint: str, *, rtol: float = 1e-6,
             atol: float = 1e-8, dtype: bool = True) -> None:
    """got must be a tensor of expected's shape, dtype and device, equal within
    |got − expected| ≤ atol + rtol·|expected| entry by entry; the message names the first entry
    that is not, with all the digits needed to see the difference."""
    if not isinstance(got, torch.Tensor):
        raise _fail(what, f"expected a torch.Tensor, got {type(got).__name__}.", hint)
    if got.shape != expected.shape:
        raise _fail(what, f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}.", hint)
    if dtype and got.dtype != expected.dtype:
        raise _fail(what, f"expected dtype {expected.dtype} (the inputs' dtype), got {got.dtype}.",
                    "Create new tensors with the inputs' dtype and device (torch.zeros_like(x), "
                    "torch.eye(n, dtype=W.dtype, device=W.device)); do not call .float() or "
                    ".double() on the result.")
    if got.device != expected.device:
        raise _fail(what, f"expected a tensor on {expected.device}, got one on {got.device}.",
                    "Create new tensors on the inputs' device (device=x.device).")
    got = got.detach().to(expected.dtype)
    bad = ~torch.isclose(got, expected, rtol=rtol, atol=atol)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        e, g = expected[index].item(), got[index].item()
        where = f" at index {index}" if expected.dim() else ""
        raise _fail(what, f"{int(bad.sum())} of {bad.numel()} entries are off; the first{where}: "
                    f"expected {e!r}, got {g!r} (difference {abs(g - e):.3g}, tolerance "
                    f"{atol + rtol * abs(e):.3g}).", hint)


def _which(got: Any, wrong: dict[str, torch.Tensor], default: str) -> str:
    """The hint for the first known wrong answer ``got`` matches (a sub-test by value), else
    ``default``: a specific hint where the mistake can be recognised, the general one otherwise."""
    if isinstance(got, torch.Tensor):
        for hint, value in wrong.items():
            if got.shape == value.shape and torch.allclose(got.detach().to(value.dtype), value,
                                                           rtol=1e-5, atol=1e-7):
                return hint
    return default


def _number(x: Any) -> float:
    """A result that should be one number: a Python number or a one-element tensor."""
    if isinstance(x, bool) or x is None:
        raise CheckFailed(f"should return a number, got {x!r}.")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise CheckFailed(f"should return one number, got a tensor of shape {tuple(x.shape)}.")
        return float(x.detach())
    if isinstance(x, (int, float)):
        return float(x)
    raise CheckFailed(f"should return a number, got {type(x).__name__}.")


def _pair_of(name: str, parts: str) -> Callable[[Any], tuple]:
    """A converter for a result that should be a pair, e.g. ``_pair_of("deq_layer", "z, stats")``."""
    def convert(out):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"{name} should return a pair ({parts}), got {type(out).__name__}.")
        return out
    return convert


def _numbered(name: str) -> Callable[[Any], float]:
    def convert(x):
        try:
            return _number(x)
        except CheckFailed as e:
            raise CheckFailed(f"{name} {e}") from None
    return convert


def _close(got: float, expected: float, rtol: float) -> bool:
    return math.isfinite(got) and abs(got - expected) <= rtol * abs(expected) + 1e-300


def _passed(name: str, detail: str) -> bool:
    print(f"✓ {name}: {detail}")
    return True


# ---------------------------------------------------------------- the exercise decorator

VERDICTS: dict[str, bool] = {}
"""Exercise name → whether the student's own function passed its check the last time it ran."""

EXERCISES: dict[str, Callable] = {}
"""Exercise name → its check, in the order of the notebooks."""


def exercise(check: Callable) -> Callable:
    """Turn ``check_<name>(fn)`` into what the notebooks call: it returns fn when fn is right,
    deqlite's ``references.<name>`` (with a notice) when fn is not written yet, and raises
    ``CheckFailed`` when fn is wrong. The reference is at ``check_<name>.reference``; the bare
    check (which accepts the reference, for tests) at ``check_<name>.__wrapped__``."""
    name = check.__name__.removeprefix("check_")
    reference = getattr(references, name)

    @functools.wraps(check)
    def run(fn: Callable) -> Callable:
        VERDICTS[name] = False
        if fn is reference:
            raise CheckFailed(f"{name} is deqlite's reference implementation (an earlier run of "
                              f"this check handed it back because yours was not written yet), not "
                              f"your answer: run the cell that defines your {name} first, then "
                              f"this check.")
        try:
            check(fn)
        except NotWrittenYet as e:
            print(f"… {e}\n  Until then, the rest of this notebook uses deqlite's reference "
                  f"implementation (deqlite.classroom.references.{name}).")
            return reference
        VERDICTS[name] = True
        return fn

    run.reference = reference
    EXERCISES[name] = run
    return run


def graded(name: str) -> None:
    """The autograder's test for exercise ``name`` (a hidden test in the nbgrader cell after the
    check): passes only if the student's *own* function passed the check, not when the check handed
    back deqlite's reference because the exercise was not written yet."""
    lookup(_exercise_names(), name, "exercise")
    if not VERDICTS.get(name):
        raise CheckFailed(f"{name}: no points yet: the exercise is not written, or its check did "
                          f"not pass (run the check cell above to see why).")


def _exercise_names() -> list[str]:
    return list(EXERCISES)


def reference(name: str) -> Callable:
    """deqlite's reference implementation of the exercise ``name`` (e.g. "anderson")."""
    return lookup({n: getattr(references, n) for n in _exercise_names()}, name, "exercise")


# ---------------------------------------------------------------- problems several checks share

def _tanh_problem(seed: int, batch: int = 4, d_in: int = 3, d: int = 6, scale: float = 0.7,
                  dtype: torch.dtype = DT):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W *= scale / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(d, d_in, generator=g, dtype=DT)
    b = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(batch, d_in, generator=g, dtype=DT)
    return tuple(t.to(dtype) for t in (W, U, b, x))


def _jacobians(seed: int, batch: int = 4, d: int = 6, scale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(batch, d, d, generator=g, dtype=DT)                   # not symmetric: Jᵀ ≠ J
    J *= scale / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    return J, torch.randn(batch, d, generator=g, dtype=DT)


def _vjp_of(J: torch.Tensor, shape: tuple) -> Callable:
    """vjp(y) = Jᵀ y per sample, for y of the given (batch, ...) shape."""
    return lambda y: (y.flatten(1)[:, None, :] @ J).squeeze(1).reshape(y.shape)
