"""The gradient rules when something is off (float64): second derivatives asked of each rule, and
NaN/inf gradients or cells, under every on_fail value. Nothing wrong may come back silently."""
import warnings

import pytest
import torch
from conftest import DT

from deqlite import DEQ, MLPCell
from deqlite.gradients import IFT, DoubleBackwardError
from deqlite.solvers import SolverSpec
from deqlite.stats import ON_FAIL, DEQConvergenceError, DEQNonFiniteError, DEQNonFiniteWarning

SOLVE = dict(tol=1e-12, max_iter=200)


def cell_and_input(scale=0.5, batch=3, seed=0):
    torch.manual_seed(seed)
    cell = MLPCell(3, 5, weight_scale=scale).double()
    return cell, torch.randn(batch, 3, dtype=DT, requires_grad=True)


def penalty_grad(z_of_x, cell, x):
    """∂/∂θ of the gradient penalty ‖∂ℓ/∂x‖² with ℓ = Σ sin(z): needs a graph of ∂ℓ/∂x."""
    g = torch.autograd.grad(z_of_x(x).sin().sum(), x, create_graph=True)[0]
    return torch.autograd.grad(g.square().sum(), list(cell.parameters()))


# ---------------------------------------------------------------- second derivatives

@pytest.mark.parametrize("rule", ["ift", "neumann"])
def test_hook_rules_refuse_a_graph_of_the_gradient_with_what_to_do(rule):
    cell, x = cell_and_input()
    deq = DEQ(cell, **SOLVE, backward=rule)
    with pytest.raises(DoubleBackwardError, match=rf"(?s)backward='{rule}' cannot give second "
                       r"derivatives.*create_graph=True.*dz\*/dθ.*'unrolled'.*'jfb' / 'phantom'"):
        torch.autograd.grad(deq(x).sin().sum(), x, create_graph=True)
    # the refusal leaves the rule usable: a first-order backward afterwards works
    (g,) = torch.autograd.grad(deq(x).sin().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unrolled_second_derivatives_pass_gradgradcheck_and_match_a_long_unroll():
    cell, x = cell_and_input(batch=2)
    deq = DEQ(cell, solver="forward_iteration", tol=0, max_iter=20, backward="unrolled")
    assert torch.autograd.gradgradcheck(lambda x: deq(x), (x,))

    def unroll(x, steps=20):   # by hand: the solver's z_19 (20 evaluations), then z = f(z_19)
        u = cell.inject(x)
        z = torch.zeros_like(u)
        for _ in range(steps):
            z = cell(z, u)
        return z

    got, ref = penalty_grad(deq, cell, x), penalty_grad(unroll, cell, x)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule, options", [("jfb", None), ("phantom", {"k": 3, "tau": 0.6})])
def test_shortcuts_double_backward_is_their_surrogates_with_z_star_fixed(rule, options):
    """JFB and phantom gradients are exact gradients of ℓ(f(sg z*)) and ℓ(z_k); their second
    derivatives are those of the same surrogates (z* held fixed), written out here by hand."""
    cell, x = cell_and_input()
    deq = DEQ(cell, **SOLVE, backward=rule, backward_options=options)
    with torch.no_grad():
        z_star = deq(x)
    k, tau = (1, 1.0) if rule == "jfb" else (options["k"], options["tau"])

    def surrogate(x):
        u, z = cell.inject(x), z_star
        for _ in range(k):
            z = (1 - tau) * z + tau * cell(z, u)
        return z

    for a, b in zip(penalty_grad(deq, cell, x), penalty_grad(surrogate, cell, x)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- NaN/inf gradients

def upstream_weights(bad=float("nan")):
    """ℓ = Σ w ⊙ z with one non-finite weight in sample 0: ∂ℓ/∂z*[0] is not finite."""
    w = torch.ones(3, 5, dtype=DT)
    w[0, 2] = bad
    return w


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("on_fail", ON_FAIL)
def test_a_nonfinite_upstream_gradient_is_never_a_zero_gradient(on_fail, bad):
    cell, x = cell_and_input()
    clean_w = upstream_weights(0.0)
    clean_w[0] = 0
    (clean,) = torch.autograd.grad((DEQ(cell, **SOLVE)(x) * clean_w).sum(), x)

    deq = DEQ(cell, **SOLVE, on_fail=on_fail)
    loss = (deq(x) * upstream_weights(bad)).sum()
    if on_fail == "raise":
        with pytest.raises(DEQNonFiniteError, match=r"(?s)adjoint.*∂ℓ/∂z\*, is itself NaN/inf"):
            torch.autograd.grad(loss, x)
        return
    with pytest.warns(DEQNonFiniteWarning, match=r"(?s)adjoint.*∂ℓ/∂z\*, is itself NaN/inf"):
        (g,) = torch.autograd.grad(loss, x)
    assert torch.isnan(g[0]).all(), "the sample with a NaN/inf upstream gradient lost its NaN"
    assert torch.allclose(g[1:], clean[1:], rtol=1e-10), "the other samples must be unaffected"
    assert deq.backward_stats.nonfinite.tolist() == [True, False, False]


@pytest.mark.parametrize("rule, options", [("neumann", {"k": 3}), ("jfb", None), ("unrolled", None),
                                           ("phantom", {"k": 3, "tau": 0.6})])
def test_the_other_rules_propagate_a_nan_upstream_gradient(rule, options):
    cell, x = cell_and_input()
    deq = DEQ(cell, **SOLVE, backward=rule, backward_options=options, on_fail="ignore")
    (g,) = torch.autograd.grad((deq(x) * upstream_weights()).sum(), x)
    assert torch.isnan(g[0]).all() and torch.isfinite(g[1:]).all()


# ---------------------------------------------------------------- NaN cells

class NaNCell(MLPCell):
    """An MLP cell whose output is NaN for the samples in ``lost``."""

    def __init__(self, *args, lost=slice(None), **kwargs):
        super().__init__(*args, **kwargs)
        self.lost = lost

    def forward(self, z, injection):
        out = super().forward(z, injection).clone()
        out[self.lost] = float("nan")
        return out


@pytest.mark.parametrize("on_fail", ON_FAIL)
def test_a_cell_that_returns_nan_is_loud_under_every_on_fail(on_fail):
    torch.manual_seed(0)
    deq = DEQ(NaNCell(3, 5).double(), **SOLVE, on_fail=on_fail)
    x = torch.randn(2, 3, dtype=DT)
    if on_fail == "raise":
        with pytest.raises(DEQNonFiniteError, match="(?s)forward solve lost samples to NaN/inf"):
            deq(x)
        assert issubclass(DEQNonFiniteError, DEQConvergenceError)
        return
    match = "SolverStats.num_nonfinite" if on_fail == "ignore" else "(?s)lost to NaN/inf.*overflow"
    with torch.no_grad(), pytest.warns(DEQNonFiniteWarning, match=match):
        z = deq(x)
    assert torch.isnan(z).all(), "a solve with no finite iterate must not return z0 (zeros)"
    assert deq.forward_stats.num_nonfinite == 2 and deq.forward_stats.nonfinite.all()


def test_under_ignore_the_nonfinite_warning_is_shown_once_per_place_not_per_step():
    """Its text is fixed, so Python's default filter deduplicates it; the stats count each."""
    torch.manual_seed(0)
    deq = DEQ(NaNCell(3, 5, lost=0).double(), **SOLVE, on_fail="ignore")
    counts = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):
            with torch.no_grad():
                z = deq(torch.randn(2, 3, dtype=DT))
            counts.append(deq.forward_stats.num_nonfinite)
    assert [w.category for w in seen] == [DEQNonFiniteWarning] and counts == [1, 1, 1]
    assert torch.isnan(z[0]).all() and torch.isfinite(z[1]).all()


def test_a_float16_adjoint_of_a_scaled_gradient_is_solved_not_overflowed_to_zero():
    """A gradient scaler multiplies ∂ℓ/∂z* by up to 65536: in float16 the adjoint's norms and
    Anderson's Gram products g·g overflowed (65504), and the gradient became 0. Now it matches
    float64's."""
    cell, x = cell_and_input(scale=0.8)
    grads = {}
    for dtype in (torch.float64, torch.float16):
        deq = DEQ(cell.to(dtype), tol=1e-3, max_iter=50)
        xd = x.detach().to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(deq(xd).sum() * 8192.0, xd)
        grads[dtype] = g.double()
        assert deq.backward_stats.num_nonfinite == 0
    assert (grads[torch.float16] - grads[torch.float64]).norm() < 0.02 * grads[torch.float64].norm()


def test_an_adjoint_that_overflows_midway_is_nan_not_its_last_finite_partial_sum():
    """f(z) = 0.9 z + b (J = 0.9 I) in float32 with ∂ℓ/∂z* = 5e18 per entry, finite: the adjoint
    g = 10 ∂ℓ/∂z* overflows ‖g‖ some steps in. The gradient is NaN (a scaler skips the step), not
    the partial sum before the overflow."""
    b = torch.ones(2, 3, requires_grad=True)
    rule = IFT(SolverSpec("forward_iteration", tol=1e-6, max_iter=200), on_fail="ignore")
    z = rule.attach(torch.full((2, 3), 10.0), lambda z: 0.9 * z + b)
    with pytest.warns(DEQNonFiniteWarning):
        (g,) = torch.autograd.grad((z * 5e18).sum(), b)
    assert torch.isnan(g).all() and rule.stats.nonfinite.all() and rule.stats.nfe > 2


@pytest.mark.parametrize("rule, options, error, match", [
    ("phantom", {"tau": float("nan")}, ValueError, r"backward_options\['tau'\] of 'phantom'.*nan"),
    ("phantom", {"tau": float("inf")}, ValueError, r"backward_options\['tau'\] of 'phantom' must "
                                                   r"lie in \(0, 1\], got inf"),
    ("phantom", {"k": True}, TypeError, r"backward_options\['k'\].*integer, got True"),
    ("neumann", {"k": float("inf")}, TypeError, r"backward_options\['k'\].*integer, got inf"),
    ("ift", None, ValueError, r"lam must lie in \[0, inf\).*got nan"),
])
def test_the_rules_options_and_the_adjoint_solvers_reject_nan_inf_and_bools(rule, options, error,
                                                                             match):
    extra = dict(backward_solver_options={"lam": float("nan")}) if rule == "ift" else {}
    with pytest.raises(error, match=match):
        DEQ(MLPCell(3, 5), backward=rule, backward_options=options, **extra)
