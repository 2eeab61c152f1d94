"""Adversarial training of a DEQ classifier, with adversarial examples found by JIIO or by PGD-k.

The threat: an image x may be moved anywhere in  S(x) = {x' : ‖x' − x‖₂ ≤ ε} ∩ [0, 1]ⁿ.
Adversarial training (Madry et al., ICLR 2018) fits the parameters θ to the worst case in S,

    min_θ  E_(x,y) [ φ(θ; x, y) ],     φ(θ; x, y) = max_{x' ∈ S(x)}  CE(h_θ(x'), y),

with h_θ(x') = head(z*), z* = f_θ(z*, stem(x')). Why the inner maximizer gives the outer gradient
(Danskin's theorem, S compact, CE smooth in θ): for a maximizer x*, ∇_θ φ = ∇_θ CE(h_θ(x*), y)
with x* held fixed, when x* is unique (with several, the gradient at any of them still gives a
descent direction of φ: Madry et al., appendix A). The chain rule's other term,
(dx*/dθ)ᵀ ∇_x CE, is 0 at a constrained maximum: ∇_x CE there points out of S, normal to its
boundary, while x* moves along the boundary (or ∇_x CE = 0 inside): the constrained form of the
envelope argument that ``deqlite.jiio.attach`` uses. So a training step is: find x' ≈ x*
(detached), then an ordinary step on CE(h_θ(x'), y). The closer x' is to the maximizer, the
closer the step is to the gradient of the robust loss; a weak attack trains against itself.

Two ways to find x' (both counted in evaluations of f and vector–Jacobian products through f, as
``SolverStats`` and JIIO's ``InputOptStats`` count them):

* ``"pgd"``: PGD-k. k steps  x ← Π_S(x + a · g/‖g‖)  with g = ∇_x CE(h(x), y), each one a
  forward solve of z* (the DEQ's own solver, warm-started from the last z*) and an IFT adjoint
  solve: fwd NFE + 1 evaluations (the last application of f carries the graph) and bwd NFE + 1
  VJPs (the last pass takes the gradient to x). Default step length a = 2.5 ε / k.
* ``"jiio"``: a fixed number of iterations of JIIO's augmented map over (z, μ, x) with
  ℓ(z, x) = −CE(head(z), y) and Π = Π_box ∘ Π_ball (``deqlite.jiio.jiio``, damped, every option
  passed), one evaluation and one VJP per iteration, from z = 0, μ = 0: the equilibrium, the
  adjoint and the perturbation are found together, none solved exactly while x moves. The last
  iterate is used (Madry takes PGD's last iterate too).

Both start at the clean image, or with ``random_start`` at a uniform random point of the ball
(then clipped to the box). Clipping after the ball is feasible: it moves each pixel towards the
clean one, which lies in the box, so it never leaves the ball (notebook 08, section 4).

``robust_accuracy`` is the yardstick: a digit counts as robust when a strong PGD (many steps,
several step lengths, random restarts) never misclassifies it, at any iterate.
``adversarial_training`` is the loop: Madry's step on every batch, a tqdm bar, one record per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._validate import check_range, lookup
from ..data.batches import TrainBatches
from ..jiio import jiio
from ..projections import Box, L2Ball

METHODS = ("jiio", "pgd")


@dataclass
class AdversarialExamples:
    """The adversarial images ``x`` (detached, inside the ball and the box) and what finding them
    cost: ``f_evals`` evaluations of f, ``vjps`` vector–Jacobian products through f, ``seconds``."""
    x: torch.Tensor
    f_evals: int
    vjps: int
    seconds: float

    @property
    def evaluations(self) -> int:
        return self.f_evals + self.vjps


def check_classifier(model) -> None:
    """A DEQ classifier as ``deqlite.models.DEQClassifier`` is: ``stem``, ``deq`` (with .cell),
    ``head``; else a TypeError."""
    missing = [name for name in ("stem", "deq", "head") if not hasattr(model, name)]
    if not isinstance(model, nn.Module) or missing or not hasattr(model.deq, "cell"):
        raise TypeError(f"expected a DEQ classifier with .stem, .deq and .head (e.g. "
                        f"deqlite.models.DEQClassifier); got {type(model).__name__}"
                        f"{' without ' + ', '.join(missing) if missing else ''}.")


def feasible_set(clean: torch.Tensor, eps: float, box: tuple = (0.0, 1.0)) -> Callable:
    """Π_box ∘ Π_ball: x ↦ clip(Π_{‖x − clean‖ ≤ ε}(x)), a feasible point of S(clean)."""
    ball, clip = L2Ball(eps, center=clean), Box(*box)
    return lambda x: clip(ball(x))


def random_start(clean: torch.Tensor, eps: float, box: tuple = (0.0, 1.0), *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniform random point of the ball ‖x − clean‖₂ ≤ ε per sample (direction uniform on the
    sphere, radius ε · U^(1/n) with n pixels), clipped to the box."""
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
    n = math.prod(clean.shape[1:])
    u = torch.rand(len(clean), generator=generator, dtype=clean.dtype).to(clean.device)
    radius = eps * u ** (1 / n) / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    return Box(*box)(clean + noise * radius.reshape(-1, *[1] * (clean.dim() - 1)))


def _check_box(box) -> tuple:
    if not (isinstance(box, (tuple, list)) and len(box) == 2):
        raise ValueError(f"box must be (low, high), got {box!r}.")
    Box(*box)                                   # low < high, not NaN
    return tuple(box)


@dataclass(frozen=True)
class Attack:
    """An L2-bounded attack: ``method`` ``"jiio"`` or ``"pgd"`` (module docstring), radius
    ``eps`` > 0, ``steps`` (JIIO iterations, or PGD's k ≥ 1), ``step_size`` (JIIO's α on x,
    required; PGD's step length, default 2.5 ε / k), ``random_start``, the pixel ``box``.
    ``attack(model, images, labels)`` returns ``AdversarialExamples``."""
    method: str
    eps: float
    steps: int
    step_size: Optional[float] = None
    random_start: bool = False
    box: tuple = (0.0, 1.0)

    def __post_init__(self):
        lookup(METHODS, self.method, "attack method")
        check_range(self.eps, "eps", low=0, low_open=True)
        if not math.isfinite(self.eps):
            raise ValueError("eps must be finite (an infinite ball constrains nothing).")
        check_range(self.steps, "steps", low=1, integer=True)
        if self.step_size is None and self.method == "jiio":
            raise ValueError("a JIIO attack needs step_size, the step α on the image "
                             "(x ← Π(x − α ∇ₓL)); e.g. step_size=1.0.")
        if self.step_size is not None:
            check_range(self.step_size, "step_size", low=0, low_open=True)
        if not isinstance(self.random_start, bool):
            raise TypeError(f"random_start must be True or False, got {self.random_start!r}.")
        object.__setattr__(self, "box", _check_box(self.box))

    @property
    def step_length(self) -> float:
        """The step on x: ``step_size``, or PGD's default 2.5 ε / k."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> AdversarialExamples:
        check_classifier(model)
        if images.shape[:1] != labels.shape:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             f"must hold the same number of samples.")
        x0 = random_start(images, self.eps, self.box, generator=generator) \
            if self.random_start else images
        run = jiio_attack if self.method == "jiio" else pgd_attack
        return run(model, images, labels, x0=x0, eps=self.eps, steps=self.steps,
                   step_size=self.step_length, box=self.box)


def jiio_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                steps: int, step_size: float, x0: Optional[torch.Tensor] = None,
                box: tuple = (0.0, 1.0)) -> AdversarialExamples:
    """``steps`` damped JIIO iterations (a = b = 1: plain iteration of T) on ℓ = −CE(head(z), y)
    from x0 (default: the clean images); the last iterate. tol = grad_tol = 0 keeps every sample
    running, so the count is exact: ``steps`` evaluations and ``steps`` VJPs."""
    check_classifier(model)
    start = time.perf_counter()

    def loss(z, x):
        return -F.cross_entropy(model.head(z), labels, reduction="none")

    result = jiio(model.deq, images if x0 is None else x0, loss, step_size=step_size,
                  solver="damped", projection=feasible_set(images, eps, box), encode=model.stem,
                  tol=1e-30, grad_tol=1e-30, max_iter=steps, z_damping=1.0, adjoint_damping=1.0,
                  z0=None, record_every=steps, callback=None)
    s = result.stats                            # its last snapshot: the last iterate
    return AdversarialExamples(s.snapshots[-1].x, s.f_evals, s.vjps, time.perf_counter() - start)


def _pgd_run(model, images, labels, x, *, steps: int, step_size: float, project: Callable):
    """k normalized ascent steps on CE from x; returns (last x, fooled at any iterate, f, vjp)."""
    f_evals = vjps = 0
    fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    z = None
    for _ in range(steps):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            z = model.deq(model.stem(x), z0=z)
            logits = model.head(z)
            grad, = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x)
        deq = model.deq
        f_evals += deq.forward_stats.nfe + 1
        vjps += (deq.backward_stats.nfe if deq.backward_stats is not None else 0) + 1
        fooled |= logits.detach().argmax(1) != labels
        z = z.detach()
        with torch.no_grad():
            norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
            x = project(x + step_size * grad / norm.reshape(-1, *[1] * (x.dim() - 1)))
    return x.detach(), fooled, f_evals, vjps


def pgd_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
               steps: int, step_size: float, x0: Optional[torch.Tensor] = None,
               box: tuple = (0.0, 1.0)) -> AdversarialExamples:
    """PGD-k: ``steps`` steps x ← Π(x + a · g/‖g‖), g = ∇ₓ CE, each a forward and an adjoint
    solve (the DEQ's own solvers); the last iterate. Evaluations: Σ (fwd NFE + 1) + Σ (bwd NFE
    + 1)."""
    check_classifier(model)
    start = time.perf_counter()
    project = feasible_set(images, eps, box)
    x = project(images if x0 is None else x0)
    x, _, f_evals, vjps = _pgd_run(model, images, labels, x, steps=steps, step_size=step_size,
                                   project=project)
    return AdversarialExamples(x, f_evals, vjps, time.perf_counter() - start)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def robust_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
                    steps: int = 50, step_sizes: Sequence[float] = (), restarts: int = 1,
                    batch_size: int = 256, box: tuple = (0.0, 1.0), seed: int = 0) -> dict:
    """Clean and robust accuracy under a strong PGD at radius ε: for every step length in
    ``step_sizes`` (default ε/4 and ε/10) one run from the clean image and ``restarts`` runs from
    random starts, ``steps`` steps each; a digit is robust if it is classified right clean and at
    every iterate of every run. Returns dict(clean, robust, evaluations, seconds)."""
    check_classifier(model)
    check_range(eps, "eps", low=0, low_open=True)
    check_range(steps, "steps", low=1, integer=True)
    check_range(restarts, "restarts", low=0, integer=True)
    check_range(batch_size, "batch_size", low=1, integer=True)
    step_sizes = tuple(step_sizes) or (eps / 4, eps / 10)
    for a in step_sizes:
        check_range(a, "step size", low=0, low_open=True)
    box, start = _check_box(box), time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    was_training, evaluations, clean, robust = model.training, 0, 0, 0
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            x, y = images[i:i + batch_size], labels[i:i + batch_size]
            right = _predict(model, x) == y
            clean += int(right.sum())
            project = feasible_set(x, eps, box)
            for a in step_sizes:
                for x0 in [x] + [random_start(x, eps, box, generator=generator)
                                 for _ in range(restarts)]:
                    last, fooled, f, v = _pgd_run(model, x, y, project(x0), steps=steps,
                                                  step_size=a, project=project)
                    right &= ~fooled & (_predict(model, last) == y)
                    evaluations += f + v
            robust += int(right.sum())
    finally:
        model.train(was_training)
    n = len(images)
    return dict(clean=clean / n, robust=robust / n, evaluations=evaluations,
                seconds=time.perf_counter() - start)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor, attack: Optional[Attack] = None, *,
                  generator: Optional[torch.Generator] = None) -> dict:
    """Madry's step: x' = attack(images) (None: the clean images, standard training), then one
    optimizer step on CE(h_θ(x'), y) with x' detached (Danskin). Returns the step's record."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    if attack is None:
        adv = AdversarialExamples(images, 0, 0, 0.0)
    else:
        adv = attack(model, images, labels, generator=generator)
    with torch.no_grad():
        clean_acc = (_predict(model, images) == labels).float().mean().item()
    model.train()
    logits = model(adv.x)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.train(was_training)
    deq = model.deq
    fwd = deq.forward_stats.nfe if deq.forward_stats is not None else 0
    bwd = deq.backward_stats.nfe if deq.backward_stats is not None else 0
    acc = (logits.argmax(1) == labels).float().mean().item()
    return dict(split="train", loss=loss.item(), acc=acc,
                clean_acc=clean_acc, attack_evals=adv.evaluations, train_evals=fwd + 1 + bwd + 1,
                attack_seconds=adv.seconds, seconds=time.perf_counter() - start,
                fwd_nfe=fwd, bwd_nfe=bwd)


def adversarial_training(model: nn.Module, train_set: Dataset, attack: Optional[Attack], *,
                         steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                         optimizer: Optional[torch.optim.Optimizer] = None,
                         callback: Optional[Callable[[dict], None]] = None,
                         progress: bool = True, desc: Optional[str] = None) -> list[dict]:
    """Train ``model`` in place for ``steps`` steps of ``training_step`` on ``train_set``'s
    batches (``deqlite.data.batches.TrainBatches``: those of step k a function of (seed, k)),
    with ``optimizer`` (default Adam at ``lr``). ``attack`` None is standard training, for
    reference. ``callback(record)`` sees every record (e.g. ``RunComparison.callback``); a record
    holds step, loss, acc (on the adversarial batch), clean_acc, attack_evals, train_evals
    (fwd NFE + 1 + bwd NFE + 1), attack_seconds, seconds, fwd_nfe, bwd_nfe. Returns the records."""
    check_classifier(model)
    if attack is not None and not isinstance(attack, Attack):
        raise TypeError(f"attack must be an Attack (or None: standard training), got "
                        f"{type(attack).__name__}.")
    check_range(steps, "steps", low=1, integer=True)
    check_range(lr, "lr", low=0, low_open=True)
    device = next(model.parameters()).device
    batches = TrainBatches(train_set, batch_size, seed=seed)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    name = "standard" if attack is None else f"{attack.method}-{attack.steps}"
    history = []
    with tqdm(total=steps, desc=desc or f"training ({name})", unit="step",
              disable=not progress) as bar:
        for step in range(steps):
            epoch, x, y = batches(step)
            record = dict(step=step + 1, epoch=epoch, **training_step(
                model, optimizer, x.to(device), y.to(device), attack, generator=generator))
            history.append(record)
            if callback is not None:
                callback(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}",
                            evals=record["attack_evals"], refresh=False)
    return history
