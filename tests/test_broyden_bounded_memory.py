"""benchmarks/broyden_bounded_memory.py, the experiment behind the README's figures on bounding
Broyden's memory without restarting it: with keep=0 it is deqlite's broyden exactly (so the
only difference it measures is the reduction), its rank reduction is the best rank-q
approximation of the stored correction (Eckart–Young), and its sliding window is Broyden's
recursion over the pairs in the window (the compact form against the rank-one updates, and, with
a window that holds every step, deqlite's broyden keeping every pair), all checked in float64."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from broyden_bounded_memory import broyden_reduced, broyden_window, reduce_rank  # noqa: E402
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


def test_the_compact_form_is_the_recursion_of_good_broyden_updates():
    g = torch.Generator().manual_seed(2)
    d, n = 9, 5
    S, Y = (torch.randn(n, d, generator=g, dtype=DT) for _ in range(2))      # rows: s_i, y_i
    B = -torch.eye(d, dtype=DT)
    for s, y in zip(S, Y):                         # B ← B + (s − B y)(sᵀ B) / (sᵀ B y)
        B = B + torch.outer(s - B @ y, s @ B) / (s @ B @ y)
        assert torch.allclose(B @ y, s)            # (the secant condition of the newest pair)
    M = S @ Y.T + torch.tril(S @ S.T, -1)          # the module docstring's M = S Yᵀ + L
    compact = -torch.eye(d, dtype=DT) + (S + Y).T @ torch.linalg.solve(M, S)
    assert torch.allclose(compact, B, atol=1e-12)
    wrong = -torch.eye(d, dtype=DT) + (S + Y).T @ torch.linalg.solve(S @ Y.T, S)    # L left out
    assert not torch.allclose(wrong, B, atol=1e-3)


def test_a_window_holding_every_step_is_broyden_keeping_every_pair():
    f, z0 = tanh_map()
    z_ref, ref = broyden(f, z0, tol=1e-10, max_iter=60, memory=60)
    z, stats = broyden_window(f, z0, tol=1e-10, max_iter=60, memory=60)
    assert ref.all_converged and stats.nfe == ref.nfe > 10
    assert torch.allclose(stats.rel_residuals, ref.rel_residuals, rtol=1e-6, atol=1e-13)
    assert torch.allclose(z, z_ref, atol=1e-10)


def test_a_window_shorter_than_the_solve_converges_and_freezes_samples():
    f, z0 = tanh_map(batch=5, rho=0.9)
    z, stats = broyden_window(f, z0, tol=1e-10, max_iter=200, memory=4)
    assert stats.all_converged and stats.nfe > 8                   # the ring wrapped around
    assert (torch.linalg.vector_norm(f(z) - z, dim=1) < 1e-9).all()


def window_reference(f, z0, memory, steps):
    """‖g‖ at each of ``steps`` evaluations of Broyden whose B is rebuilt from −I by the rank-one
    recursion over the last ``memory`` pairs at every step, for each sample: slow and plain, for
    the ring buffer of ``broyden_window`` to agree with. (steps, batch)."""
    z, pairs = z0, [[] for _ in z0]
    g = f(z) - z
    trace = [g.norm(dim=1)]
    for _ in range(steps - 1):
        step = []
        for b in range(len(z)):
            B = -torch.eye(z.shape[1], dtype=DT)
            for s, y in pairs[b][-memory:]:
                B = B + torch.outer(s - B @ y, s @ B) / (s @ B @ y)
            step.append(-B @ g[b])
        z_new = z + torch.stack(step)
        g_new = f(z_new) - z_new
        for b in range(len(z)):
            pairs[b].append((z_new[b] - z[b], g_new[b] - g[b]))
        z, g = z_new, g_new
        trace.append(g.norm(dim=1))
    return torch.stack(trace)


def test_the_ring_buffer_drops_the_oldest_pair_in_order():
    f, z0 = tanh_map(batch=2, rho=0.999)                  # slow: no sample done in 12 steps
    _, stats = broyden_window(f, z0, tol=1e-14, max_iter=12, memory=3)
    assert not stats.converged.any() and stats.nfe == 12
    ref = window_reference(f, z0, memory=3, steps=12)
    assert torch.allclose(stats.abs_residuals, ref, rtol=1e-8, atol=1e-14)
    restart = broyden(f, z0, tol=1e-14, max_iter=12, memory=3)[1]     # (a different method)
    assert not torch.allclose(restart.abs_residuals, ref, rtol=1e-3)
