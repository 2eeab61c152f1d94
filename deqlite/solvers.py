"""Fixed-point solvers: find z* with z* = f(z*) for a batch of samples.

Every solver has one signature,

    ``solve(f, z0, *, tol, max_iter, stop="rel", callback=None, **options) -> (z_star, SolverStats)``

and the same batch conventions:

* z0 has shape (batch, ...); f maps a tensor of that shape to one of the same shape. A state may
  also be a list of tensors with a common batch size (a multiscale DEQ keeps one feature map per
  resolution): the solvers work on the flat concatenation (batch, D) (``flatten_state``) and f
  sees and returns lists (``unflatten_state``).
* Convergence is judged per sample: a sample is done when its residual (``stop="rel"``:
  ‖f(z) − z‖ / ‖f(z)‖, ``stop="abs"``: ‖f(z) − z‖) is at most ``tol``. A sample that is done stops
  changing; the loop ends when every sample is done or after ``max_iter`` evaluations of f.
* The returned z is, per sample, the best iterate seen (lowest residual), so a solve that fails
  to converge still returns its best guess. ``stats.converged`` says which samples made it; a
  sample whose f(z) went NaN/inf (``stats.nonfinite``) keeps its best finite iterate, or is NaN.
* f is evaluated exactly once per iteration, so ``stats.nfe`` is the number of iterations.
* Convergence is tested every ``check_every`` evaluations (default 1: the solve ends at the first
  evaluation where every sample is done). A larger value saves the test's host synchronization,
  a stall on a GPU, at the price of up to ``check_every − 1`` extra evaluations; what is returned
  is the same. The shared bookkeeping (``deqlite._tracker``) explains how it stays cheap.

The three methods (see each docstring for the math):

* ``forward_iteration``: z ← z + τ (f(z) − z). Converges when f is a contraction.
* ``anderson``: Anderson acceleration (Anderson 1965; Walker & Ni 2011), mixing the last m iterates.
* ``broyden``: limited-memory "good" Broyden quasi-Newton on g(z) = f(z) − z (Broyden 1965),
  as used in the DEQ papers (Bai, Kolter, Koltun 2019).

All solvers run under autograd if the caller enables it, which is how ``DEQ(backward="unrolled")``
backpropagates through the iterations; then no tensor is modified in place (without autograd,
the solvers' history buffers are, which saves a copy per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ._validate import check_options, check_stop, check_tensor, lookup
from ._tracker import Tracker

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
State = Union[torch.Tensor, Sequence[torch.Tensor]]


def flatten_state(state: State, name: str = "z", *, check: bool = True) -> tuple[torch.Tensor, Any]:
    """``(flat, spec)``: a tensor state as (batch, D), or a list of tensors (one batch size) as
    the concatenation of their flattened entries; ``spec`` remembers how to undo it.
    ``check``: also require floating-point, finite values (off for f's outputs, which the
    solvers check themselves)."""
    if isinstance(state, torch.Tensor):
        if check:
            check_tensor(state, name)
        return state.flatten(1), tuple(state.shape[1:])
    if not isinstance(state, (list, tuple)) or not state or \
            not all(isinstance(t, torch.Tensor) for t in state):
        raise TypeError(f"{name} must be a tensor or a non-empty list of tensors, got "
                        f"{type(state).__name__}.")
    for i, t in enumerate(state if check else ()):
        check_tensor(t, f"{name}[{i}]")
    batch, dtype = state[0].shape[0], state[0].dtype
    if any(t.shape[0] != batch or t.dtype != dtype or t.device != state[0].device for t in state):
        raise ValueError(f"the tensors of {name} must share batch size, dtype and device; got "
                         + ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in state) + ".")
    return torch.cat([t.flatten(1) for t in state], dim=1), [tuple(t.shape[1:]) for t in state]


def unflatten_state(flat: torch.Tensor, spec: Any) -> State:
    """Inverse of ``flatten_state``: (batch, D) back to the state's own shape(s)."""
    if isinstance(spec, tuple):
        return flat.reshape(flat.shape[0], *spec)
    sizes = [math.prod(s) for s in spec]
    return [part.reshape(flat.shape[0], *s) for part, s in zip(flat.split(sizes, dim=1), spec)]


def state_tensors(state: State) -> list:
    """The tensors of a state: ``[state]`` for a tensor, the list itself for a list state."""
    return [state] if isinstance(state, torch.Tensor) else list(state)


def detach_state(state: State) -> State:
    """The state, detached from autograd's graph (a tensor, or each tensor of a list)."""
    return state.detach() if isinstance(state, torch.Tensor) else [t.detach() for t in state]


def where_state(mask: torch.Tensor, new: State, old: State) -> State:
    """Per sample (``mask``: (batch,) bool), ``new`` where true and ``old`` elsewhere, for tensors
    of any shape (batch, ...) or lists of them."""
    if isinstance(new, torch.Tensor):
        return torch.where(mask.reshape(-1, *[1] * (new.dim() - 1)), new, old)
    return [where_state(mask, n, o) for n, o in zip(new, old)]


def _is_state(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and len(x) > 0
                                           and all(isinstance(t, torch.Tensor) for t in x))


def _describe(state: Any) -> str:
    """``"shape (2, 3), torch.float32, cpu"`` for a tensor state, the same per entry for a list."""
    if isinstance(state, torch.Tensor):
        return f"shape {tuple(state.shape)}, {state.dtype}, {state.device}"
    return f"[{'; '.join(map(_describe, state))}]" if _is_state(state) else \
        f"a {type(state).__name__}"


# every solver's settings and options: name -> (low, high, low_open, integer, what it is)
SETTINGS = {
    "tol": (0, None, False, False, "the residual to stop at; 0 runs exactly max_iter steps"),
    "max_iter": (1, None, False, True, "the most evaluations of f"),
    "damping": (0, 1, True, False, "forward_iteration's step size τ"),
    "m": (1, None, False, True, "anderson's history length"),
    "beta": (0, 1, True, False, "anderson's mixing weight"),
    "lam": (0, None, False, False, "anderson's relative regularizer"),
    "memory": (1, None, False, True, "broyden's number of rank-one updates"),
    "check_every": (1, None, False, True, "evaluations between convergence tests"),
}


def check_setting(**values: Any) -> None:
    """Each ``name=value`` is a number (not a bool) in the range ``SETTINGS[name]`` gives, never
    NaN or inf; the error names the setting, what it is, the range and the value."""
    for name, value in values.items():
        low, high, low_open, integer, what = SETTINGS[name]
        interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise TypeError(f"{name} must be {'an integer' if integer else 'a number'} in "
                            f"{interval} ({what}), got {value!r}.")
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise ValueError(f"{name} must lie in {interval} ({what}), got {value!r}.")


def check_settings(tol: Any, max_iter: Any, stop: Any, options: Mapping[str, Any]) -> None:
    """The stopping rule and a solver's options (``SETTINGS``), checked before any iteration."""
    check_setting(tol=tol, max_iter=max_iter, **{k: v for k, v in options.items() if k in SETTINGS})
    check_stop(stop)
    if stop == "rel" and tol >= 1:              # z = 0 has relative residual 1: z0 would pass
        raise ValueError(f"tol must be below 1 for stop='rel', got {tol!r}: z = 0 already has a "
                         f"relative residual of 1, so z0 would count as converged. Use tol ≈ 1e-4.")


class _Map:
    """f on flat iterates: ``_Map(f, spec)(z)`` unflattens z (batch, D) to the state's shape(s),
    applies f, checks that f returned a state like it (attribute checks only: no host sync) and
    returns f(z) flat. ``dtype`` is the least precise of the state's and f's (autocast)."""

    def __init__(self, f, spec: Any, z0: torch.Tensor):
        self.f, self.spec, self.dtype, self.device = f, spec, z0.dtype, z0.device
        self.state_dtype = z0.dtype
        self.shape = (len(z0), *spec) if isinstance(spec, tuple) else None   # a tensor state
        self.flat = self.shape is not None and len(spec) == 1                # of shape (batch, D)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        state = z if self.flat else unflatten_state(z, self.spec)
        fz = self.f(state)
        if isinstance(fz, torch.Tensor) and fz.shape == self.shape and fz.dtype is self.state_dtype \
                and fz.device == self.device:
            return fz if fz.dim() == 2 else fz.flatten(1)          # the common case, quickly
        flat, spec = flatten_state(fz, "f(z)", check=False) if _is_state(fz) else (z[:0], None)
        dtype_ok = flat.dtype == z.dtype or torch.is_autocast_enabled(z.device.type)  # on purpose
        if (spec, len(flat), flat.device) != (self.spec, len(z), z.device) or not dtype_ok:
            raise ValueError(
                f"f(z) returned {_describe(fz)} for a state of {_describe(state)}: a fixed-point "
                f"map must return a state of the same shape (batch size included), dtype and "
                f"device as its input. Cast inside f (.to(z.dtype)), or make the state and the "
                f"cell agree (e.g. cell.double() for a float64 state).")
        self.dtype = max(self.dtype, flat.dtype, key=lambda t: torch.finfo(t).eps)
        return flat


def _start(name: str, f, z0: State, tol, max_iter, stop, callback, check_every):
    """Validate a solve's common arguments and return ``(z0 flat, f on flat iterates, tracker)``."""
    z0, spec = flatten_state(z0, "z0")                        # (batch, D) and how to undo it
    check_settings(tol, max_iter, stop, {"check_every": check_every})
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(iteration, abs_res, rel_res).")
    apply = _Map(f, spec, z0)
    return z0, apply, Tracker(name, apply, z0, tol=tol, max_iter=max_iter, stop=stop,
                              callback=callback, check_every=check_every)


def _finish(tracker: Tracker, apply: _Map):
    best_z, stats = tracker.finish(apply.dtype)
    return unflatten_state(best_z, apply.spec), stats


def forward_iteration(f, z0, *, tol: float = 1e-4, max_iter: int = 50, stop: str = "rel",
                      damping: float = 1.0, check_every: int = 1,
                      callback: Optional[Callback] = None):
    """Damped fixed-point (Picard / Krasnosel'skii–Mann) iteration

        z_{k+1} = z_k + τ (f(z_k) − z_k),     τ = ``damping`` in (0, 1].

    With τ = 1 this is plain iteration z ← f(z); it converges linearly, at rate ρ(J_f), when f
    is a contraction. τ < 1 trades speed for stability on maps that oscillate.
    ``check_every``: test for convergence every that many evaluations (see ``deqlite._tracker``).
    """
    check_setting(damping=damping)
    z, apply, tr = _start("forward_iteration", f, z0, tol, max_iter, stop, callback, check_every)
    fz = tr.evaluate(z)
    while tr.running():
        step = fz if damping == 1 else torch.lerp(z, fz, damping)   # z + τ (f(z) − z)
        z = step if tr.mask is None else torch.where(tr.mask, z, step)  # frozen samples stay
        fz = tr.evaluate(z)
    return _finish(tr, apply)


def _write(buffer: torch.Tensor, index, value: torch.Tensor) -> torch.Tensor:
    """``buffer[index] = value``, in place when autograd is off (the forward and adjoint solves
    of a DEQ), on a copy when it is on (``backward="unrolled"``), so that tensors autograd saved
    for the backward pass are never overwritten."""
    if torch.is_grad_enabled():
        buffer = buffer.clone()
    buffer[index] = value
    return buffer


class AndersonMixer:
    """Anderson's history: the images f_i and residuals g_i = f_i − x_i of the last m iterates in
    ring buffers (x_i = f_i − g_i is not stored), with the Gram matrix of the residuals.
    ``step(x, fx, frozen, g)`` adds a pair and returns the next iterate (rows marked in the (batch,)
    bool ``frozen`` stay; None: none is, and no masking work is done; ``g``: fx − x or None).
    ``anderson`` is this plus the bookkeeping every solver shares; ``deqlite.jiio`` uses it too.

    Args: batch, dim (the flat state's shape), m, beta, lam (see ``anderson``), like (a tensor
    whose dtype and device the buffers take)."""

    def __init__(self, batch: int, dim: int, *, m: int, beta: float, lam: float, like: torch.Tensor):
        check_setting(m=m, beta=beta, lam=lam)
        self.m, self.beta, self.lam, self.k = m, beta, max(lam, torch.finfo(torch.float64).eps), 0
        self.acc = torch.promote_types(like.dtype, torch.float32)  # float16 g·g overflows: 65504
        self.F, self.G = like.new_zeros(batch, m, dim), like.new_zeros(batch, m, dim)
        self.gram = torch.zeros(batch, m, m, dtype=torch.float64, device=like.device)
        self.eye = torch.eye(m, dtype=torch.float64, device=like.device)
        self.ones = torch.ones(batch, m, 1, dtype=torch.float64, device=like.device)

    def step(self, x: torch.Tensor, fx: torch.Tensor, frozen: Optional[torch.Tensor] = None,
             g: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None if frozen is None else frozen[:, None]
        slot, n = self.k % self.m, min(self.k + 1, self.m)
        g = fx - x if g is None else g
        g = g if mask is None else torch.where(mask, 0.0, g)
        every = slice(None)
        self.F, self.G = _write(self.F, (every, slot), fx), _write(self.G, (every, slot), g)
        # g_new·g_i for every slot in one batched product (a row vector times Gᵀ, the fast layout;
        # slots not filled yet are zero), written into row and column `slot` (cast to float64)
        G = self.G if self.acc == self.G.dtype else self.G.to(self.acc)
        row = torch.bmm(g.to(self.acc)[:, None], G.mT)[:, 0]
        self.gram = _write(self.gram, (every, slot), row)
        self.gram = _write(self.gram, (every, slice(None), slot), row)
        H = self.gram if n == self.m else self.gram[:, :n, :n]
        reg = H.diagonal(dim1=1, dim2=2).sum(-1) * (self.lam / n)        # λs, s = mean ‖g_i‖²
        H = torch.addcmul(H, reg[:, None, None], self.eye[:n, :n])       # H + λs I
        if mask is not None:
            H = torch.where(mask[..., None], self.eye[:n, :n], H)   # frozen: any regular H will do
        y = torch.linalg.solve_ex(H, self.ones[:, :n], check_errors=False)[0]   # H y = 1
        alpha = (y / y.sum(1, keepdim=True)).to(fx.dtype).mT                 # (batch, 1, n)
        F = self.F if n == self.m else self.F[:, :n]
        mixed = torch.bmm(alpha, F)[:, 0]                                     # Σ α_i f_i
        if self.beta != 1:                                # β Σ α_i f_i + (1 − β) Σ α_i x_i
            G = self.G if n == self.m else self.G[:, :n]
            mixed = mixed - (1 - self.beta) * torch.bmm(alpha, G)[:, 0]
        self.k += 1
        return mixed if mask is None else torch.where(mask, x, mixed)


def anderson(f, z0, *, tol: float = 1e-4, max_iter: int = 50, stop: str = "rel",
             m: int = 5, beta: float = 1.0, lam: float = 1e-4, check_every: int = 1,
             callback: Optional[Callback] = None):
    """Anderson acceleration: extrapolate from the last m iterates.

    With iterates x_i, images f_i = f(x_i) and residuals g_i = f_i − x_i (i over the last n ≤ m),
    choose weights α that minimise the mixed residual

        min_α ‖Σ_i α_i g_i‖²   subject to  Σ_i α_i = 1,

    whose solution is α = H⁻¹1 / (1ᵀH⁻¹1) with H = G Gᵀ + λ s I, and step to

        x_{k+1} = β Σ_i α_i f_i + (1 − β) Σ_i α_i x_i  =  Σ_i α_i f_i − (1 − β) Σ_i α_i g_i.

    The regularizer is *scaled to the residuals*: s = mean_i ‖g_i‖². A fixed λ (as in the
    original tutorial and TorchDEQ) dominates H once the residuals are small, which pulls α towards
    uniform averaging and makes Anderson crawl exactly when it is close; scaling keeps λ a
    relative (scale-free) amount of damping.

    The history (``AndersonMixer``) is a ring of m slots; each step overwrites the oldest and adds
    one row and column to the Gram matrix G Gᵀ (O(m·D) work, not O(m²·D)). The small n×n systems
    are solved in float64, with λ at least float64's eps (λ = 0 would leave H singular when the
    residuals are dependent, e.g. a history longer than the state).
    With m ≥ the number of steps and β = 1, on a linear map Anderson *is* GMRES (Walker & Ni 2011;
    ``tests/test_anderson_gmres.py``), optimal among Krylov methods: on slow, near-orthogonal maps
    m = D takes the fewest evaluations (``bench_solvers.py``), with λ ≈ 1e-6 (s is then large).
    ``check_every``: test for convergence every that many evaluations (see ``deqlite._tracker``).
    """
    x, apply, tr = _start("anderson", f, z0, tol, max_iter, stop, callback, check_every)
    mixer = AndersonMixer(*x.shape, m=m, beta=beta, lam=lam, like=x)
    fx, g = tr.evaluate_g(x)                       # g = f(x) − x, as the tracker computed it
    while tr.running():
        x = mixer.step(x, fx, None if tr.mask is None else tr.frozen, g)
        fx, g = tr.evaluate_g(x)
    return _finish(tr, apply)


def _low_rank(y: torch.Tensor, U: torch.Tensor, V: torch.Tensor, n: int) -> torch.Tensor:
    """(−I + Σ_{i<n} u_i v_iᵀ) y, for a batch: two batched products, the dot products v_i · y
    (a row vector times Vᵀ), then Σ_i u_i (v_i · y) (that row times U)."""
    if n == 0:
        return -y
    coeff = torch.bmm(y[:, None], V[:, :n].mT)                       # (batch, 1, n)
    return torch.baddbmm(y[:, None], coeff, U[:, :n], beta=-1)[:, 0]


def broyden(f, z0, *, tol: float = 1e-4, max_iter: int = 50, stop: str = "rel",
            memory: int = 30, check_every: int = 1, callback: Optional[Callback] = None):
    """Limited-memory "good" Broyden method for the root of g(z) = f(z) − z.

    Keep an approximation B ≈ J_g⁻¹ as a low-rank correction of B₀ = −I,

        B = −I + Σ_i u_i v_iᵀ,   step  z ← z − B g(z),

    and after each step (Δz, Δg) apply the rank-one "good" update that makes B Δg = Δz:

        B ← B + (Δz − B Δg) (Δzᵀ B) / (Δzᵀ B Δg).

    At most ``memory`` pairs (u_i, v_i) are kept: when all are used, B restarts from −I, so a
    step costs O(memory · D) however large ``max_iter`` is. Dropping the oldest pair instead (the
    DEQ research code) leaves the others inconsistent and can blow up; a window of the last steps
    or a rank reduction did not beat restarting in time (``benchmarks/broyden_bounded_memory.py``).
    The default, 30, is measured (``bench_solvers.py --sweeps``). ``memory=max_iter`` keeps every
    pair (TorchDEQ's default), for solves as long as the state has dimensions: B becomes J⁻¹.

    Each application of B, or of Bᵀ (U and V swapped), is two batched products (``_low_rank``).
    ``check_every``: test for convergence every that many evaluations (see ``deqlite._tracker``).
    """
    check_setting(memory=memory)
    z, apply, tr = _start("broyden", f, z0, tol, max_iter, stop, callback, check_every)
    memory = min(memory, max_iter)
    U, V = (z.new_zeros(len(z), min(memory, 8), z.shape[1]) for _ in range(2))  # room grows
    n = 0                                                 # pairs in use: B = −I + U[:n]ᵀ V[:n]
    g = tr.evaluate_g(z)[1]                               # g(z) = f(z) − z
    Bg = -g
    acc = torch.promote_types(z.dtype, torch.float32)       # float16 dot products overflow
    dot = lambda a, b: torch.linalg.vecdot(a.to(acc), b.to(acc))[:, None]   # noqa: E731
    while tr.running():
        z_new = z - Bg if tr.mask is None else torch.where(tr.mask, z, z - Bg)  # frozen: stay
        g_new = tr.evaluate_g(z_new)[1]
        if n == memory:                                   # memory full: restart from B = −I
            n, Bg = 0, -g
        # Δz is the step as taken (z_new − z, not −B g: near z* the rounding of z + step is a
        # large part of a small step, and the secant condition must hold for the step made)
        dz, Bg_new = z_new - z, _low_rank(g_new, U, V, n)
        dzT_B = _low_rank(dz, V, U, n)                    # Bᵀ Δz = (Δzᵀ B)ᵀ
        denom = dot(dzT_B, g_new - g)                     # Δzᵀ B Δg, (batch, 1)
        # 1 / Δzᵀ B Δg, or 0 where it is not finite (Δzᵀ B Δg = 0 or NaN): no update there
        inv = torch.nan_to_num(denom.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0)
        if tr.mask is not None:
            inv = inv.masked_fill(tr.mask, 0.0)           # frozen samples: no update
        u = dz - (Bg_new - Bg)                            # Δz − B Δg (B Δg by linearity)
        # the updated B times g_new, then u scaled: B ← B + u (Δzᵀ B) / Δzᵀ B Δg
        Bg_new = torch.addcmul(Bg_new, u, (dot(dzT_B, g_new) * inv).to(u.dtype))
        u = u * inv.to(u.dtype)
        if n == U.shape[1]:                               # double the room (up to memory)
            U, V = (torch.cat([W, torch.zeros_like(W[:, :memory - n])], 1) for W in (U, V))
        U, V = _write(U, (slice(None), n), u), _write(V, (slice(None), n), dzT_B)
        n += 1
        z, g, Bg = z_new, g_new, Bg_new
    return _finish(tr, apply)


SOLVERS = {"forward_iteration": forward_iteration, "anderson": anderson, "broyden": broyden}


def get_solver(name: str):
    """The solver function registered under `name` (see ``SOLVERS``)."""
    return lookup(SOLVERS, name, "solver")


def solve(f, z0, *, solver: str = "anderson", **options):
    """Run the solver named `solver` with validated keyword options (an unknown option is an
    error that lists the valid ones) and return ``(z_star, stats)``."""
    fn = get_solver(solver)
    check_options(fn, options, f"solver {solver!r}")
    return fn(f, z0, **options)


STOPPING = ("tol", "max_iter", "stop", "callback")      # a spec's own fields, not its options


@dataclass(frozen=True)
class SolverSpec:
    """One solve's settings, validated once when made (a typo or a NaN fails at construction,
    not in training) and frozen: change one with ``dataclasses.replace(spec, tol=1e-6)``.

        spec = SolverSpec("anderson", tol=1e-4, max_iter=50, options={"m": 6})
        z_star, stats = spec(f, z0)

    Attributes: ``name`` (a key of ``SOLVERS``), ``tol``, ``max_iter``, ``stop`` (see the module
    docstring) and ``options``, the solver's own keyword options (read-only).
    """
    name: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 50
    stop: str = "rel"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.options, Mapping):
            raise TypeError(f"a solver's options must be a dict such as {{'m': 6}}, got "
                            f"{type(self.options).__name__}.")
        for key in STOPPING:
            if key in self.options:
                raise TypeError(f"pass {key!r} as its own argument (DEQ(..., {key}=...)), not "
                                f"inside the solver's options.")
        check_options(self.fn, self.options, f"solver {self.name!r}")
        check_settings(self.tol, self.max_iter, self.stop, self.options)
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __reduce__(self):              # copy.deepcopy and pickle (a mappingproxy cannot be pickled)
        return SolverSpec, (self.name, self.tol, self.max_iter, self.stop, dict(self.options))

    @property
    def fn(self) -> Callable:
        """The solver function (``SOLVERS[name]``)."""
        return get_solver(self.name)

    def __call__(self, f, z0, *, callback: Optional[Callback] = None):
        """``(z_star, stats)`` of the solve of z = f(z) from z0 with these settings."""
        return self.fn(f, z0, tol=self.tol, max_iter=self.max_iter, stop=self.stop,
                       callback=callback, **self.options)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.name}(tol={self.tol:g}, max_iter={self.max_iter}, stop={self.stop!r}{options})"
