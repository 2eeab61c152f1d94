"""The gradient rule: how the gradient of a loss reaches θ and x through z* = f(z*, x).

The third part of a DEQ, beside the cell and the solver. The forward solve keeps no graph; after
it, a rule applies f again at z* *with* a graph and decides what the backward pass does there.

``IFT`` (implicit function theorem; Bai, Kolter, Koltun 2019). Differentiating z* = f(z*, x) gives
dz*/dθ = (I − J)⁻¹ ∂f/∂θ with J = ∂f/∂z at z*. For a loss ℓ,

    ∂ℓ/∂θ = gᵀ ∂f(z*, x)/∂θ,   where the adjoint g solves   g = Jᵀ g + ∂ℓ/∂z*,

itself a fixed point, solved with any of the solvers using vector–Jacobian products (Jᵀ y is one
``autograd.grad`` call). Memory is that of a single application of f, whatever the number of
iterations. In code: z = f(z*, x) with a graph, and a hook on z replaces the incoming gradient
∂ℓ/∂z* by g; autograd then computes gᵀ ∂f/∂θ and gᵀ ∂f/∂x through the same graph.

The shortcuts replace the exact adjoint g = (I − Jᵀ)⁻¹ ∂ℓ/∂z* by a cheaper one. They are good
when the spectral radius ρ(J) is well below 1 and degrade as it approaches 1 (notebook 09):

* ``JFB`` (Jacobian-free backprop; Fung et al., AAAI 2022): g = ∂ℓ/∂z*, i.e. backpropagate through
  the single application z = f(z*, x): ∂ℓ/∂θ ≈ (∂ℓ/∂z*)ᵀ ∂f(z*, x)/∂θ. No adjoint solve.
* ``Neumann(k)``: the first k terms of (I − Jᵀ)⁻¹ = Σ_i (Jᵀ)ⁱ, g = Σ_{i<k} (Jᵀ)ⁱ ∂ℓ/∂z* (k − 1
  vector–Jacobian products in IFT's hook). Its error Σ_{i≥k} (Jᵀ)ⁱ ∂ℓ/∂z* shrinks asymptotically
  like ρ(J)ᵏ; its norm is at most ‖J‖ᵏ ‖∂ℓ/∂z*‖ / (1 − ‖J‖) when ‖J‖ < 1 (a bound needs a norm:
  for a non-normal J, ‖J‖ can be well above ρ(J)). k = 1 is JFB; k → ∞ is IFT when ρ(J) < 1.
* ``Phantom(k, τ)`` (unrolling-based phantom gradient; Geng et al., NeurIPS 2021): from z₀ = z*
  (detached) take k damped steps with a graph,  z_{j+1} = (1 − τ) z_j + τ f(z_j, x),  output z_k,
  and backpropagate through them. At z* this is ∂ℓ/∂θ ≈ (∂ℓ/∂z*)ᵀ A ∂f/∂θ with
  A = τ Σ_{j<k} ((1 − τ) I + τ J)ʲ → (I − J)⁻¹ as k → ∞ whenever the damped map contracts.
  k = 1, τ = 1 is JFB; τ = 1 is the Neumann series (with J taken along the k steps).

``Unrolled``: the forward solver itself runs with autograd recording every iteration, and
backpropagation goes through all of them and the final z = f(z*, x) (memory grows with the
iterations): the reference.

What each rule leaves in ``rule.stats`` (``DEQ.backward_stats``), a ``SolverStats``:

* ``IFT``: the adjoint solve's, set once ``.backward()`` has run.
* ``Neumann``: set once ``.backward()`` has run, ``solver="neumann"``; it reads like k steps of
  forward iteration on g = Jᵀ g + ∂ℓ/∂z* from g = 0 (``tol=0``): ``nfe = k`` (the first step,
  Jᵀ0 = 0, is free: k − 1 products), row j of ``abs_residuals`` is ‖(Jᵀ)ʲ ∂ℓ/∂z*‖, the j-th term
  (= the adjoint residual of the partial sum before it), ``rel_residuals`` that over the norm of
  the partial sum after it. Terms that do not shrink (``stats.diverged``) mean ρ(J) ≥ 1.
* ``Phantom``: set by the forward pass, ``solver="phantom"``, ``nfe = k``, row j the residual
  ‖f(z_j) − z_j‖ (and relative) of the j-th damped step.
* ``JFB`` and ``Unrolled``: None (no work beyond one application of f, or the solver's own).

Second derivatives (``create_graph=True``: a gradient penalty, a Hessian–vector product, MAML):

* ``Unrolled``: exact for what the solver computed, since autograd recorded every iteration.
* ``JFB`` and ``Phantom``: plain autograd graphs, so autograd differentiates them again; what
  comes out are the second derivatives of their *surrogates* ℓ(f(z*, x)) and ℓ(z_k), z* held
  fixed, consistent with the first derivatives these rules give.
* ``IFT`` and ``Neumann`` raise ``DoubleBackwardError``. Their hook swaps ∂ℓ/∂z* for the adjoint
  inside the backward pass, at a z* that carries no graph (the solver kept none). A second
  derivative needs how g and ∂f/∂θ(z*, x) move with θ *through* z*, dz*/dθ = (I − J)⁻¹ ∂f/∂θ,
  and nothing in that graph records it: autograd would return wrong numbers without a word (a
  gradient penalty's gradient tens of degrees away from the true one). Doing it right
  needs the adjoint solve itself differentiated by the same theorem, with the parameters and the
  injection as explicit inputs of the backward; here it is an error that says what to use.

Non-finite gradients stay non-finite: a sample whose adjoint solve met NaN/inf (an incoming
∂ℓ/∂z* with NaN/inf, or an iteration that overflowed) gets a NaN adjoint, never a zero or a
truncated one, so that a gradient scaler skips the step and a trainer sees it; and
``check_convergence`` says so whatever ``on_fail`` is.

Every rule works on flat states (batch, D) and a map f on them (``DEQ.fixed_point_map``). The
rules are registered in ``BACKWARDS``; ``make_rule`` builds one from its name and validated options.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import torch

from ._validate import check_keys, check_range, keyword_options, lookup
from .solvers import SolverSpec
from .stats import ON_FAIL, SolverStats, check_convergence, residuals

FlatMap = Callable[[torch.Tensor], torch.Tensor]


class GradientRule:
    """What every rule has: a name, its options, the record of its last backward (``stats``),
    ``solve`` (the forward solve: without a graph, except for ``Unrolled``) and ``attach``."""
    name = ""

    def __init__(self):
        self.stats: Optional[SolverStats] = None

    @property
    def options(self) -> dict:
        """The rule's own options (what ``DEQ(backward_options=...)`` set), with defaults."""
        return {name: getattr(self, name) for name in keyword_options(type(self).__init__)}

    def solve(self, solver: SolverSpec, f: FlatMap, z0: torch.Tensor):
        """The forward solve, ``(z*, stats)``, with no graph kept."""
        with torch.no_grad():
            return solver(f, z0)

    def attach(self, z_star: torch.Tensor, f: FlatMap) -> torch.Tensor:
        """z* as the output, with a graph that gives this rule's gradient."""
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}({options})"


def vjp_of(z: torch.Tensor, z_in: torch.Tensor) -> FlatMap:
    """y ↦ Jᵀ y = yᵀ ∂z/∂z_in, through the graph of z = f(z_in) (kept for the next call)."""
    return lambda y: torch.autograd.grad(z, z_in, y, retain_graph=True)[0]


class DoubleBackwardError(NotImplementedError):
    """A gradient with a graph (``create_graph=True``) was asked of a rule whose backward is a
    hook (``IFT``, ``Neumann``): their second derivatives would be wrong (module docstring)."""


def _double_backward_error(rule: str) -> DoubleBackwardError:
    shortcut = (" 'phantom' with tau=1.0 is the same k-term series at z* as a plain autograd "
                "graph." if rule == "neumann" else "")
    return DoubleBackwardError(
        f"backward={rule!r} cannot give second derivatives: a gradient with a graph was asked "
        f"for (create_graph=True, e.g. a gradient penalty or a Hessian-vector product), but this "
        f"rule's backward swaps ∂ℓ/∂z* for the adjoint in a hook at a z* that carries no graph, "
        f"so autograd would miss how z* moves with the parameters and the input "
        f"(dz*/dθ = (I − J)⁻¹ ∂f/∂θ) and return wrong numbers. Use backward='unrolled' (exact "
        f"through the solver's iterations; memory grows with them), or 'jfb' / 'phantom' (plain "
        f"graphs: the second derivatives of their surrogates, z* held fixed).{shortcut} Or "
        f"compute the penalty without a graph of the gradient, e.g. by finite differences of "
        f"the loss.")


def _adjoint_hook(z: torch.Tensor, adjoint: Callable[[torch.Tensor], torch.Tensor],
                  rule: str) -> None:
    """Register on z a hook that replaces the incoming gradient ∂ℓ/∂z by ``adjoint(∂ℓ/∂z)``. The
    adjoint's own vector–Jacobian products run back through z: the guard lets those pass. A
    backward that builds a graph (``create_graph=True``: autograd turns grad mode on inside
    hooks then) is refused with ``DoubleBackwardError``, naming ``rule``."""
    solving = []

    def hook(grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if grad is None or solving:     # no gradient, or one of our own products
            return grad
        if torch.is_grad_enabled():
            raise _double_backward_error(rule)
        solving.append(True)
        try:
            return adjoint(grad)
        finally:
            solving.clear()

    z.register_hook(hook)


class IFT(GradientRule):
    """The implicit function theorem's gradient: the adjoint g solves g = Jᵀ g + ∂ℓ/∂z* (module
    docstring), with ``solver`` (a ``SolverSpec``); ``on_fail`` as ``DEQ``'s."""
    name = "ift"

    def __init__(self, solver: SolverSpec, on_fail: str = "warn"):
        super().__init__()
        lookup(ON_FAIL, on_fail, "on_fail value")
        self.solver, self.on_fail = solver, on_fail

    def attach(self, z_star: torch.Tensor, f: FlatMap, *,
               adjoint0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = f(z*, x) with a graph to x, θ and z*, and a hook turning ∂ℓ/∂z into the adjoint g.
        The one graph serves both: the adjoint's Jᵀ y are products through it
        (``retain_graph``), and autograd then takes gᵀ ∂f/∂θ and gᵀ ∂f/∂x through it too.
        ``adjoint0`` warm-starts the adjoint solve (default 0; ``deqlite.jiio.attach`` passes μ*)."""
        z_in = z_star.detach().requires_grad_()
        z = f(z_in)
        vjp = vjp_of(z, z_in)

        def adjoint(grad: torch.Tensor) -> torch.Tensor:
            start = torch.zeros_like(grad) if adjoint0 is None else adjoint0
            g, self.stats = self.solver(lambda y: vjp(y) + grad, start)   # y ↦ Jᵀ y + ∂ℓ/∂z*
            # a sample that met NaN/inf (e.g. in ∂ℓ/∂z*) gets g = NaN: never 0, nor a partial sum
            check_convergence(self.stats, "backward (adjoint)", self.on_fail,
                              hint=_upstream_hint(grad, self.stats))
            return g.masked_fill(self.stats.nonfinite[:, None], float("nan"))

        _adjoint_hook(z, adjoint, self.name)
        return z

    def __repr__(self) -> str:
        return f"IFT(adjoint: {self.solver!r})"


def _upstream_hint(grad: torch.Tensor, stats: SolverStats) -> str:
    """When the adjoint solve lost samples to NaN/inf and the incoming gradient was not finite,
    the sentence that puts the blame where it belongs (the text is fixed: see
    ``check_convergence``)."""
    if stats.num_nonfinite and not bool(torch.isfinite(grad).all()):
        return ("The gradient reaching the DEQ's output, ∂ℓ/∂z*, is itself NaN/inf there: it "
                "comes from the loss or the layers after the DEQ, not from the adjoint solve.")
    return ""


class JFB(GradientRule):
    """Jacobian-free backprop: backpropagate through one application z = f(z*, x)."""
    name = "jfb"

    def __init__(self):
        super().__init__()

    def attach(self, z_star: torch.Tensor, f: FlatMap) -> torch.Tensor:
        return f(z_star.detach())


def neumann_series(vjp: FlatMap, v: torch.Tensor, k: int) -> tuple[torch.Tensor, SolverStats]:
    """g = Σ_{i<k} (Jᵀ)ⁱ v with ``vjp(y) = Jᵀ y``: k − 1 products, each term from the last.
    Also returns the record described in the module docstring (row j: the j-th term's norm)."""
    start = time.perf_counter()
    g, term, abs_res, rel_res = torch.zeros_like(v), v, [], []
    for i in range(k):
        if i:
            term = vjp(term)                                   # (Jᵀ)ⁱ v from (Jᵀ)ⁱ⁻¹ v
        g_next = g + term
        r_abs, r_rel = residuals(g_next.detach(), g.detach())  # ‖term‖ and ‖term‖ / ‖g_next‖
        abs_res.append(r_abs)
        rel_res.append(r_rel)
        g = g_next
    return g, SolverStats.from_traces("neumann", abs_res, rel_res, start, v.dtype)


def _check_k(k: Any, rule: str) -> None:
    check_range(k, f"backward_options['k'] of {rule!r}", low=1, integer=True)


class Neumann(GradientRule):
    """The first k terms of the Neumann series of the adjoint (module docstring)."""
    name = "neumann"

    def __init__(self, *, k: int = 5):
        super().__init__()
        _check_k(k, self.name)
        self.k = k

    def attach(self, z_star: torch.Tensor, f: FlatMap) -> torch.Tensor:
        z_in = z_star.detach().requires_grad_()
        z = f(z_in)
        vjp = vjp_of(z, z_in)

        def adjoint(grad: torch.Tensor) -> torch.Tensor:
            g, self.stats = neumann_series(vjp, grad, self.k)       # NaN/inf in, NaN/inf out
            return g

        _adjoint_hook(z, adjoint, self.name)
        return z


class Phantom(GradientRule):
    """k damped steps z ← (1 − τ) z + τ f(z) from z* (detached), recorded by autograd."""
    name = "phantom"

    def __init__(self, *, k: int = 5, tau: float = 0.5):
        super().__init__()
        _check_k(k, self.name)
        check_range(tau, f"backward_options['tau'] of {self.name!r}", low=0, high=1,
                    low_open=True)
        self.k, self.tau = k, tau

    def attach(self, z_star: torch.Tensor, f: FlatMap) -> torch.Tensor:
        start, abs_res, rel_res = time.perf_counter(), [], []
        z = z_star.detach()
        for _ in range(self.k):
            fz = f(z)
            with torch.no_grad():
                r_abs, r_rel = residuals(fz, z)
            abs_res.append(r_abs)
            rel_res.append(r_rel)
            z = z + self.tau * (fz - z) if self.tau != 1 else fz
        self.stats = SolverStats.from_traces("phantom", abs_res, rel_res, start, z.dtype)
        return z


class Unrolled(GradientRule):
    """Backpropagate through every iteration of the forward solver (memory grows with them), and
    through one last application z = f(z*, x), as the other rules return. That last step matters
    for a sample whose best iterate is its start z0 (a warm start at its fixed point, max_iter=1):
    without it the sample's output would not depend on x or θ, and its gradient would be a silent
    zero; with it, that sample gets the gradient of the one step it took (JFB's)."""
    name = "unrolled"

    def __init__(self):
        super().__init__()

    def solve(self, solver: SolverSpec, f: FlatMap, z0: torch.Tensor):
        return solver(f, z0)                          # autograd records the iterations

    def attach(self, z_star: torch.Tensor, f: FlatMap) -> torch.Tensor:
        return f(z_star)


BACKWARDS = {"ift": IFT, "jfb": JFB, "phantom": Phantom, "neumann": Neumann, "unrolled": Unrolled}


def make_rule(name: str, options: Optional[Mapping[str, Any]] = None, *, adjoint: SolverSpec,
              on_fail: str = "warn") -> GradientRule:
    """The rule ``BACKWARDS[name]`` with its validated ``options`` (``{"k": 5, "tau": 0.5}`` for
    phantom, ``{"k": 5}`` for neumann, none for the others); ``IFT`` solves its adjoint with
    ``adjoint``. An unknown name or option is an error that names the valid ones."""
    cls = lookup(BACKWARDS, name, "backward rule")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"backward_options must be a dict such as {{'k': 5}}, got "
                        f"{type(options).__name__}.")
    valid = keyword_options(cls.__init__)
    if options and not valid:
        extra = (" Its adjoint solve is set by backward_solver, backward_tol, backward_max_iter "
                 "and backward_solver_options." if cls is IFT else "")
        raise TypeError(f"backward {name!r} takes no backward_options, got "
                        f"{next(iter(options))!r}.{extra}")
    check_keys(options, valid, what=f"backward {name!r}")
    return cls(adjoint, on_fail) if cls is IFT else cls(**options)
