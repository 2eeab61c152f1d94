"""benchmarks/broyden_rank_reduction.py, the experiment behind the README's figures on reducing
Broyden's memory instead of restarting it: with keep=0 it is deqlite's broyden exactly (so the
only difference it measures is the reduction), and its rank reduction is the best rank-q
approximation of the stored correction (Eckart–Young), checked in float64."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from broyden_rank_reduction import broyden_reduced, reduce_rank  # noqa: E402
from deqlite.solvers import broyden  # noqa: E402

DT = torch.float64


def tanh_map(d=16, batch=3, rho=0.97, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = rho * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0]
    x = 0.1 * torch.randn(batch, d, generator=g, dtype=DT)
    return lambda z: torch.tanh(z @ W.T + x), torch.zeros(batch, d, dtype=DT)


def test_with_keep_zero_it_is_deqlites_broyden():
    f, z0 = tanh_map()
    z_ref, ref = broyden(f, z0, tol=1e-10, max_iter=200, memory=6)
    z, stats = broyden_reduced(f, z0, tol=1e-10, max_iter=200, memory=6, keep=0)
    assert stats.nfe == ref.nfe and ref.nfe > 12          # the memory filled and restarted
    assert torch.equal(z, z_ref)


def test_the_reduction_keeps_the_best_rank_q_part_of_the_correction():
    g = torch.Generator().manual_seed(1)
    U, V = (torch.randn(2, 8, 20, generator=g, dtype=DT) for _ in range(2))
    n, q = 6, 3
    C = U[:, :n].mT @ V[:, :n]                           # Σ_{i<n} u_i v_iᵀ, (2, D, D)
    U2, V2 = reduce_rank(U, V, n, q)
    W, S, Xt = torch.linalg.svd(C)
    best = (W[:, :, :q] * S[:, None, :q]) @ Xt[:, :q]
    assert torch.allclose(U2[:, :q].mT @ V2[:, :q], best, atol=1e-10)
    assert (U2[:, q:] == 0).all() and (V2[:, q:] == 0).all()


def test_reducing_instead_of_restarting_converges():
    f, z0 = tanh_map()
    _, stats = broyden_reduced(f, z0, tol=1e-10, max_iter=200, memory=6, keep=3)
    assert stats.all_converged
