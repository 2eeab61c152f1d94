"""Solvers: closed forms, tolerances, per-sample convergence, stats, failure reports, bad input."""
import pytest
import torch
from conftest import DT, linear_problem, symmetric_tanh_problem

from deqlite.solvers import SOLVERS, SolverSpec, anderson, broyden, forward_iteration, solve

NAMES = list(SOLVERS)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stop", ["rel", "abs"])
def test_linear_map_matches_closed_form(name, stop):
    W, b, z_exact = linear_problem()
    z, stats = solve(lambda z: z @ W.T + b, torch.zeros_like(b), solver=name, tol=1e-11,
                     max_iter=2000, stop=stop)
    assert stats.all_converged
    assert torch.allclose(z, z_exact, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_reaches_tolerance_and_reports_true_residual(name):
    f, z0 = symmetric_tanh_problem()
    z, stats = solve(f, z0, solver=name, tol=1e-6, max_iter=3000)
    fz = f(z)
    rel = (fz - z).norm(dim=1) / fz.norm(dim=1)
    assert stats.all_converged and (rel <= 1e-6 * (1 + 1e-6)).all()
    # the stats describe the returned z, not some other iterate
    assert torch.allclose(stats.final_rel, rel, rtol=1e-6)


def test_accelerated_solvers_need_a_fraction_of_forward_iterations():
    f, z0 = symmetric_tanh_problem()
    nfe = {name: solve(f, z0, solver=name, tol=1e-4, max_iter=3000)[1].nfe for name in NAMES}
    assert nfe["anderson"] <= nfe["forward_iteration"] / 3
    assert nfe["broyden"] <= nfe["forward_iteration"] / 2


@pytest.mark.parametrize("name", NAMES)
def test_nfe_counts_every_call_and_traces_have_nfe_rows(name):
    f, z0 = symmetric_tanh_problem(batch=3)
    calls, seen = [], []

    def counted(z):
        calls.append(1)
        return f(z)

    _, stats = solve(counted, z0, solver=name, tol=1e-5, max_iter=500,
                     callback=lambda k, a, r: seen.append((k, a.shape, r.shape)))
    assert stats.nfe == len(calls) == len(seen)
    assert stats.abs_residuals.shape == stats.rel_residuals.shape == (stats.nfe, 3)
    assert [k for k, _, _ in seen] == list(range(1, stats.nfe + 1))


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_convergence_and_converged_samples_freeze(name):
    # Sample 0: a strong contraction (easy). Sample 1: rates up to 0.95 (hard). Nonlinear, per sample.
    rates = torch.tensor([[0.1, 0.05, -0.1, 0.02, 0.1, 0.05],
                          [0.95, 0.5, -0.9, 0.8, 0.3, -0.6]], dtype=DT)
    b = torch.ones(2, 6, dtype=DT)
    f = lambda z: rates * torch.tanh(z) + b  # noqa: E731
    z, stats = solve(f, torch.zeros(2, 6, dtype=DT), solver=name, tol=1e-9, max_iter=2000,
                     stop="abs")
    assert stats.all_converged
    assert ((f(z) - z).norm(dim=1) <= 1e-9).all()
    trace = stats.abs_residuals
    k_easy = int((trace[:, 0] <= 1e-9).nonzero()[0])
    k_hard = int((trace[:, 1] <= 1e-9).nonzero()[0])
    assert k_easy < k_hard
    assert (trace[k_easy:, 0] == trace[k_easy, 0]).all(), "a converged sample kept changing"


def test_anderson_regularizer_is_scale_free():
    # With λ scaled to the residuals, Anderson on (f, z0) and on the scaled problem c·f(z/c)
    # takes exactly the same steps: no degradation into averaging when residuals are tiny.
    W, b, _ = linear_problem(d=30, batch=4, norm=0.95)
    runs = {}
    for c in (1.0, 1e-7):
        z, stats = anderson(lambda z: z @ W.T + c * b, torch.zeros_like(b), tol=1e-10,
                            max_iter=300, lam=1e-2)
        runs[c] = (z, stats)
    (z1, s1), (zc, sc) = runs[1.0], runs[1e-7]
    assert s1.nfe == sc.nfe
    assert torch.allclose(zc / 1e-7, z1, rtol=1e-6)


def test_broyden_with_small_memory_still_converges():
    W, b, z_exact = linear_problem(d=40, norm=0.95)
    z, stats = broyden(lambda z: z @ W.T + b, torch.zeros_like(b), tol=1e-10, max_iter=3000,
                       memory=3)
    assert stats.all_converged and torch.allclose(z, z_exact, rtol=1e-7, atol=1e-8)


def test_divergent_map_is_reported_not_converged_with_advice():
    b = torch.ones(3, 5, dtype=DT)
    z, stats = forward_iteration(lambda z: -1.5 * z + b, torch.zeros_like(b), tol=1e-6, max_iter=200)
    assert not stats.converged.any() and stats.diverged.all()
    report = stats.report()
    assert "not converged" in report and "damping" in report and "trace" in report
    # the best iterate, not the last (exploded) one, comes back
    assert torch.isfinite(z).all()


def test_damping_rescues_an_oscillating_map():
    b = torch.ones(3, 5, dtype=DT)
    z, stats = forward_iteration(lambda z: -1.5 * z + b, torch.zeros_like(b), tol=1e-10,
                                 max_iter=500, damping=0.5, stop="abs")
    assert stats.all_converged and torch.allclose(z, b / 2.5)


def test_nan_from_f_stops_the_solve_and_marks_failure():
    def f(z):
        out = z * 0.5 + 1
        out[1] = float("nan")
        return out

    z, stats = anderson(f, torch.zeros(2, 3, dtype=DT), tol=1e-12, max_iter=100, stop="abs")
    assert bool(stats.converged[0]) and not bool(stats.converged[1])
    assert stats.nfe < 100 and bool(stats.diverged[1])


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_float32_and_multi_dim_states(name):
    x = torch.randn(3, 2, 4, 4)
    z, stats = solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), solver=name,
                     tol=1e-5, max_iter=200)
    assert z.shape == x.shape and z.dtype == torch.float32 and stats.all_converged


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    f = lambda z: z * 0.5  # noqa: E731
    with pytest.raises(TypeError, match="floating-point"):
        solve(f, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN/inf"):
        solve(f, torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="batch dimension"):
        solve(f, torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        solve(lambda z: z[:, :2], torch.zeros(2, 3))
    with pytest.raises(TypeError, match="a tensor or a non-empty list of tensors"):
        solve(f, [[0.0]])
    with pytest.raises(ValueError, match="share batch size"):
        solve(lambda z: z, [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="same shape"):
        solve(lambda z: z[:1], [torch.zeros(2, 3), torch.zeros(2, 4, 4)])


def test_unknown_options_and_names_are_errors():
    z0 = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="unknown option 'memroy'.*Did you mean 'memory'"):
        solve(lambda z: z, z0, solver="broyden", memroy=5)
    with pytest.raises(TypeError, match="unknown option 'm'"):
        solve(lambda z: z, z0, solver="broyden", m=5)
    with pytest.raises(ValueError, match="unknown solver 'andersen'.*Did you mean 'anderson'"):
        solve(lambda z: z, z0, solver="andersen")


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="anderson", m=0), "m must lie"),
    (dict(solver="anderson", beta=1.5), "beta must lie"),
    (dict(solver="forward_iteration", damping=0.0), "damping must lie"),
    (dict(solver="broyden", memory=2.5), "memory must be an integer"),
    (dict(tol=-1.0), "tol must lie"),
    (dict(max_iter=0), "max_iter must lie"),
    (dict(stop="relative"), "stop must be 'rel' or 'abs'"),
])
def test_option_values_are_validated(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        solve(lambda z: z * 0.5, torch.zeros(2, 3), **kwargs)


@pytest.mark.parametrize("solver", ["forward_iteration", "anderson", "broyden"])
def test_a_list_state_solves_like_its_concatenation(solver):
    """A multiscale state (one tensor per resolution) is solved on its flat concatenation."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3 * 8 + 2 * 4 * 4, 3 * 8 + 2 * 4 * 4, generator=g, dtype=torch.float64)
    A *= 0.8 / torch.linalg.matrix_norm(A, ord=2)
    u = torch.randn(5, A.shape[0], generator=g, dtype=torch.float64)
    flat_f = lambda z: torch.tanh(z @ A.T + u)                       # noqa: E731

    def list_f(state):
        small, big = state
        out = flat_f(torch.cat([small.flatten(1), big.flatten(1)], 1))
        return [out[:, :24].reshape(5, 3, 8), out[:, 24:].reshape(5, 2, 4, 4)]

    z0 = [torch.zeros(5, 3, 8, dtype=torch.float64), torch.zeros(5, 2, 4, 4, dtype=torch.float64)]
    (small, big), stats = solve(list_f, z0, solver=solver, tol=1e-10, max_iter=300)
    flat, flat_stats = solve(flat_f, torch.zeros(5, A.shape[0], dtype=torch.float64),
                             solver=solver, tol=1e-10, max_iter=300)
    assert small.shape == (5, 3, 8) and big.shape == (5, 2, 4, 4)
    assert stats.nfe == flat_stats.nfe and stats.all_converged
    assert torch.allclose(torch.cat([small.flatten(1), big.flatten(1)], 1), flat, atol=1e-12)


# ---------------------------------------------------------------- NaN/inf, precision, settings

@pytest.mark.parametrize("name", NAMES)
def test_samples_lost_to_nan_are_counted_and_come_back_nan_not_z0(name):
    """Sample 1 is NaN from the first evaluation (it has no answer: NaN, never z0 = 0); sample 2
    goes inf after finite iterates (it keeps its best finite one); sample 0 is healthy."""
    def f(z):
        out = 0.5 * z + 1
        nan_row = torch.zeros(3, 1, dtype=DT)
        nan_row[1] = float("nan")
        blows = (z[:, :1].abs() > 1.5) & (torch.arange(3) == 2)[:, None]
        return out + nan_row + torch.where(blows, float("inf"), 0.0)

    z, stats = solve(f, torch.zeros(3, 4, dtype=DT), solver=name, tol=1e-10, max_iter=100)
    assert stats.nonfinite.tolist() == [False, True, True] and stats.num_nonfinite == 2
    assert bool(stats.converged[0]) and torch.allclose(z[0], torch.full((4,), 2.0, dtype=DT))
    assert torch.isnan(z[1]).all() and torch.isfinite(z[2]).all()
    assert "2 lost to NaN/inf" in repr(stats)
    assert "lost to NaN/inf: sample(s) 1, 2" in stats.report()


def test_stats_from_traces_mark_nonfinite_samples_and_keep_the_dtype():
    from deqlite.stats import SolverStats
    r = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)
    stats = SolverStats.from_traces("phantom", [r, r], [r, r], 0.0)
    assert stats.nonfinite.tolist() == [False, True] and stats.dtype == torch.bfloat16


def _stalling_map(dtype, d=16, batch=4):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g)
    W = (0.9 * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype)
    u = torch.randn(batch, d, generator=g).to(dtype)
    return (lambda z: torch.tanh(z @ W.T + u)), torch.zeros(batch, d, dtype=dtype)


@pytest.mark.parametrize("dtype, wider", [(torch.float16, "float32"), (torch.bfloat16, "float32"),
                                          (torch.float32, "float64")])
def test_a_tol_below_the_dtypes_precision_floor_is_named_not_blamed_on_contraction(dtype, wider):
    f, z0 = _stalling_map(dtype)
    tol = {torch.float32: 1e-12}.get(dtype, 1e-6)
    _, stats = solve(f, z0, solver="anderson", tol=tol, max_iter=60)
    assert stats.dtype == dtype and not stats.all_converged
    report = stats.report()
    eps = torch.finfo(dtype).eps
    assert f"tol {tol:g} is below the precision floor of {dtype} (eps ≈ {eps:.1e})" in report
    assert f"or solve in {wider}" in report and "damping` < 1" not in report
    suggested = float(report.split("Raise tol to about ")[1].split(" ")[0])
    _, again = solve(f, z0, solver="anderson", tol=suggested, max_iter=60)
    assert again.all_converged, report


def test_a_map_that_does_not_contract_in_bfloat16_still_gets_the_damping_advice():
    b = torch.full((2, 4), 1.0, dtype=torch.bfloat16)
    _, stats = forward_iteration(lambda z: torch.tanh(1 - 2 * z) + 0 * b, torch.zeros_like(b),
                                 tol=1e-2, max_iter=40)
    assert not stats.converged.any() and "damping" in stats.report()
    assert "precision floor" not in stats.report()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(tol=float("nan")), ValueError, r"tol must lie in \[0, inf\) \(the residual.*got nan"),
    (dict(tol=float("inf")), ValueError, r"tol must lie in \[0, inf\).*got inf"),
    (dict(tol=True), TypeError, r"tol must be a number in \[0, inf\).*got True"),
    (dict(tol=1.0), ValueError, r"tol must be below 1 for stop='rel', got 1.0.*z0"),
    (dict(max_iter=float("inf")), TypeError, r"max_iter must be an integer in \[1, inf\)"),
    (dict(max_iter=True), TypeError, r"max_iter must be an integer.*got True"),
    (dict(solver="anderson", lam=float("nan")), ValueError,
     r"lam must lie in \[0, inf\) \(anderson's relative regularizer\), got nan"),
    (dict(solver="anderson", lam=float("inf")), ValueError, r"lam must lie in \[0, inf\).*got inf"),
    (dict(solver="anderson", lam=-1e-4), ValueError, r"lam must lie in \[0, inf\).*got -0.0001"),
    (dict(solver="anderson", beta=float("nan")), ValueError, r"beta must lie in \(0, 1\].*got nan"),
    (dict(solver="anderson", beta=0), ValueError, r"beta must lie in \(0, 1\].*got 0"),
    (dict(solver="anderson", m=True), TypeError, r"m must be an integer in \[1, inf\).*got True"),
    (dict(solver="anderson", m=5.0), TypeError, r"m must be an integer.*got 5.0"),
    (dict(solver="forward_iteration", damping=float("inf")), ValueError,
     r"damping must lie in \(0, 1\] \(forward_iteration's step size τ\), got inf"),
    (dict(solver="forward_iteration", damping=-0.5), ValueError, r"damping must lie.*got -0.5"),
    (dict(solver="broyden", memory=0), ValueError, r"memory must lie in \[1, inf\).*got 0"),
    (dict(solver="broyden", memory=float("nan")), TypeError, r"memory must be an integer.*nan"),
])
def test_nan_inf_bool_and_out_of_range_settings_name_the_setting_value_and_range(kwargs, error,
                                                                                 match):
    with pytest.raises(error, match=match):
        solve(lambda z: z * 0.5, torch.zeros(2, 3), **kwargs)
    solver = kwargs.pop("solver", "anderson")
    stopping = {k: kwargs.pop(k) for k in ("tol", "max_iter") if k in kwargs}
    with pytest.raises(error, match=match):         # a SolverSpec refuses it when made
        SolverSpec(solver, **stopping, options=kwargs)


def test_tol_of_one_or_more_is_fine_for_the_absolute_residual():
    z, stats = solve(lambda z: 0.5 * z + 4, torch.zeros(2, 3), tol=1.0, stop="abs")
    assert stats.all_converged and (stats.final_abs <= 1.0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, match", [
    (lambda z: (0.5 * z + 1).float(), r"f\(z\) returned shape \(2, 3\), torch.float32, cpu for a "
     r"state of shape \(2, 3\), torch.float64, cpu.*\.to\(z.dtype\)"),
    (lambda z: (0.5 * z + 1)[:1], r"f\(z\) returned shape \(1, 3\).*state of shape \(2, 3\).*"
     r"batch size included"),
    (lambda z: None, r"f\(z\) returned a NoneType for a state of shape \(2, 3\)"),
])
def test_f_returning_another_dtype_batch_or_type_is_named(name, bad, match):
    with pytest.raises(ValueError, match=match):
        solve(bad, torch.zeros(2, 3, dtype=DT), solver=name)


def test_f_returning_another_dtype_for_a_list_state_is_named():
    z0 = [torch.zeros(2, 3, dtype=DT), torch.zeros(2, 4, dtype=DT)]
    with pytest.raises(ValueError, match=r"f\(z\) returned \[shape \(2, 3\), torch.float32.*"
                                         r"for a state of \[shape \(2, 3\), torch.float64"):
        solve(lambda s: [t.float() * 0.5 for t in s], z0)


def test_under_autocast_f_may_return_another_dtype_and_the_stats_record_the_lower_one():
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = solve(lambda z: torch.tanh(lin(z)), torch.zeros(2, 8), tol=1e-2)
    assert stats.dtype == torch.bfloat16 and stats.all_converged


@pytest.mark.parametrize("name", NAMES)
def test_float16_states_with_large_values_do_not_overflow_residuals_or_anderson(name):
    """‖·‖ and Anderson's g·g of a float16 state of entries ~4000 exceed 65504: both are taken in
    float32, so the solve converges instead of calling every sample lost to inf."""
    b = torch.full((2, 64), 2000.0, dtype=torch.float16)
    z, stats = solve(lambda z: 0.5 * z + b, torch.zeros_like(b), solver=name, tol=1e-3)
    assert stats.all_converged and stats.num_nonfinite == 0 and stats.dtype == torch.float16
    assert torch.allclose(z.float(), torch.full((2, 64), 4000.0), rtol=2e-3)


def test_anderson_without_regularization_freezes_a_sample_at_its_fixed_point():
    """lam=0 is valid: a frozen sample's Gram row is 0 (singular H); its system is not solved."""
    W, b, z_exact = linear_problem(d=6, batch=3, norm=0.5)
    b[0] = 0                                     # z0 = 0 is sample 0's fixed point
    z, stats = anderson(lambda z: z @ W.T + b, torch.zeros_like(b), lam=0.0, m=3, tol=1e-10,
                        max_iter=50)
    assert stats.all_converged and torch.allclose(z[1:], z_exact[1:], atol=1e-9)


def test_anderson_without_regularization_with_more_history_than_state_dimensions():
    """m > D: the Gram matrix G Gᵀ (n × n, rank ≤ D) is singular; λ's float64-eps floor keeps it
    solvable, so lam=0 still converges rather than raising torch's _LinAlgError."""
    z, stats = anderson(lambda z: torch.tanh(0.5 * z + 1), torch.zeros(2, 1, dtype=DT), lam=0.0,
                        m=4, tol=1e-12, max_iter=40)
    assert stats.all_converged and torch.allclose(torch.tanh(0.5 * z + 1), z, atol=1e-11)
