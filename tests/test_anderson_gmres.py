"""Anderson with its whole history is GMRES (Walker & Ni 2011), checked against GMRES computed
from scratch, in float64.

On a linear map f(z) = A z + b (residual r(z) = f(z) − z = M z + b, M = A − I), Anderson with a
history at least as long as the solve and β = 1 picks, at step k, the point z̄_k = Σ α_i z_i of
the affine span of its iterates z_0 … z_k whose residual Σ α_i g_i is smallest. That span is
z_0 + K_k, K_k = span{r_0, M r_0, …, M^{k−1} r_0}, so ‖r(z̄_k)‖ is GMRES's k-th residual, the
smallest any Krylov method can reach in k steps. The next iterate is z_{k+1} = f(z̄_k), whose
residual is r(z_{k+1}) = A r(z̄_k); with A = ρ Q (Q orthogonal) its norm is exactly ρ × GMRES's.
So the residuals Anderson records (``stats.abs_residuals``) can be compared with GMRES step for
step; a limited history cannot do better than GMRES, and here does measurably worse.
"""
import torch

from deqlite.solvers import anderson

DT = torch.float64


def near_orthogonal(d: int = 12, batch: int = 2, rho: float = 0.95, seed: int = 0):
    """A = ρ Q with Q a random orthogonal matrix: every eigenvalue of A on the circle |λ| = ρ,
    the case where short-memory extrapolation helps least."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]
    return rho * Q, torch.randn(batch, d, generator=g, dtype=DT)


def gmres_residuals(A: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps, batch): min over z ∈ z_0 + K_k of ‖M z + b‖, k = 0 … steps − 1, from z_0 = 0, by a
    least-squares solve on an orthonormal Krylov basis (modified Gram–Schmidt, twice)."""
    M = A - torch.eye(len(A), dtype=DT)
    out = torch.empty(steps, len(b), dtype=DT)
    for s, r0 in enumerate(b):                          # r(z_0) = b at z_0 = 0
        basis, v = [], r0.clone()
        for k in range(steps):
            if k == 0:
                out[0, s] = r0.norm()
                continue
            for _ in range(2):                          # orthogonalize twice: stable to 1e-15
                for q in basis:
                    v = v - (q @ v) * q
            basis.append(v / v.norm())
            V = torch.stack(basis, 1)                   # (d, k): orthonormal basis of K_k
            y = torch.linalg.lstsq(M @ V, -r0[:, None]).solution
            out[k, s] = (r0[:, None] + M @ V @ y).norm()
            v = M @ basis[-1]                           # the next Krylov direction
    return out


def anderson_residuals(A, b, steps, m):
    f = lambda z: z @ A.T + b                           # noqa: E731
    _, stats = anderson(f, torch.zeros_like(b), tol=0, max_iter=steps + 1, m=m, lam=0.0)
    return stats.abs_residuals                          # (steps + 1, batch): ‖r(z_k)‖, k = 0 …


def test_anderson_with_its_whole_history_reaches_the_gmres_residual_step_for_step():
    A, b = near_orthogonal()
    rho, steps = 0.95, 12                    # k = 0 … 11: GMRES would be exact at k = d = 12
    gmres = gmres_residuals(A, b, steps)
    ours = anderson_residuals(A, b, steps, m=steps + 1)
    assert torch.allclose(ours[0], b.norm(dim=1))                      # z_0 = 0: r = b
    assert torch.allclose(ours[1:], rho * gmres, rtol=1e-7, atol=0)
    assert (gmres[-1] < 0.5 * gmres[0]).all()            # the comparison covers real progress


def test_a_short_history_is_worse_than_gmres_never_better():
    """Optimality: with its last 3 residuals only, Anderson is GMRES while its history holds
    them all (k < 3), then above GMRES at every step (within rounding), several times by the end."""
    A, b = near_orthogonal()
    steps, m = 12, 3
    gmres = 0.95 * gmres_residuals(A, b, steps)
    short = anderson_residuals(A, b, steps, m=m)[1:]
    assert torch.allclose(short[:m], gmres[:m], rtol=1e-9, atol=0)
    assert (short >= gmres * (1 - 1e-9)).all()
    assert (short[-1] > 3 * gmres[-1]).all()
