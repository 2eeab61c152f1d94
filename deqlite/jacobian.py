"""The Jacobian of a cell at its fixed point: its size (Frobenius norm) and its spectral radius.

J = ∂f(z, x)/∂z at z = z* decides how hard the equilibrium is to find: forward iteration
converges locally iff the spectral radius ρ(J) < 1, at the rate ρ(J) per step, and Anderson or
Broyden slow down as J's eigenvalues approach 1. Bai, Koltun, Kolter ("Stabilizing Equilibrium
Models by Jacobian Regularization", ICML 2021) keep J small while training by adding

    γ · ‖J_f(z*)‖²_F / d          (d = size of one sample's state)

to the loss. ‖J‖²_F = tr(J Jᵀ) is estimated with Hutchinson's trick: for a random probe v with
E[v vᵀ] = I (Gaussian, or ±1 entries),

    E_v ‖vᵀ J‖² = E_v tr(Jᵀ v vᵀ J) = tr(Jᵀ E[v vᵀ] J) = tr(Jᵀ J) = ‖J‖²_F,

and vᵀ J is ONE vector–Jacobian product (one backward pass through f), whatever d is. Samples of
a batch are independent (J of the batch is block diagonal), so one batched probe gives every
sample its own estimate. The estimate is differentiable (``create_graph=True``), so it can be
part of a loss; deqlite differentiates it with z* held fixed, as the locuslab code does
(following z* as well would need one more adjoint solve per step).

Spectral radius: the plain power method (v ← Jv/‖Jv‖, read |vᵀJv|) is right for symmetric J but
not in general: a real non-symmetric J often has its largest eigenvalues as a complex-conjugate
pair λ, λ̄, and then v rotates in a plane instead of settling, and the Rayleigh quotient reads
about Re λ, too small. ``spectral_radius`` uses the Arnoldi method instead: it builds an
orthonormal basis Q of the Krylov space span{v, Jᵀv, (Jᵀ)²v, ...} and reads the eigenvalues of
the small Hessenberg matrix H = Qᵀ Jᵀ Q (complex ones included). Jᵀ has the same eigenvalues as
J up to conjugation, and Jᵀv is a vector–Jacobian product.
"""
from __future__ import annotations

import math

from typing import Callable, Optional

import torch

from ._validate import check_range, check_tensor, lookup

PROBES = ("gaussian", "rademacher")


def _state_with_graph(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor):
    """(z_in, f(z_in)) with z_in a fresh leaf copy of z, so that J = ∂f/∂z can be taken."""
    check_tensor(z, "z")
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        f_z = f(z_in)
    if f_z.shape != z.shape:
        raise ValueError(f"f maps a state of shape {tuple(z.shape)} to {tuple(f_z.shape)}; a "
                         f"fixed-point map must keep the shape.")
    return z_in, f_z


def random_probes(like: torch.Tensor, n_probes: int, *, kind: str = "gaussian",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`n_probes` random tensors shaped like `like` with E[v vᵀ] = I: standard Gaussian entries,
    or ±1 entries (Rademacher; a smaller variance for the Hutchinson estimate)."""
    lookup(PROBES, kind, "probe kind")
    shape = (n_probes, *like.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
    signs = torch.randint(0, 2, shape, generator=generator).to(like.device, like.dtype)
    return 2 * signs - 1


def hutchinson_frobenius(f_z: torch.Tensor, z: torch.Tensor, *, n_probes: int = 1,
                         probes: Optional[torch.Tensor] = None, kind: str = "gaussian",
                         generator: Optional[torch.Generator] = None, create_graph: bool = False,
                         per_element: bool = True) -> torch.Tensor:
    """Per-sample Hutchinson estimate of ‖J‖²_F, J = ∂f_z/∂z, from ``f_z = f(z)`` computed with a
    graph to ``z`` (which must require grad).

    Each probe v costs one vector–Jacobian product: the estimate is mean_v ‖vᵀ J‖², unbiased.

    Args:
        n_probes: how many random probes M to average (ignored when ``probes`` is given).
        probes: ``(M, *z.shape)`` fixed probes (e.g. for a finite-difference test).
        kind: ``"gaussian"`` or ``"rademacher"`` probes.
        create_graph: keep the graph so the estimate can be backpropagated (for a loss term).
        per_element: divide by d, the number of entries of one sample's state (the paper's
            normalization: the penalty does not grow with the width).

    Returns:
        ``(batch,)`` tensor of estimates.
    """
    if not z.requires_grad:
        raise ValueError("z must require grad and f_z must be computed from it: use "
                         "z = z.detach().requires_grad_(); f_z = f(z).")
    if probes is None:
        check_range(n_probes, "n_probes", low=1, integer=True)
        probes = random_probes(f_z, n_probes, kind=kind, generator=generator)
    elif probes.shape[1:] != f_z.shape:
        raise ValueError(f"probes must have shape (M, *f_z.shape) = (M, {', '.join(map(str, f_z.shape))}), "
                         f"got {tuple(probes.shape)}.")
    total = 0
    for v in probes:
        vJ = torch.autograd.grad(f_z, z, v, create_graph=create_graph, retain_graph=True)[0]
        total = total + vJ.flatten(1).square().sum(1)
    estimate = total / len(probes)
    return estimate / math.prod(z.shape[1:]) if per_element else estimate


def exact_jacobian(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian J_i = ∂f(z)_i/∂z_i, as a ``(batch, d, d)`` tensor (states flattened).

    Costs d vector–Jacobian products (one per output coordinate, all batched by ``vmap``): for
    small problems and for checking estimators. Assumes f treats samples independently (no batch
    norm), as DEQ cells do.
    """
    z_in, f_z = _state_with_graph(f, z)
    batch, d = z.shape[0], math.prod(z.shape[1:])
    eye = torch.eye(d, dtype=f_z.dtype, device=f_z.device)
    basis = eye[:, None, :].expand(d, batch, d).reshape(d, *f_z.shape)
    rows = torch.autograd.grad(f_z, z_in, basis, is_grads_batched=True)[0]   # (d, batch, ...)
    return rows.reshape(d, batch, d).transpose(0, 1)


def frobenius_sq(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *,
                 per_element: bool = True) -> torch.Tensor:
    """Exact ``(batch,)`` ‖J‖²_F from ``exact_jacobian`` (divided by d when ``per_element``)."""
    J = exact_jacobian(f, z)
    fro = J.square().sum((1, 2))
    return fro / J.shape[-1] if per_element else fro


def _arnoldi(vjp: Callable[[torch.Tensor], torch.Tensor], q0: torch.Tensor, k: int,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    """k steps of batched Arnoldi on the map q ↦ Jᵀq; returns the ``(batch, k, k)`` Hessenberg H.

    Orthogonalization is classical Gram–Schmidt applied twice (numerically as good as modified
    Gram–Schmidt, and a single batched matrix product). If the Krylov space of a sample closes
    (an invariant subspace is found, h_{j+1,j} ≈ 0), its H gets a zero there and the basis goes
    on from a fresh random vector: the eigenvalues found so far are then exact. "≈ 0" is relative
    to ‖Jᵀq_j‖ and to the dtype: what is left after two passes is rounding, about eps · ‖Jᵀq_j‖,
    and normalizing *that* would give a vector no longer orthogonal to the basis (in float32 a
    Jacobian of low rank, a saturated tanh cell's, then gave Ritz values 100× too large). So a
    remainder below √eps · ‖Jᵀq_j‖ (1e-10 in float64) counts as closed.
    """
    batch, d = q0.shape
    tol = 1e-10 if q0.dtype == torch.float64 else torch.finfo(q0.dtype).eps ** 0.5
    Q = q0.new_zeros(batch, k + 1, d)
    H = torch.zeros(batch, k + 1, k, dtype=torch.float64, device=q0.device)
    Q[:, 0] = q0 / q0.norm(dim=1, keepdim=True)
    for j in range(k):
        w = vjp(Q[:, j])
        scale = w.norm(dim=1)                           # ‖Jᵀq_j‖, before orthogonalization
        basis = Q[:, :j + 1]
        for _ in range(2):
            h = torch.einsum("bid,bd->bi", basis, w)
            w = w - torch.einsum("bid,bi->bd", basis, h)
            H[:, :j + 1, j] += h.double()
        norm = w.norm(dim=1)
        closed = norm <= tol * scale.clamp_min(torch.finfo(w.dtype).tiny)
        if closed.any():                               # restart the closed samples' basis
            fresh = torch.randn(batch, d, generator=generator, dtype=w.dtype).to(w.device)
            for _ in range(2):
                fresh = fresh - torch.einsum("bid,bi->bd", basis,
                                             torch.einsum("bid,bd->bi", basis, fresh))
            w = torch.where(closed[:, None], fresh, w)
            norm = torch.where(closed, torch.zeros_like(norm), norm)
            Q[:, j + 1] = w / w.norm(dim=1, keepdim=True)
        else:
            Q[:, j + 1] = w / norm[:, None]
        H[:, j + 1, j] = norm.double()
    return H[:, :k, :k]


def ritz_values(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, n_iter: int = 40,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Arnoldi estimates (Ritz values) of the eigenvalues of J = ∂f/∂z at z, per sample: a complex
    ``(batch, k)`` tensor with k = min(n_iter, d). With k = d they are J's eigenvalues; with fewer
    steps the ones of largest modulus are found first."""
    check_range(n_iter, "n_iter", low=1, integer=True)
    z_in, f_z = _state_with_graph(f, z)
    batch, d = z.shape[0], math.prod(z.shape[1:])

    def vjp(q):                                        # q ↦ Jᵀ q, for every sample at once
        return torch.autograd.grad(f_z, z_in, q.reshape(z.shape), retain_graph=True)[0].reshape(batch, d)

    q0 = torch.randn(batch, d, generator=generator, dtype=z.dtype).to(z.device)
    H = _arnoldi(vjp, q0, min(n_iter, d), generator)
    return torch.linalg.eigvals(H)


def spectral_radius(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *,
                    n_iter: int = 40, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ρ(J) = max |λ(J)| at z, per sample (``(batch,)``), by the Arnoldi method (see the module
    docstring): right for non-symmetric J and complex eigenvalues, exact when n_iter ≥ d."""
    return ritz_values(f, z, n_iter=n_iter, generator=generator).abs().max(dim=1).values.to(z.dtype)


def exact_spectral_radius(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """ρ(J) per sample from the full Jacobian and ``torch.linalg.eigvals`` (small problems)."""
    return torch.linalg.eigvals(exact_jacobian(f, z)).abs().max(dim=1).values.to(z.dtype)
