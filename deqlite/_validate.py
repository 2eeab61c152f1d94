"""Argument checks shared by the package: every error says what was wrong and what to do.

Options are keyword-only and validated; an unknown option is an error, never silently ignored
(TorchDEQ's habit of dropping mistyped keyword arguments is what we are avoiding here).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Any, Callable, Iterable, Mapping

import torch


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A ' Did you mean 'x'?' suffix when `name` is close to one of `valid`, else ''."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def lookup(registry: Mapping[str, Any] | Iterable[str], name: str, what: str) -> Any:
    """`registry[name]` (or `name` itself when `registry` is a plain collection of names), or a
    ValueError listing the valid names."""
    if not isinstance(registry, Mapping):
        registry = {key: key for key in registry}
    if not isinstance(name, str) or name not in registry:
        valid = ", ".join(repr(k) for k in registry)
        hint = did_you_mean(name, registry) if isinstance(name, str) else ""
        raise ValueError(f"unknown {what} {name!r}; choose one of {valid}.{hint}")
    return registry[name]


def check_stop(stop: Any) -> None:
    """The stopping rule applies to the relative or the absolute residual."""
    if stop not in ("rel", "abs"):
        raise ValueError(f"stop must be 'rel' or 'abs', got {stop!r}.")


@functools.lru_cache(maxsize=None)        # (inspect.signature takes ~25 µs, and solves call this)
def keyword_options(fn: Callable) -> tuple[str, ...]:
    """The keyword-only parameters of `fn` (the options a solver accepts)."""
    return tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_keys(given: Iterable[str], valid: Iterable[str], *, what: str | None = None,
               noun: str = "option", error: type = TypeError) -> None:
    """The one "unknown key" check: raise `error` for the first key of `given` that is not in
    `valid`, naming it, suggesting the closest valid one and listing them all. `what` says whose
    keys they are ("solver 'anderson'"); `noun` what they are ("option", "config key")."""
    valid = list(valid)
    for key in given:
        if key not in valid:
            who = f"{what} got an unknown {noun}" if what else f"unknown {noun}"
            raise error(f"{who} {key!r}.{did_you_mean(str(key), valid)} "
                        f"Valid {noun}s: {', '.join(valid)}.")


def check_options(fn: Callable, options: Mapping[str, Any], what: str) -> None:
    """Raise TypeError naming every option in `options` that `fn` does not take."""
    check_keys(options, keyword_options(fn), what=what)


def strict_options(fn: Callable) -> Callable:
    """Decorate a function whose options are keyword-only: a mistyped option is a TypeError that
    names it, suggests the closest valid one and lists them all (Python's own message does not)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        check_options(fn, kwargs, f"{fn.__name__}()")
        return fn(*args, **kwargs)
    return wrapper


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±inf in t, in one pass and one host sync: NaN propagates to both ends of
    ``aminmax``, and an infinity is one of them (``isfinite(t).all()``, several passes, takes
    ~10× as long on a (64, 256) state, which every cell's forward checks)."""
    if t.numel() == 0:
        return True
    low, high = torch.stack(torch.aminmax(t.detach())).tolist()   # detached: no graph through t
    return math.isfinite(low) and math.isfinite(high)


def check_tensor(t: Any, name: str, *, min_dim: int = 1) -> None:
    """A floating-point tensor with a batch dimension and only finite values."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}, but DEQs need floating-point tensors: "
                        f"convert it with {name}.float() (or .double() for gradient checks).")
    if t.dim() < min_dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it needs a leading batch dimension "
                         f"(shape (batch, ...)). For a single sample use {name}.unsqueeze(0).")
    if not all_finite(t):
        bad = (~torch.isfinite(t.detach())).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); clean or normalize the input "
                         f"before the equilibrium solve.")


def check_range(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, integer: bool = False) -> None:
    """`value` is a number in [low, high] (or (low, high] with low_open); never NaN."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, "
                        f"got {value!r}.")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{lo}, {hi}], got {value!r}.")


def check_positive_ints(**values: Any) -> None:
    """Each keyword's value is an integer ≥ 1 (sizes: widths, heads, classes, ...)."""
    for name, value in values.items():
        check_range(value, name, low=1, integer=True)


def check_int_list(values: Any, name: str, *, low: int = 1, high: int | None = None,
                   example: str = "[32, 64]") -> list:
    """A non-empty list (or tuple) of integers in [low, high], returned as a list (channels per
    branch, head widths, the adaptive softmax's cutoffs)."""
    if isinstance(values, int) or not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{name} must be a non-empty list of integers, e.g. {example}, got "
                        f"{values!r}.")
    for i, value in enumerate(values):
        check_range(value, f"{name}[{i}]", low=low, high=high, integer=True)
    return list(values)
