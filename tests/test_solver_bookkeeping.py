"""The solvers' shared bookkeeping (``deqlite._tracker``): booking the evaluations in chunks, and
testing for convergence every few evaluations, return exactly what booking after every
evaluation returns."""
import pytest
import torch
from conftest import DT

import deqlite._tracker as tracker
from deqlite.solvers import SOLVERS, solve

NAMES = list(SOLVERS)


def mixed_problem():
    """Six samples that freeze at different evaluations, one lost to NaN at its 7th evaluation,
    one whose residual rises and falls (its best iterate is not its last), one that never
    converges (a rotation): every rule of the bookkeeping has a sample to act on."""
    rates = torch.tensor([0.1, 0.5, 0.8, 0.9, 0.95, 0.6], dtype=DT)[:, None]
    b = torch.linspace(0.5, 1.5, 8, dtype=DT).repeat(6, 1)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = rates * torch.tanh(z) + b
        out[4] = -1.02 * z[4] + b[4]                      # oscillates and slowly grows
        out[5] = torch.roll(z[5], 1) * 0.999 + 0.01        # a near-rotation: slow, not converged
        if calls[0] >= 7:
            out[2] = float("nan")
        return out
    return f, torch.zeros(6, 8, dtype=DT)


def run(name, chunk, monkeypatch, **options):
    monkeypatch.setattr(tracker, "MAX_CHUNK", chunk)
    f, z0 = mixed_problem()
    return solve(f, z0, solver=name, tol=1e-9, max_iter=60, stop="abs", **options)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk", [3, 32])
def test_chunked_booking_returns_what_booking_every_step_returns(name, chunk, monkeypatch):
    steps = []
    z1, s1 = run(name, 1, monkeypatch, callback=lambda k, a, r: steps.append(k))
    zc, sc = run(name, chunk, monkeypatch)
    assert steps == list(range(1, s1.nfe + 1))
    assert sc.nfe == s1.nfe and s1.nonfinite.tolist() == [False, False, True, False, False, False]
    assert s1.converged[:2].all() and not s1.all_converged
    torch.testing.assert_close(zc, z1, rtol=0, atol=0, equal_nan=True)
    for field in ("abs_residuals", "rel_residuals", "final_abs", "final_rel"):
        torch.testing.assert_close(getattr(sc, field), getattr(s1, field), rtol=0, atol=0,
                                   equal_nan=True)
    assert torch.equal(sc.converged, s1.converged) and torch.equal(sc.nonfinite, s1.nonfinite)
    if name == "forward_iteration":   # the oscillating sample's best iterate is not its last
        trace = s1.abs_residuals[:, 4]
        assert trace.argmin() < s1.nfe - 1 and sc.final_abs[4] == trace.min()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("every", [2, 5])
def test_check_every_ends_at_most_every_minus_one_evaluations_late_with_the_same_answer(
        name, every, monkeypatch):
    monkeypatch.setattr(tracker, "MAX_CHUNK", 64)          # no booking ends the solve before a test
    f = lambda z: torch.tanh(z @ W.T + u)                                     # noqa: E731
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 16, generator=g, dtype=DT)
    W *= 0.9 / torch.linalg.matrix_norm(W, ord=2)
    u = torch.randn(5, 16, generator=g, dtype=DT) * torch.logspace(-2, 0, 5, dtype=DT)[:, None]
    z0 = torch.zeros(5, 16, dtype=DT)
    z1, s1 = solve(f, z0, solver=name, tol=1e-10, max_iter=400)
    zk, sk = solve(f, z0, solver=name, tol=1e-10, max_iter=400, check_every=every)
    assert s1.all_converged and sk.all_converged
    assert s1.nfe <= sk.nfe < s1.nfe + every and sk.nfe % every == 0
    torch.testing.assert_close(zk, z1, rtol=0, atol=0)
    torch.testing.assert_close(sk.final_rel, s1.final_rel, rtol=0, atol=0)
    torch.testing.assert_close(sk.rel_residuals[:s1.nfe], s1.rel_residuals, rtol=0, atol=0)
    # the evaluations past the end repeat each sample's frozen value
    assert (sk.rel_residuals[s1.nfe:] == s1.rel_residuals[-1]).all()


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"check_every must lie in \[1, inf\)"),
    (2.5, TypeError, "check_every must be an integer"),
    (True, TypeError, "check_every must be an integer"),
])
def test_check_every_is_validated(value, error, match):
    with pytest.raises(error, match=match):
        solve(lambda z: z * 0.5, torch.zeros(2, 3), check_every=value)


def test_large_states_are_booked_every_step_and_small_ones_in_chunks():
    """The iterates of a chunk are kept in memory: a state of a million numbers is booked at
    every evaluation, a small one every ``MAX_CHUNK``."""
    def chunk(shape):
        z = torch.zeros(shape)
        return tracker.Tracker("t", lambda z: z, z, tol=0, max_iter=5, stop="rel", callback=None,
                               check_every=1).chunk
    assert chunk((8, 2 ** 20)) == 1 and chunk((64, 256)) == tracker.MAX_CHUNK


@pytest.mark.parametrize("name", NAMES)
def test_the_returned_state_is_never_the_callers_z0(name):
    """With one evaluation the best iterate is z0: it comes back as a copy, so changing one in
    place cannot change the other."""
    z0 = torch.zeros(2, 3, dtype=DT)
    z, stats = solve(lambda z: 0.5 * z + 1, z0, solver=name, max_iter=1)
    assert stats.nfe == 1 and torch.equal(z, z0) and z.data_ptr() != z0.data_ptr()
