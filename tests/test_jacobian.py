"""Jacobian estimators against exact values on small problems; the JR term's gradient against
finite differences in float64; the regularizer inside DEQ; diagnose()."""
import math

import pytest
import torch
from matplotlib.figure import Figure

from deqlite import DEQ, MLPCell
from deqlite.deq import find_deq
from deqlite.diagnostics import diagnose
from deqlite.jacobian import (exact_jacobian, exact_spectral_radius, frobenius_sq,
                              hutchinson_frobenius, random_probes, ritz_values, spectral_radius)
from deqlite.models import DEQClassifier

DT = torch.float64


def tanh_cell_map(d=24, batch=4, scale=1.0, symmetric=False, seed=0):
    """f(z) = tanh(W z + U x + b) of a random MLPCell, and a random state z to linearize at."""
    torch.manual_seed(seed)
    cell = MLPCell(5, d, weight_scale=scale).double()
    if symmetric:
        with torch.no_grad():
            W = cell.W.weight
            W.copy_((W + W.T) / 2)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, 5, generator=g, dtype=DT)
    z = 0.5 * torch.randn(batch, d, generator=g, dtype=DT)
    injection = cell.inject(x)
    return cell, (lambda z_: cell(z_, injection)), z


def with_graph(f, z):
    z_in = z.detach().requires_grad_()
    return f(z_in), z_in


# ---------------------------------------------------------------- exact Jacobian

def test_exact_jacobian_matches_autograd_functional_per_sample():
    _, f, z = tanh_cell_map(d=7, batch=3)
    J = exact_jacobian(f, z)
    assert J.shape == (3, 7, 7)
    full = torch.autograd.functional.jacobian(f, z)                # (batch, d, batch, d)
    for i in range(3):
        assert torch.allclose(J[i], full[i, :, i, :], atol=1e-12)
        for j in range(3):                                         # the batch is independent
            if j != i:
                assert full[i, :, j, :].abs().max() == 0


def test_frobenius_sq_is_the_sum_of_squared_jacobian_entries():
    _, f, z = tanh_cell_map(d=6)
    J = exact_jacobian(f, z)
    assert torch.allclose(frobenius_sq(f, z, per_element=False), (J ** 2).sum((1, 2)))
    assert torch.allclose(frobenius_sq(f, z), (J ** 2).sum((1, 2)) / 6)


# ---------------------------------------------------------------- Hutchinson

@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_mean_is_within_2_percent_of_exact(kind):
    _, f, z = tanh_cell_map(d=20, batch=3, scale=1.3)
    exact = frobenius_sq(f, z)
    f_z, z_in = with_graph(f, z)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([hutchinson_frobenius(f_z, z_in, n_probes=1, kind=kind, generator=g)
                         for _ in range(8000)])
    rel_err = ((draws.mean(0) - exact).abs() / exact).max().item()
    assert rel_err < 0.02, rel_err
    one_probe_spread = (draws.std(0) / exact).min().item()
    assert one_probe_spread > 0.05, "a single probe is an estimate, not the exact value"


def test_hutchinson_with_scaled_basis_probes_is_exact():
    _, f, z = tanh_cell_map(d=9, batch=2)
    f_z, z_in = with_graph(f, z)
    probes = 3.0 * torch.eye(9, dtype=DT)[:, None, :].expand(9, 2, 9)   # √d e_i
    assert torch.allclose(hutchinson_frobenius(f_z, z_in, probes=probes), frobenius_sq(f, z))


def test_rademacher_probes_have_lower_variance_than_gaussian():
    _, f, z = tanh_cell_map(d=20, batch=2)
    f_z, z_in = with_graph(f, z)
    spread = {}
    for kind in ("gaussian", "rademacher"):
        g = torch.Generator().manual_seed(1)
        draws = torch.stack([hutchinson_frobenius(f_z, z_in, kind=kind, generator=g)
                             for _ in range(2000)])
        spread[kind] = draws.var(0).mean().item()
    assert spread["rademacher"] < spread["gaussian"]


def test_hutchinson_argument_errors():
    _, f, z = tanh_cell_map(d=4)
    f_z, z_in = with_graph(f, z)
    with pytest.raises(ValueError, match="require grad"):
        hutchinson_frobenius(f_z, z.detach())
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson_frobenius(f_z, z_in, probes=torch.randn(2, 3, 3, dtype=DT))
    with pytest.raises(ValueError, match="unknown probe kind 'gausian'.*Did you mean 'gaussian'"):
        random_probes(z, 1, kind="gausian")


def jr_value(cell, z_star, x, probes):
    """The JR term at a fixed z*: mean over the batch of the fixed-probe Hutchinson estimate."""
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        return hutchinson_frobenius(cell(z_in, cell.inject(x)), z_in, probes=probes,
                                    create_graph=True).mean()


def test_jr_gradient_matches_finite_differences_in_float64():
    cell, _, z = tanh_cell_map(d=8, batch=3, scale=1.2)
    x = torch.randn(3, 5, dtype=DT)
    probes = random_probes(z, 2, generator=torch.Generator().manual_seed(5))
    params = dict(cell.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(jr_value(cell, z, x, probes), list(params.values()))))
    eps = 1e-6
    for name, p in params.items():
        assert grads[name].abs().max() > 1e-3, f"the JR term must depend on {name}"
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                p[idx] += eps
                up = jr_value(cell, z, x, probes).item()
                p[idx] -= 2 * eps
                down = jr_value(cell, z, x, probes).item()
                p[idx] += eps
            fd = (up - down) / (2 * eps)
            assert math.isclose(grads[name][idx].item(), fd, rel_tol=1e-6, abs_tol=1e-9), (name, idx)


def test_gradient_of_the_exact_frobenius_norm_matches_finite_differences():
    """With √d·e_i probes the estimate is exact, so its gradient is that of ‖J‖²_F/d itself."""
    cell, _, z = tanh_cell_map(d=6, batch=2)
    x = torch.randn(2, 5, dtype=DT)
    probes = (6 ** 0.5) * torch.eye(6, dtype=DT)[:, None, :].expand(6, 2, 6)
    W = cell.W.weight
    grad = torch.autograd.grad(jr_value(cell, z, x, probes), W)[0]

    def exact(Wp):
        inj = cell.inject(x)
        return frobenius_sq(lambda z_: torch.tanh(z_ @ Wp.T + inj), z).mean()

    eps = 1e-6
    for idx in [(0, 0), (2, 5), (5, 1)]:
        E = torch.zeros_like(W)
        E[idx] = eps
        with torch.no_grad():
            fd = (exact(W + E) - exact(W - E)).item() / (2 * eps)
        assert math.isclose(grad[idx].item(), fd, rel_tol=1e-6, abs_tol=1e-9)


# ---------------------------------------------------------------- spectral radius

def naive_power_method(J, n_iter=300):
    """|Rayleigh quotient| after power iteration: what many DEQ codes use."""
    v = torch.randn(J.shape[-1], dtype=J.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(n_iter):
        v = J @ v
        v = v / v.norm()
    return (v @ J @ v).abs().item()


@pytest.mark.parametrize("symmetric", [False, True], ids=["non-symmetric", "symmetric"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_within_5_percent_of_exact(symmetric, seed):
    _, f, z = tanh_cell_map(d=64, batch=4, scale=1.1, symmetric=symmetric, seed=seed)
    exact = exact_spectral_radius(f, z)
    estimate = spectral_radius(f, z, n_iter=40, generator=torch.Generator().manual_seed(seed))
    assert ((estimate - exact).abs() / exact).max() < 0.05


def test_arnoldi_is_right_where_the_power_method_is_not():
    """J with a dominant complex pair 0.9·e^{±iπ/3}: power iteration rotates and reads ~Re λ."""
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    blocks = torch.zeros(6, 6, dtype=DT)
    blocks[:2, :2] = 0.9 * torch.tensor([[c, -s], [s, c]], dtype=DT)
    blocks[2:, 2:] = torch.diag(torch.tensor([0.5, -0.4, 0.3, 0.1], dtype=DT))
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(3)))
    J = Q @ blocks @ Q.T
    f = lambda z: z @ J.T                                          # noqa: E731
    z = torch.zeros(2, 6, dtype=DT)
    assert naive_power_method(J) < 0.8                             # under-estimates 0.9
    assert torch.allclose(spectral_radius(f, z), torch.full((2,), 0.9, dtype=DT), atol=1e-8)
    eig = ritz_values(f, z)[0]
    assert eig.imag.abs().max() > 0.7                              # finds the complex pair


def test_arnoldi_survives_an_invariant_subspace():
    """A start vector inside an eigenspace closes the Krylov space after one step."""
    J = torch.diag(torch.tensor([0.2, 0.5, -0.95, 0.1], dtype=DT))
    f = lambda z: z @ J.T                                          # noqa: E731
    rho = spectral_radius(f, torch.zeros(3, 4, dtype=DT), n_iter=4)
    assert torch.allclose(rho, torch.full((3,), 0.95, dtype=DT))


# ---------------------------------------------------------------- the regularizer in DEQ

@pytest.mark.parametrize("backward", ["ift", "unrolled"])
def test_deq_jac_loss_is_the_estimate_at_z_star_and_trains_the_cell(backward):
    cell, _, _ = tanh_cell_map(d=10, batch=3, scale=0.8)
    deq = DEQ(cell, tol=1e-12, max_iter=200, backward=backward)
    x = torch.randn(3, 5, dtype=DT)
    torch.manual_seed(7)
    with deq.options(jac_probes=3):
        z_star = deq(x)
    assert deq.jac_loss is not None and deq.jac_loss.requires_grad
    torch.manual_seed(7)                                           # the same probes again
    probes = torch.randn(3, *z_star.shape, dtype=DT)
    expected = jr_value(cell, z_star, x, probes)
    assert torch.allclose(deq.jac_loss, expected, rtol=1e-8)
    got = torch.autograd.grad(deq.jac_loss, cell.W.weight)[0]
    want = torch.autograd.grad(expected, cell.W.weight)[0]
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-10)


def test_deq_jac_loss_only_when_asked_and_when_training():
    cell, _, _ = tanh_cell_map(d=6, batch=2, scale=0.5)
    deq = DEQ(cell)
    x = torch.randn(2, 5, dtype=DT)
    deq(x)
    assert deq.jac_loss is None
    with deq.options(jac_probes=1):
        with torch.no_grad():
            deq(x)
        assert deq.jac_loss is None
        with deq.options(pretrain_steps=3):
            deq(x)
        assert deq.jac_loss is not None                            # warm-up is regularized too
    with pytest.raises(ValueError, match="jac_probes"):
        with deq.options(jac_probes=-1):
            pass


def test_jr_lowers_the_jacobian_norm_when_trained_on():
    cell, _, _ = tanh_cell_map(d=16, batch=8, scale=1.0)
    deq = DEQ(cell, tol=1e-8, max_iter=100)
    x = torch.randn(8, 5, dtype=DT)
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)
    before = frobenius_sq(lambda z: cell(z, cell.inject(x)), deq(x).detach()).mean()
    for _ in range(30):
        with deq.options(jac_probes=2):
            deq(x)
        opt.zero_grad()
        deq.jac_loss.backward()
        opt.step()
    after = frobenius_sq(lambda z: cell(z, cell.inject(x)), deq(x).detach()).mean()
    assert after < 0.5 * before


# ---------------------------------------------------------------- diagnose

def test_diagnose_a_healthy_and_a_repelling_model():
    images = torch.rand(6, 1, 28, 28)
    torch.manual_seed(0)
    healthy = DEQClassifier(channels=4, hidden=32, weight_scale=0.5,
                            deq=dict(solver="forward_iteration", tol=1e-5, max_iter=100))
    report = diagnose(healthy, images)
    assert report.status.startswith("converged") and report.stats.all_converged
    assert (report.spectral_radius < 0.5 + 1e-6).all()             # ρ(J) ≤ ‖W‖₂ for tanh
    assert report.exact and len(report.eigenvalues) == 32
    assert math.isfinite(report.forward_iteration_steps())
    torch.manual_seed(0)
    wild = DEQClassifier(channels=4, hidden=32, weight_scale=4.0,
                         deq=dict(solver="forward_iteration", tol=1e-5, max_iter=40))
    with wild.deq.options(pretrain_steps=2):
        report = diagnose(wild, images)                            # solves, not unrolls
        assert wild.deq.pretrain_steps == 2                        # restored afterwards
    assert not report.stats.all_converged and (report.spectral_radius >= 1).any()
    text = str(report)
    assert "≥ 1" in text and "Jacobian regularization" in text and "damping" in text
    assert "not an equilibrium" in text and "repels" not in text     # no z* was found
    assert report.forward_iteration_steps() == math.inf
    fig = report.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_diagnose_large_states_uses_estimates_that_agree_with_exact():
    torch.manual_seed(0)
    model = DEQClassifier(channels=2, hidden=300, weight_scale=0.9, deq=dict(tol=1e-6))
    images = torch.rand(3, 1, 28, 28)
    report = diagnose(model, images, generator=torch.Generator().manual_seed(0))
    assert not report.exact
    deq_input = model.stem(images)
    injection = model.cell.inject(deq_input)
    f = lambda z: model.cell(z, injection)                         # noqa: E731
    z = model.deq(deq_input).detach()
    assert torch.allclose(report.spectral_radius, exact_spectral_radius(f, z), rtol=0.05)
    assert torch.allclose(report.frobenius, frobenius_sq(f, z), rtol=0.25)


def test_find_deq_errors():
    with pytest.raises(ValueError, match="holds 0 DEQ modules"):
        find_deq(torch.nn.Linear(2, 2))
    two = torch.nn.ModuleList([DEQ(MLPCell(2, 3)), DEQ(MLPCell(2, 3))])
    with pytest.raises(ValueError, match="holds 2 DEQ modules"):
        find_deq(two)


class LinearCell(torch.nn.Module):
    """f(z, x) = W z + x with W = diag(1.5, 0.2, 0.1): a unique equilibrium, which repels
    forward iteration (ρ = 1.5) and which Broyden finds anyway (a linear root is easy for it)."""

    def __init__(self):
        super().__init__()
        self.W = torch.nn.Parameter(torch.diag(torch.tensor([1.5, 0.2, 0.1], dtype=DT)))

    def inject(self, x):
        return x

    def init_state(self, injection):
        return torch.zeros_like(injection)

    def forward(self, z, injection):
        return z @ self.W.T + injection


def test_diagnose_says_repels_only_of_an_equilibrium_it_found():
    deq = DEQ(LinearCell(), solver="broyden", tol=1e-10, max_iter=50)
    report = diagnose(deq, torch.randn(2, 3, dtype=DT))
    assert report.stats.all_converged
    assert torch.allclose(report.spectral_radius, torch.full((2,), 1.5, dtype=DT))
    assert "z* repels forward iteration" in str(report)


@pytest.mark.parametrize("width", [32, 300], ids=["exact Jacobian", "Arnoldi"])
def test_diagnose_a_bfloat16_solve_at_its_precision_floor(width):
    """bf16 cannot resolve a relative residual of 1e-6: diagnose says so and names a reachable
    tol (not damping), and its eigenvalues are computed in float32 (eigvals has no bf16)."""
    torch.manual_seed(0)
    cell = MLPCell(16, width, weight_scale=0.7).to(torch.bfloat16)
    deq = DEQ(cell, solver="anderson", tol=1e-6, max_iter=30, on_fail="ignore")
    d = diagnose(deq, torch.randn(4, 16, dtype=torch.bfloat16))
    assert d.status.startswith("at the precision floor") and "bfloat16" in d.status
    assert any("Raise tol to about" in a and "damping would not help" in a for a in d.advice)
    assert torch.isfinite(d.spectral_radius).all() and (d.spectral_radius < 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arnoldi_on_a_low_rank_jacobian_matches_the_exact_spectral_radius(dtype):
    # a saturated or low-rank cell: the Krylov space closes after `rank` steps, and in float32 the
    # rounding left after orthogonalization must count as closed, not be normalized into a vector
    # that is no longer orthogonal to the basis (that gave Ritz values 100× too large)
    torch.manual_seed(0)
    d, rank = 64, 5
    A = (torch.randn(3, d, rank) @ torch.randn(3, rank, d) / d ** 0.5 * 0.5).to(dtype)

    def f(z):
        return torch.tanh(torch.einsum("bij,bj->bi", A, z))

    z = 0.1 * torch.randn(3, d, dtype=dtype)
    exact = exact_spectral_radius(f, z)
    for n_iter in (10, 40, d):
        got = spectral_radius(f, z, n_iter=n_iter, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, exact, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=0)
