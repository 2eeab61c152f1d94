"""The gradient rules (deqlite.gradients, float64): IFT against a long unroll, JFB, phantom
gradients and the truncated Neumann series against formulas by hand; the registry and its errors.

The references are computed independently of deqlite's hooks: autograd through a long explicit
unroll, and closed forms built from the exact per-sample Jacobian J = diag(1 − f²) W of the
tanh cell f(z, x) = tanh(W z + U x + b).
"""
import pytest
import torch
from conftest import DT

from deqlite import BACKWARDS, DEQ, MLPCell
from deqlite.cells import ConvCell
from deqlite.gradients import IFT, Phantom, make_rule, neumann_series
from deqlite.models import build_model
from deqlite.solvers import SolverSpec

SHORTCUTS = [("jfb", None), ("phantom", {"k": 3, "tau": 0.6}), ("neumann", {"k": 3})]
ALL_RULES = [("ift", None), ("unrolled", None), *SHORTCUTS]


def cell_and_input(scale=0.8, d_in=5, d=8, batch=4, seed=0):
    torch.manual_seed(seed)
    cell = MLPCell(d_in, d, weight_scale=scale).double()
    x = torch.randn(batch, d_in, dtype=DT, requires_grad=True)
    return cell, x


def loss_fn(z):
    return (z ** 2).sum() * z.sum() + z[:, 0].sin().sum()      # mixes samples and coordinates


def flat_grads(z, cell, x):
    gs = torch.autograd.grad(loss_fn(z), [x, *cell.parameters()])
    return torch.cat([g.flatten() for g in gs])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def exact_pieces(cell, x):
    """z* (from a long explicit iteration), v = ∂ℓ/∂z*, f' = 1 − f(z*)², per-sample J (batch, d, d)."""
    with torch.no_grad():
        inj = cell.inject(x)
        z = torch.zeros_like(inj)
        for _ in range(2000):
            z = cell(z, inj)
    z_star = z.requires_grad_()
    v = torch.autograd.grad(loss_fn(z_star), z_star)[0]
    with torch.no_grad():
        fprime = 1 - cell(z_star, inj) ** 2
        J = fprime[:, :, None] * cell.W.weight[None]
    return z_star.detach(), v, fprime, J


def grads_from_adjoint(cell, x, z_star, g_pre):
    """∂ℓ/∂(x, W, U, b) by hand for the tanh cell, given s = f' ⊙ (the adjoint g): the
    parameter gradients are gᵀ ∂f/∂θ (ds/dW = s z*ᵀ, ds/dU = s xᵀ, ds/db = s, ds/dx = Uᵀ s)."""
    s = g_pre
    return torch.cat([(s @ cell.U.weight).flatten(), (s.T @ z_star).flatten(),
                      (s.T @ x.detach()).flatten(), s.sum(0)])


def test_ift_matches_autograd_through_a_long_unroll():
    cell, x = cell_and_input()
    inj = cell.inject(x)
    z = torch.zeros_like(inj)
    for _ in range(1500):
        z = cell(z, inj)
    ref = flat_grads(z, cell, x)
    deq = DEQ(cell, tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=500)
    assert rel_err(flat_grads(deq(x), cell, x), ref) < 1e-10


def test_jfb_is_the_one_step_formula_by_hand():
    cell, x = cell_and_input()
    z_star, v, fprime, _ = exact_pieces(cell, x)
    by_hand = grads_from_adjoint(cell, x, z_star, fprime * v)          # g = v: (I − Jᵀ)⁻¹ dropped
    deq = DEQ(cell, tol=1e-13, max_iter=300, backward="jfb")
    got = flat_grads(deq(x), cell, x)
    assert rel_err(got, by_hand) < 1e-10
    ift = flat_grads(DEQ(cell, tol=1e-13, max_iter=300)(x), cell, x)
    assert rel_err(got, ift) > 0.05                     # at ρ ≈ 0.8 the shortcut is far off IFT
    assert deq.backward_stats is None


def test_neumann_is_the_truncated_series_by_hand():
    cell, x = cell_and_input()
    z_star, v, fprime, J = exact_pieces(cell, x)
    k = 4
    term, g = v, torch.zeros_like(v)
    for _ in range(k):                                 # g = Σ_{i<k} (Jᵀ)ⁱ v, per sample
        g = g + term
        term = torch.einsum("bij,bi->bj", J, term)
    by_hand = grads_from_adjoint(cell, x, z_star, fprime * g)
    deq = DEQ(cell, tol=1e-13, max_iter=300, backward="neumann", backward_options={"k": k})
    got = flat_grads(deq(x), cell, x)
    assert rel_err(got, by_hand) < 1e-10
    stats = deq.backward_stats
    assert stats.solver == "neumann" and stats.nfe == k and stats.abs_residuals.shape == (k, 4)
    assert torch.allclose(stats.abs_residuals[0], v.norm(dim=1))        # row 0: ‖v‖
    assert torch.allclose(stats.abs_residuals[1], torch.einsum("bij,bi->bj", J, v).norm(dim=1))


def test_phantom_is_the_damped_unroll_by_hand():
    cell, x = cell_and_input()
    z_star, v, fprime, J = exact_pieces(cell, x)
    k, tau = 3, 0.6
    eye = torch.eye(J.shape[1], dtype=DT)
    M = (1 - tau) * eye + tau * J                       # the damped step's Jacobian at z*
    A, P = torch.zeros_like(J), eye.expand_as(J)
    for _ in range(k):                                  # A = τ Σ_{j<k} Mʲ
        A, P = A + tau * P, P @ M
    g = torch.einsum("bij,bi->bj", A, v)                # the adjoint the phantom gradient uses
    by_hand = grads_from_adjoint(cell, x, z_star, fprime * g)
    deq = DEQ(cell, tol=1e-13, max_iter=300, backward="phantom",
              backward_options={"k": k, "tau": tau})
    got = flat_grads(deq(x), cell, x)
    assert rel_err(got, by_hand) < 1e-9
    assert deq.backward_stats.solver == "phantom" and deq.backward_stats.nfe == k


def test_one_step_cases_coincide_with_jfb():
    cell, x = cell_and_input()
    grads = {}
    for rule, options in [("jfb", None), ("neumann", {"k": 1}), ("phantom", {"k": 1, "tau": 1.0})]:
        deq = DEQ(cell, tol=1e-13, max_iter=300, backward=rule, backward_options=options)
        grads[rule] = flat_grads(deq(x), cell, x)
    assert rel_err(grads["neumann"], grads["jfb"]) < 1e-12
    assert rel_err(grads["phantom"], grads["jfb"]) < 1e-12


@pytest.mark.parametrize("rule, options, tol", [
    ("neumann", {"k": 200}, 1e-10),
    ("phantom", {"k": 300, "tau": 0.5}, 1e-10),
    ("phantom", {"k": 200, "tau": 1.0}, 1e-10),
])
def test_large_k_converges_to_the_ift_gradient(rule, options, tol):
    cell, x = cell_and_input(scale=0.9, d=16)
    ift = flat_grads(DEQ(cell, tol=1e-13, max_iter=300, backward_tol=1e-13,
                         backward_max_iter=500)(x), cell, x)
    errors = []
    for k in (1, 5, 20, options["k"]):
        deq = DEQ(cell, tol=1e-13, max_iter=300, backward=rule,
                  backward_options={**options, "k": k})
        errors.append(rel_err(flat_grads(deq(x), cell, x), ift))
    assert errors[-1] < tol, errors
    assert errors[0] > 1e-2 and errors == sorted(errors, reverse=True), errors


@pytest.mark.parametrize("rule, options", ALL_RULES)
def test_every_rule_reaches_every_parameter_and_the_input(rule, options):
    cell, x = cell_and_input()
    deq = DEQ(cell, tol=1e-10, max_iter=300, backward=rule, backward_options=options)
    loss_fn(deq(x)).backward()
    for name, p in [("x", x), *cell.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{rule}: no gradient reached {name}"


@pytest.mark.parametrize("rule, options", SHORTCUTS)
def test_shortcuts_on_a_conv_cell_reach_the_block_and_the_injection(rule, options):
    torch.manual_seed(0)
    cell = ConvCell(2, 8, expansion=2, groups=4).double()
    x = torch.randn(2, 2, 6, 6, dtype=DT, requires_grad=True)
    deq = DEQ(cell, tol=1e-4, max_iter=100, backward=rule, backward_options=options)
    z = deq(x)
    assert z.shape == (2, 8, 6, 6)
    (z ** 2).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in cell.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{rule}: nothing reached {name}"


def test_no_graph_no_gradient_work():
    cell, x = cell_and_input()
    deq = DEQ(cell, tol=1e-10, max_iter=300, backward="phantom")
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad and deq.backward_stats is None and deq.forward_stats is not None


def test_a_model_takes_the_rule_through_its_deq_options():
    model = build_model("deq_classifier", channels=4, hidden=16,
                        deq=dict(backward="neumann", backward_options={"k": 3}, tol=1e-3))
    assert model.deq.backward_rule == "neumann" and model.deq.backward_options == {"k": 3}
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.deq.backward_stats.nfe == 3 and "neumann" in repr(model.deq)
    with pytest.raises(TypeError, match="unknown option 'tua'.*Did you mean 'tau'"):
        build_model("deq_classifier", deq=dict(backward="phantom", backward_options={"tua": 0.5}))


def test_defaults_and_bad_options_fail_with_helpful_messages():
    cell = MLPCell(5, 8)
    assert DEQ(cell, backward="phantom").backward_options == {"k": 5, "tau": 0.5}
    assert DEQ(cell, backward="phantom", backward_options={"k": 2}).backward_options == \
        {"k": 2, "tau": 0.5}
    assert DEQ(cell, backward="neumann").backward_options == {"k": 5}
    with pytest.raises(ValueError, match="unknown backward rule 'phantm'.*Did you mean 'phantom'"):
        DEQ(cell, backward="phantm")
    with pytest.raises(TypeError, match="unknown option 'kk'.*Did you mean 'k'.*Valid options: k, tau"):
        DEQ(cell, backward="phantom", backward_options={"kk": 5})
    with pytest.raises(TypeError, match="backward 'neumann' got an unknown option 'tau'.*Valid options: k"):
        DEQ(cell, backward="neumann", backward_options={"tau": 0.5})
    with pytest.raises(TypeError, match="'ift' takes no backward_options.*backward_solver"):
        DEQ(cell, backward="ift", backward_options={"k": 5})
    with pytest.raises(TypeError, match="'jfb' takes no backward_options"):
        DEQ(cell, backward="jfb", backward_options={"k": 1})
    with pytest.raises(ValueError, match=r"backward_options\['k'\] of 'neumann' must lie in \[1, inf\]"):
        DEQ(cell, backward="neumann", backward_options={"k": 0})
    with pytest.raises(TypeError, match=r"backward_options\['k'\].*must be an integer"):
        DEQ(cell, backward="phantom", backward_options={"k": 2.5})
    with pytest.raises(ValueError, match=r"backward_options\['tau'\] of 'phantom' must lie in \(0, 1\]"):
        DEQ(cell, backward="phantom", backward_options={"tau": 1.5})
    with pytest.raises(TypeError, match="backward_options must be a dict"):
        DEQ(cell, backward="neumann", backward_options=[("k", 3)])


def test_the_registry_builds_each_rule_with_its_options():
    spec = SolverSpec("broyden", tol=1e-6)
    assert set(BACKWARDS) == {"ift", "jfb", "phantom", "neumann", "unrolled"}
    for name, cls in BACKWARDS.items():
        rule = make_rule(name, adjoint=spec)
        assert isinstance(rule, cls) and rule.name == name and rule.stats is None
    assert make_rule("ift", adjoint=spec).solver is spec
    assert make_rule("phantom", {"k": 2}, adjoint=spec).options == {"k": 2, "tau": 0.5}
    assert repr(Phantom(k=3, tau=0.25)) == "Phantom(k=3, tau=0.25)"
    with pytest.raises(ValueError, match="unknown on_fail value"):
        IFT(spec, on_fail="quiet")


def test_ift_attach_is_public_and_takes_a_warm_start():
    """IFT.attach on its own: the gradient through z = f(z*) is the adjoint's, and an adjoint0
    that already solves g = Jᵀ g + ∂ℓ/∂z* is accepted after one evaluation."""
    cell, x = cell_and_input()
    z_star, v, fprime, J = exact_pieces(cell, x)
    deq = DEQ(cell, tol=1e-13, max_iter=300)
    exact = torch.linalg.solve(torch.eye(8, dtype=DT) - J.transpose(1, 2), v[..., None])[..., 0]
    for start, most in ((None, 300), (exact, 1)):
        m = deq.fixed_point_map(x)
        rule = IFT(SolverSpec("anderson", tol=1e-12, max_iter=300))
        z = rule.attach(z_star, m.f, adjoint0=start)
        got = torch.autograd.grad(loss_fn(z), x)[0]
        assert rel_err(got, grads_from_adjoint(cell, x, z_star, fprime * exact)[:x.numel()]
                       .reshape(x.shape)) < 1e-9
        assert rule.stats.all_converged and rule.stats.nfe <= most


def test_neumann_series_stats_read_like_forward_iteration_on_the_adjoint():
    g = torch.Generator().manual_seed(0)
    J = 0.5 * torch.randn(3, 4, 4, generator=g, dtype=DT) / 4 ** 0.5
    v = torch.randn(3, 4, generator=g, dtype=DT)
    vjp = lambda y: torch.einsum("bij,bi->bj", J, y)  # noqa: E731
    total, stats = neumann_series(vjp, v, 4)
    terms = [v]
    for _ in range(3):
        terms.append(vjp(terms[-1]))
    assert torch.allclose(total, sum(terms))
    assert stats.nfe == 4 and stats.tol == 0 and not stats.converged.any()
    for j, term in enumerate(terms):
        assert torch.allclose(stats.abs_residuals[j], term.norm(dim=1))
        assert torch.allclose(stats.rel_residuals[j], term.norm(dim=1) / sum(terms[:j + 1]).norm(dim=1))
