"""Checks for the notebooks' exercises: run the student's function on several families of inputs,
compare it with what the math says, and say what is wrong in words a student can act on.

A notebook calls a check on the student's function and keeps what it returns:

    weight_tied_forward = checks.check_weight_tied_forward(weight_tied_forward)

* right: a one-line confirmation (✓), and the student's function comes back;
* not written yet (its body is still only ``raise NotImplementedError()``, as in the generated
  student notebooks): the check says so and hands back deqlite's reference implementation
  (``deqlite.classroom.references``), so the rest of the notebook still runs;
* wrong: ``CheckFailed``. In JupyterLab it shows as a short marked message, not a traceback: what
  failed, on which input, expected against got (the first entry off, with all its digits), and a
  hint chosen by the sub-test that failed.

Every call of the student's function goes through ``_call``, which holds the rules common to all
exercises:

* an argument changed in place (``z0 += ...``, ``grad.mul_(...)``) is a mistake even when the
  answer is right: the caller's tensor is not the student's to change, and later cells break;
* ``NotImplementedError`` raised after the student's own code started running is a failure (the
  ``raise`` line was left in below finished code), not "not written yet";
* deqlite's reference itself (what an earlier run of the check handed back) is not an answer;
* converting the result (to a number, a pair, ...) happens inside the guarded call, so a wrong
  kind of result is reported in words, not as a traceback from this module;
* the callables handed to the student (``f``, ``vjp``, ``matvec``) count their calls, so a solver
  that evaluates f twice per step or ignores ``max_iter`` is caught, and a loop that never stops
  is stopped.

``checks.graded(name)`` is the autograder's test (nbgrader, a hidden test after each check): it
passes only when the student's own function passed its check.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import textwrap
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import lookup
from ..models import DEQClassifier
from ..projections import L2Ball
from . import references

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
    return [n.removeprefix("check_") for n, v in globals().items()
            if n.startswith("check_") and hasattr(v, "reference")]


def reference(name: str) -> Callable:
    """deqlite's reference implementation of the exercise ``name`` (e.g. "anderson")."""
    return lookup({n: getattr(references, n) for n in _exercise_names()}, name, "exercise")


def _tanh_problem(seed: int, batch: int = 4, d_in: int = 3, d: int = 6, scale: float = 0.7,
                  dtype: torch.dtype = DT):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W *= scale / torch.linalg.matrix_norm(W, ord=2)
    U = torch.randn(d, d_in, generator=g, dtype=DT)
    b = torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(batch, d_in, generator=g, dtype=DT)
    return tuple(t.to(dtype) for t in (W, U, b, x))


# ---------------------------------------------------------------- notebook 01

@exercise
def check_weight_tied_forward(fn: Callable) -> bool:
    """fn(W, U, b, x, n_layers) -> z after n_layers of z ← tanh(z Wᵀ + x Uᵀ + b), from z = 0."""
    hint = ("Start from z = 0 of shape (batch, hidden) with x's dtype; use the *same* W, U, b in "
            "every layer and add the input injection x Uᵀ + b at every layer, not only the first.")
    families = [(0, 1, {}), (1, 5, {}), (2, 30, {}), (3, 0, {}),
                (4, 7, dict(batch=1, d=5, d_in=2)), (5, 4, dict(dtype=torch.float32))]
    for seed, n, shape in families:
        W, U, b, x = _tanh_problem(seed, **shape)
        z = torch.zeros(x.shape[0], W.shape[0], dtype=x.dtype)
        for _ in range(n):
            z = torch.tanh(z @ W.T + x @ U.T + b)
        what = (f"weight_tied_forward with n_layers={n} (batch {x.shape[0]}, hidden {W.shape[0]}, "
                f"input {x.shape[1]}, {str(x.dtype).removeprefix('torch.')})")
        got = _call(fn, "weight_tied_forward", W, U, b, x, n)
        z_w, z_first = torch.zeros_like(z), torch.zeros_like(z)
        for k in range(n):
            z_w = torch.tanh(z_w @ W + x @ U.T + b)
            z_first = torch.tanh(z_first @ W.T + (x @ U.T + b if k == 0 else 0))
        specific = _which(got, {
            "z @ W multiplies by Wᵀ: a batch of row vectors needs z @ W.T (and x @ U.T).": z_w,
            "The input injection x Uᵀ + b goes into every layer, not only the first: that is "
            "what makes the fixed point depend on x.": z_first}, hint)
        _compare(got, z, what, specific if n else "With n_layers = 0 no layer runs: z is still "
                 "the zero state.", rtol=1e-5 if x.dtype == torch.float32 else 1e-10, atol=1e-7)
    return _passed("weight_tied_forward", "matches the weight-tied network for 0 to 30 layers, "
                   "other shapes and float32")


@exercise
def check_lipschitz_bound(fn: Callable) -> bool:
    """fn(W) -> the Lipschitz constant bound ‖W‖₂ of z ↦ tanh(W z + u)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    families = [("a random 7×7 matrix", torch.randn(7, 7, generator=g, dtype=DT)),
                ("a random 4×4 matrix", torch.randn(4, 4, generator=g, dtype=DT)),
                ("a non-normal matrix (ρ(W) = 0.5 but ‖W‖₂ ≫ 1)",
                 torch.tensor([[0.5, 3.0], [0.0, 0.5]], dtype=DT)),
                ("a symmetric matrix with a negative top eigenvalue",
                 Q @ torch.diag(torch.tensor([-2.0, 1.5, 1.0, 0.3, -0.2, 0.1], dtype=DT)) @ Q.T)]
    for what, W in families:
        expected = torch.linalg.matrix_norm(W, ord=2).item()
        got = _call(fn, "lipschitz_bound", W.clone(), convert=_numbered("lipschitz_bound"))
        if not _close(got, expected, 1e-10):
            hint = ("tanh' ≤ 1, so the bound is the largest singular value of W (the spectral "
                    "norm, torch.linalg.matrix_norm(W, ord=2)).")
            if _close(got, torch.linalg.matrix_norm(W).item(), 1e-10):
                hint = "That is the Frobenius norm, a looser bound: " + hint
            elif _close(got, torch.linalg.eigvals(W).abs().max().item(), 1e-10):
                hint = ("That is the spectral radius max|λ|: for a non-normal W it is smaller "
                        "than ‖W‖₂, so it does not bound how far one step can stretch. " + hint)
            raise _fail(f"lipschitz_bound on {what}", f"expected {expected!r}, got {got!r}.", hint)
    return _passed("lipschitz_bound", "equals the spectral norm ‖W‖₂, non-normal and negative-"
                   "eigenvalue matrices included")


@exercise
def check_linear_fixed_point(fn: Callable) -> bool:
    """fn(W, b) -> z* of z = z Wᵀ + b for a batch b of shape (batch, d)."""
    hint = ("z = W z + b  ⇔  (I − W) z = b; solve that system (torch.linalg.solve) for every row "
            "of b, mind the transposes for a batch of row vectors, and make the identity with "
            "W's dtype. Iterating z ← z Wᵀ + b only approaches z*; the check wants it exactly.")
    families = [(0, dict(d_in=6)), (1, dict(d_in=6, scale=0.95)), (2, dict(batch=1, d=3, d_in=3)),
                (3, dict(d_in=6, dtype=torch.float32))]
    for seed, shape in families:
        W, _, _, b = _tanh_problem(seed, **shape)
        eye = torch.eye(W.shape[0], dtype=DT)
        expected = torch.linalg.solve(eye - W.double(), b.double().T).T.to(b.dtype)
        got = _call(fn, "linear_fixed_point", W, b)
        _compare(got, expected, f"linear_fixed_point (batch {b.shape[0]}, d {W.shape[0]}, "
                 f"‖W‖₂ {shape.get('scale', 0.7)}, {str(b.dtype).removeprefix('torch.')})", hint,
                 rtol=1e-4 if b.dtype == torch.float32 else 1e-10, atol=1e-5 if b.dtype ==
                 torch.float32 else 1e-12)
    return _passed("linear_fixed_point", "(I − W)⁻¹ b exactly, batches of 1 and 4, float32 too")


# ---------------------------------------------------------------- notebook 02

def _solver_problems():
    """(what, f, z0) for the solver checks: a batch of vectors, one sample, and an image-shaped
    state (batch, channels, height, width) mixed by one matrix; all contracting (‖J‖ ≤ 0.9)."""
    out = []
    for what, seed, shape in [("a batch of 4 vectors", 0, (4, 6)), ("one sample", 1, (1, 6)),
                              ("image-shaped states (2, 3, 2, 2)", 2, (2, 3, 2, 2))]:
        d = math.prod(shape[1:])
        W, U, b, x = _tanh_problem(seed, batch=shape[0], d_in=3, d=d, scale=0.9)
        injection = (x @ U.T + b).reshape(shape)

        def f(z, W=W, injection=injection):
            return torch.tanh((z.flatten(1) @ W.T).reshape(z.shape) + injection)

        out.append((what, f, torch.zeros(shape, dtype=DT)))
    return out


def _no_fixed_point():
    """f(z) = z + 1, which has no fixed point: a solver can never meet a tolerance of 0."""
    return lambda z: z + 1.0, torch.zeros(3, 2, dtype=DT)


def _solver_out(name: str) -> Callable:
    def convert(out):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"{name} should return a pair (z, residuals), got "
                              f"{type(out).__name__}.")
        z, residuals = out
        try:
            residuals = [float(r) for r in residuals]
        except (TypeError, ValueError):
            raise CheckFailed(f"{name}: `residuals` should be a list of numbers (one float per "
                              f"iteration, e.g. res.item()), got {type(residuals).__name__}.") from None
        return z, residuals
    return convert


def _residual(z: torch.Tensor, fz: torch.Tensor) -> float:
    return ((fz - z).norm() / fz.norm()).item()


def _check_solver(fn: Callable, name: str, hint: str, **kwargs) -> int:
    """The rules every solver exercise shares: the fixed point on each problem family, one
    evaluation of f per residual, residuals that are ‖f(z) − z‖ / ‖f(z)‖ of the iterates, stopping
    at the first residual ≤ tol, and at max_iter when tol is never met. Returns the most steps."""
    steps = 0
    for what, f_, z0 in _solver_problems():
        f = _Counted(f_, "f", 2000, " with max_iter=500")
        z_star = references.forward_iteration(f_, z0, tol=1e-14, max_iter=3000)[0]
        z, residuals = _call(fn, name, f, z0, tol=1e-10, max_iter=500, **kwargs,
                             convert=_solver_out(name))
        _compare(z, z_star, f"{name}'s fixed point on {what}", hint, rtol=1e-7, atol=1e-8)
        if f.calls != len(residuals):
            raise _fail(f"{name} on {what}", f"it evaluated f {f.calls} times for "
                        f"{len(residuals)} residuals.",
                        "Evaluate f once per iteration and use that one value twice: for the "
                        "residual ‖f(z) − z‖ / ‖f(z)‖ and for the next step (a solver's cost is "
                        "its number of evaluations of f).")
        if not (residuals and residuals[-1] <= 1e-10 and all(r > 1e-10 for r in residuals[:-1])):
            raise _fail(f"{name} on {what} with tol=1e-10",
                        f"the residuals end {residuals[-3:]}.", "Stop at the first residual ≤ tol, "
                        "and not before: the last residual is ≤ tol, every earlier one above it.")
        steps = max(steps, len(residuals))
    # the residuals are those of the iterates (recomputed from a second, recorded run)
    what, f_, z0 = _solver_problems()[0]
    seen = []

    def recorded(z):
        fz = f_(z)
        seen.append(_residual(z, fz))
        return fz

    _, residuals = _call(fn, name, recorded, z0, tol=1e-10, max_iter=500, **kwargs,
                         convert=_solver_out(name))
    for i, (r, expected) in enumerate(zip(residuals, seen)):
        if not _close(r, expected, 1e-6):
            raise _fail(f"{name}'s residual {i} on {what}", f"expected ‖f(z) − z‖ / ‖f(z)‖ = "
                        f"{expected!r} for the z it evaluated f at, got {r!r}.",
                        "The residual is the norm of f(z) − z over the whole batch divided by the "
                        "norm of f(z) (not of z), at the z where f was just evaluated.")
    # a map that never converges: the solver must stop after max_iter evaluations of f
    g_, z0 = _no_fixed_point()
    f = _Counted(g_, "f", 200, " with max_iter=15 on a map without a fixed point")
    _, residuals = _call(fn, name, f, z0, tol=0.0, max_iter=15, **kwargs, convert=_solver_out(name))
    if f.calls != 15 or len(residuals) != 15:
        raise _fail(f"{name} with tol=0 and max_iter=15 on a map without a fixed point",
                    f"it evaluated f {f.calls} times and returned {len(residuals)} residuals; "
                    f"expected 15 of each.", "max_iter bounds the number of evaluations of f: stop "
                    "after max_iter of them even when the residual never reaches tol.")
    return steps


@exercise
def check_forward_iteration(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter) -> (z, residuals) with plain forward iteration."""
    steps = _check_solver(fn, "forward_iteration", "Iterate z ← f(z) and stop when the relative "
                          "residual ‖f(z) − z‖ / ‖f(z)‖ is below tol (or after max_iter steps).")
    return _passed("forward_iteration", f"reaches the fixed point (≤ {steps} iterations), one f "
                   f"per iteration, stops at tol and at max_iter")


@exercise
def check_anderson(fn: Callable) -> bool:
    """fn(f, z0, tol, max_iter, m) -> (z, residuals) with Anderson acceleration."""
    hint = ("Keep the last m pairs (x_i, f(x_i)); solve for weights α with Σα = 1 minimising "
            "‖Σ α_i (f(x_i) − x_i)‖ per sample (flatten each sample's state), then step to "
            "Σ α_i f(x_i).")
    steps = _check_solver(fn, "anderson", hint, m=5)
    what, f, z0 = _solver_problems()[0]
    _, plain = _call(fn, "anderson", f, z0, tol=1e-10, max_iter=500, m=1, convert=_solver_out("anderson"))
    if steps >= len(plain):
        raise _fail("anderson with m=5 against m=1", f"{steps} iterations, no fewer than with m=1 "
                    f"({len(plain)}): the history is not being used.", hint)
    # Step by step against the reference: the same iterates, so the same residuals, for a small
    # window (where keeping one pair too many or too few shows at once).
    for what, f, z0 in _solver_problems()[::2]:
        _, expected = references.anderson(f, z0, tol=1e-10, max_iter=12, m=2)
        _, got = _call(fn, "anderson", f, z0, tol=1e-10, max_iter=12, m=2,
                       convert=_solver_out("anderson"))
        for i, (r_got, r_ref) in enumerate(zip(got, expected)):
            if not _close(r_got, r_ref, 1e-4):
                raise _fail(f"anderson with m=2 on {what}, residual {i}", f"expected {r_ref!r}, got "
                            f"{r_got!r} (the first {i} agree).",
                            "The history must hold exactly the last m pairs (drop the oldest once it "
                            "holds m: not m + 1, not m − 1), the new iterate is Σ α_i f(x_i), not "
                            "Σ α_i x_i, and the weights are solved per sample.")
    return _passed("anderson", f"reaches the fixed point in ≤ {steps} iterations (m=1: "
                   f"{len(plain)}), one f per iteration, the reference's iterates with m=2")


@exercise
def check_relative_residual(fn: Callable) -> bool:
    """fn(z, fz) -> per-sample ‖f(z) − z‖ / ‖f(z)‖, shape (batch,)."""
    g = torch.Generator().manual_seed(0)
    hint = ("One number per sample: flatten everything but the batch dimension (z.flatten(1)), "
            "take norms along dim=1, and divide by ‖f(z)‖, not by ‖z‖.")
    for shape, dtype in [((5, 3, 4), DT), ((1, 7), DT), ((2, 3, 4, 4), DT), ((6, 5), torch.float32)]:
        z = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        fz = torch.randn(shape, generator=g, dtype=DT).to(dtype)
        expected = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
        got = _call(fn, "relative_residual", z, fz)
        _compare(got, expected, f"relative_residual on a batch of shape {shape} "
                 f"({str(dtype).removeprefix('torch.')})", hint, rtol=1e-5, atol=1e-7)
    return _passed("relative_residual", "one correct value per sample, for vector, sequence and "
                   "image states, float32 too")


@exercise
def check_anderson_weights(fn: Callable) -> bool:
    """fn(G) -> α (n,) minimising ‖αᵀ G‖ subject to Σα = 1, for G of shape (n, D)."""
    hint = ("With H = G Gᵀ, the constrained minimiser is α = H⁻¹1 / (1ᵀ H⁻¹ 1): solve H y = 1, "
            "then divide y by its *sum* (the constraint is Σα = 1, not ‖α‖ = 1).")
    g = torch.Generator().manual_seed(0)
    families = [(2, 10, DT), (4, 10, DT), (1, 5, DT), (3, 8, torch.float32)]
    for n, D, dtype in families:
        G = torch.randn(n, D, generator=g, dtype=DT)
        if n == 4:                      # residuals that point alike: some weights are negative
            G[1:] += 2 * G[0]
        y = torch.linalg.solve(G @ G.T, torch.ones(n, dtype=DT))
        expected = (y / y.sum()).to(dtype)
        got = _call(fn, "anderson_weights", G.to(dtype))
        _compare(got, expected, f"anderson_weights for n={n}, D={D} "
                 f"({str(dtype).removeprefix('torch.')})", hint,
                 rtol=1e-3 if dtype == torch.float32 else 1e-7, atol=1e-5 if dtype ==
                 torch.float32 else 1e-9)
    return _passed("anderson_weights", "the constrained least-squares weights, summing to 1 "
                   "(negative ones included), n = 1 to 4, float32 too")


# ---------------------------------------------------------------- notebook 03

def _jacobians(seed: int, batch: int = 4, d: int = 6, scale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(batch, d, d, generator=g, dtype=DT)                   # not symmetric: Jᵀ ≠ J
    J *= scale / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    return J, torch.randn(batch, d, generator=g, dtype=DT)


def _vjp_of(J: torch.Tensor, shape: tuple) -> Callable:
    """vjp(y) = Jᵀ y per sample, for y of the given (batch, ...) shape."""
    return lambda y: (y.flatten(1)[:, None, :] @ J).squeeze(1).reshape(y.shape)


@exercise
def check_adjoint_solve(fn: Callable) -> bool:
    """fn(vjp, grad, tol, max_iter) -> g solving g = Jᵀ g + grad, where vjp(y) = Jᵀ y."""
    hint = ("Iterate g ← vjp(g) + grad (the upstream gradient is added at *every* step) until "
            "‖g_new − g‖ ≤ tol, at most max_iter times; starting from g = grad or g = 0 both work.")
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
        got = _call(fn, "train_step", mine, my_opt, x, y, convert=_numbered("train_step"),
                    may_change=("model",))
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
    got = _call(fn, "count_parameters", model, convert=_numbered("count_parameters"))
    if got != expected:
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
    # the gradient of the estimate, what Jacobian regularization trains with
    (grad_got,) = torch.autograd.grad(got.sum(), z, retain_graph=True, allow_unused=True)
    (grad_expected,) = torch.autograd.grad(references.hutchinson(f_z, z, probes).sum(), z)
    _compare(torch.zeros_like(z) if grad_got is None else grad_got, grad_expected, "the gradient of hutchinson's estimate with respect to z "
             "(basis probes)", "The estimate must stay a function of z all the way: no .detach(), "
             ".item() or torch.no_grad() between autograd.grad(..., create_graph=True) and the "
             "result.", rtol=1e-8, atol=1e-10)
    f_z, z, exact = _tanh_state(1)
    probes = torch.randn(4000, *z.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = _call(fn, "hutchinson", f_z, z, probes)
    if not (isinstance(got, torch.Tensor) and got.shape == exact.shape):
        raise _fail("hutchinson with 4000 Gaussian probes", f"expected a tensor of shape "
                    f"{tuple(exact.shape)}, got {type(got).__name__} "
                    f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}.")
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
        matvec = _Counted(lambda v: A @ v, "matvec", 1000, " with n_iter=300")
        got = _call(fn, "power_method", matvec, v0, 300, convert=_numbered("power_method"))
        if not 300 <= matvec.calls <= 302:
            raise _fail(f"power_method with n_iter=300 (λ = {top})", f"it called matvec "
                        f"{matvec.calls} times.", "One matrix–vector product per iteration, "
                        "n_iter iterations (and one more for the final estimate, if you need it).")
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
    for seed, (h, w) in [(0, (8, 8)), (1, (7, 7)), (2, (6, 9))]:   # odd: 7 → 4 → back to 7
        torch.manual_seed(seed)
        size = f"{h}×{w}"
        b0 = torch.randn(2, 4, h, w, dtype=DT)
        b1 = torch.randn(2, 6, (h + 1) // 2, (w + 1) // 2, dtype=DT)
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
            _compare(got[i], expected[i], f"fuse_two output f{i} (branch-0 size {size})",
                     hint, rtol=1e-10, atol=1e-12)
    return _passed("fuse_two", "both outputs right, for even, odd and non-square resolutions")


@exercise
def check_state_numel(fn: Callable) -> bool:
    """fn(channels, height, width) -> entries of one sample's multiscale state, branch i at
    ⌈H/2^i⌉ × ⌈W/2^i⌉ (each stride-2 conv maps a side s to ⌈s/2⌉)."""
    for channels, h, w in [([24, 24], 32, 32), ([32, 64, 128, 256], 56, 56), ([4, 8, 16], 7, 9)]:
        got = _call(fn, "state_numel", list(channels), h, w, convert=_numbered("state_numel"))
        # halving i times rounding up each time is one division rounding up: ⌈s / 2^i⌉
        expected = sum(c * -(-h // 2 ** i) * -(-w // 2 ** i) for i, c in enumerate(channels))
        if got != expected:
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
        got = _call(fn, "unigram_bits", counts.clone(), convert=_numbered("unigram_bits"))
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
        counted = _Counted(vjp, "vjp", 10 * k * k + 10)
        got = _call(fn, "neumann_adjoint", counted, grad.clone(), k)
        _compare(got, expected, f"neumann_adjoint with k={k} on a batch of 4 random 6×6 Jacobians",
                 hint, rtol=1e-10, atol=1e-12)
        if counted.calls > k:
            raise _fail(f"neumann_adjoint with k={k}", f"the value is right, but it took "
                        f"{counted.calls} vector–Jacobian products; k − 1 are enough (k if you "
                        f"compute one term too many and drop it).", "Keep the last term and apply "
                        "vjp to it once per step (term ← vjp(term)), instead of recomputing "
                        "(Jᵀ)ⁱ grad from grad for every i: that costs i products for term i.")
    J4, grad4 = _jacobians(5, batch=2, d=8)
    grad4 = grad4.reshape(2, 2, 2, 2)
    vjp4 = _vjp_of(J4, grad4.shape)
    expected, term = torch.zeros_like(grad4), grad4
    for _ in range(4):
        expected, term = expected + term, vjp4(term)
    _compare(_call(fn, "neumann_adjoint", vjp4, grad4, 4), expected, "neumann_adjoint with k=4 "
             "on image-shaped gradients (2, 2, 2, 2)", hint, rtol=1e-10, atol=1e-12)
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
        for p in model.parameters():                  # a .grad the student must leave alone
            p.grad = torch.full_like(p, 0.5)
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
        if any(p.grad is None or not bool((p.grad == 0.5).all()) for p in model.parameters()):
            raise CheckFailed("data_parallel_gradient changed the parameters' .grad: return the "
                              "gradients instead (torch.autograd.grad does not touch .grad), or "
                              "save each p.grad before calling .backward() and put it back.")
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


# ---------------------------------------------------------------- drafts (merged above before landing)
for _draft in ("02", "03", "04", "05", "06", "07", "09"):
    try:
        _module = __import__(f"deqlite.classroom._draft_{_draft}", fromlist=["*"])
    except ModuleNotFoundError as _e:
        if _e.name != f"deqlite.classroom._draft_{_draft}":
            raise
        continue
    globals().update({_n: getattr(_module, _n) for _n in dir(_module) if _n.startswith("check_")})
