"""DEQ: the IFT gradient against long unrolled autograd and gradcheck (float64), stats, errors,
the knobs of options(), solver specs, looking inside a model."""
import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
from conftest import DT
from torch import nn

from deqlite import DEQ, SOLVERS, DEQConvergenceError, DEQConvergenceWarning, MLPCell, SolverSpec
from deqlite.deq import equilibrium, find_deq

NAMES = list(SOLVERS)


def small_cell(d_in=5, d=8, scale=0.8, seed=0):
    torch.manual_seed(seed)
    return MLPCell(d_in, d, weight_scale=scale).double()


def loss_fn(z):
    return (z ** 2).sum() * z.sum() + z[:, 0].sin().sum()   # mixes samples and coordinates


def unrolled_reference(cell, x, n_iter=1500):
    """Plain autograd through n_iter explicit iterations z ← f(z, x) from z = 0."""
    injection = cell.inject(x)
    z = torch.zeros_like(injection)
    for _ in range(n_iter):
        z = cell(z, injection)
    return z


def grads(loss, cell, x):
    return torch.autograd.grad(loss, [x, *cell.parameters()])


@pytest.mark.parametrize("backward_solver", NAMES)
def test_ift_gradient_equals_autograd_through_1500_unrolled_iterations(backward_solver):
    cell = small_cell()
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    deq = DEQ(cell, solver="anderson", tol=1e-13, max_iter=300,
              backward_solver=backward_solver, backward_tol=1e-13, backward_max_iter=2000)
    got = grads(loss_fn(deq(x)), cell, x)
    ref = grads(loss_fn(unrolled_reference(cell, x)), cell, x)
    assert deq.backward_stats is not None and deq.backward_stats.solver == backward_solver
    for g, r, name in zip(got, ref, ["x", "W", "U", "b"]):
        rel = ((g - r).norm() / r.norm()).item()
        assert rel < 1e-9, f"gradient wrt {name}: relative error {rel:.2e}"


@pytest.mark.parametrize("solver", NAMES)
def test_gradcheck_float64(solver):
    cell = small_cell(d_in=3, d=4)
    deq = DEQ(cell, solver=solver, tol=1e-13, max_iter=500)
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: deq(x), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_with_respect_to_the_weights():
    cell = small_cell(d_in=3, d=4)
    deq = DEQ(cell, solver="broyden", tol=1e-13, max_iter=500)
    x = torch.randn(2, 3, dtype=DT)
    W0 = cell.W.weight.detach().clone().requires_grad_()

    def f(W):   # the DEQ's output as a function of its recurrent weight W
        return torch.func.functional_call(deq, {"cell.W.weight": W}, (x,))

    assert torch.autograd.gradcheck(f, (W0,), eps=1e-6, atol=1e-7)


def test_unrolled_backward_agrees_with_ift():
    cell = small_cell()
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    ift = DEQ(cell, solver="anderson", tol=1e-13, max_iter=300)
    unrolled = DEQ(cell, solver="anderson", tol=1e-13, max_iter=300, backward="unrolled")
    g_ift = grads(loss_fn(ift(x)), cell, x)
    g_unr = grads(loss_fn(unrolled(x)), cell, x)
    assert unrolled.backward_stats is None     # no adjoint solve when unrolling
    for a, b in zip(g_ift, g_unr):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_stats_of_both_solves_are_kept():
    cell = small_cell()
    deq = DEQ(cell, solver="broyden", backward_solver="forward_iteration", tol=1e-8, max_iter=300)
    x = torch.randn(6, 5, dtype=DT, requires_grad=True)
    z = deq(x)
    assert deq.forward_stats.solver == "broyden" and deq.forward_stats.converged.shape == (6,)
    assert deq.backward_stats is None
    loss_fn(z).backward()
    assert deq.backward_stats.solver == "forward_iteration" and deq.backward_stats.all_converged
    assert deq.backward_stats.nfe == len(deq.backward_stats.abs_residuals)


def test_no_graph_without_grad_and_warm_start():
    cell = small_cell()
    deq = DEQ(cell, tol=1e-10, max_iter=200)
    x = torch.randn(3, 5, dtype=DT)
    with torch.no_grad():
        z_star = deq(x)
    assert not z_star.requires_grad
    cold = deq.forward_stats.nfe
    with torch.no_grad():
        deq(x, z0=z_star)
    assert deq.forward_stats.nfe < cold


def test_divergent_cell_warns_with_trace_and_advice():
    torch.manual_seed(3)
    cell = MLPCell(4, 16, weight_scale=4.0)
    deq = DEQ(cell, solver="forward_iteration", max_iter=40)
    with pytest.warns(DEQConvergenceWarning, match="(?s)did not converge.*trace.*damping"):
        deq(torch.randn(8, 4) * 3)
    deq_raise = DEQ(cell, solver="forward_iteration", max_iter=40, on_fail="raise")
    with pytest.raises(DEQConvergenceError):
        deq_raise(torch.randn(8, 4) * 3)
    quiet = DEQ(cell, solver="forward_iteration", max_iter=40, on_fail="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(torch.randn(8, 4) * 3)


def test_unconverged_backward_solve_warns():
    cell = small_cell(scale=0.99)
    deq = DEQ(cell, tol=1e-10, max_iter=300, backward_solver="forward_iteration",
              backward_tol=1e-14, backward_max_iter=2)
    z = deq(torch.randn(3, 5, dtype=DT, requires_grad=True))
    with pytest.warns(DEQConvergenceWarning, match="backward"):
        loss_fn(z).backward()


def test_bad_inputs_and_options():
    cell = MLPCell(5, 8)
    deq = DEQ(cell)
    with pytest.raises(TypeError, match="floating-point"):
        deq(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN/inf"):
        deq(torch.full((2, 5), float("inf")))
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, 5\)"):
        deq(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown backward rule 'implicit'"):
        DEQ(cell, backward="implicit")
    with pytest.raises(TypeError, match="unknown option 'bta'.*Did you mean 'beta'"):
        DEQ(cell, solver_options={"bta": 0.5})
    with pytest.raises(TypeError, match="unknown option 'm'"):
        DEQ(cell, backward_solver="broyden", backward_solver_options={"m": 3})
    with pytest.raises(TypeError, match="pass 'tol' as its own argument"):
        DEQ(cell, solver_options={"tol": 1e-3})
    with pytest.raises(ValueError, match="unknown on_fail value"):
        DEQ(cell, on_fail="silent")
    with pytest.raises(TypeError, match="no inject"):
        DEQ(nn.Linear(3, 3))


def test_forward_solver_options_are_used():
    cell = small_cell()
    x = torch.randn(4, 5, dtype=DT)
    nfe = {}
    for m in (1, 6):
        deq = DEQ(cell, solver="anderson", solver_options={"m": m}, tol=1e-10, max_iter=500)
        with torch.no_grad():
            deq(x)
        nfe[m] = deq.forward_stats.nfe
    assert nfe[6] < nfe[1]


def test_pretraining_unrolls_the_cell_exactly_k_times():
    cell = small_cell()
    deq = DEQ(cell, tol=1e-10)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    with deq.options(pretrain_steps=4):
        z = deq(x)
    assert deq.forward_stats is None and z.requires_grad
    inj = cell.inject(x)
    ref = torch.zeros_like(inj)
    for _ in range(4):
        ref = cell(ref, inj)
    assert torch.allclose(z, ref)
    g, r = torch.autograd.grad(loss_fn(z), x)[0], torch.autograd.grad(loss_fn(ref), x)[0]
    assert torch.allclose(g, r)
    deq(x)                                                   # outside the block: a solve again
    assert deq.forward_stats.nfe > 4 and deq.forward_stats.all_converged


class TwoScaleCell(torch.nn.Module):
    """A toy cell whose state is a list [(batch, 4), (batch, 2, 3)], coupled both ways."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Linear(4 + 6, 4 + 6, dtype=torch.float64)
        with torch.no_grad():
            self.A.weight.mul_(0.6 / torch.linalg.matrix_norm(self.A.weight, ord=2))
        self.U = torch.nn.Linear(3, 10, dtype=torch.float64)

    def inject(self, x):
        return [self.U(x)[:, :4], self.U(x)[:, 4:].reshape(-1, 2, 3)]

    def init_state(self, injection):
        return [torch.zeros_like(t) for t in injection]

    def forward(self, z, injection):
        flat = torch.cat([z[0], z[1].flatten(1)], 1)
        inj = torch.cat([injection[0], injection[1].flatten(1)], 1)
        out = torch.tanh(self.A(flat) + inj)
        return [out[:, :4], out[:, 4:].reshape(-1, 2, 3)]


def test_list_state_deq_ift_gradient_matches_unrolled():
    torch.manual_seed(0)
    cell = TwoScaleCell()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    grads = {}
    for rule in ("ift", "unrolled"):
        deq = DEQ(cell, tol=1e-12, max_iter=300, backward=rule, solver="forward_iteration")
        small, big = deq(x)
        assert small.shape == (5, 4) and big.shape == (5, 2, 3)
        loss = (small ** 2).sum() + (big * torch.arange(6.0, dtype=torch.float64).view(2, 3)).sum()
        grads[rule] = torch.autograd.grad(loss, [x, cell.A.weight])
    for a, b in zip(grads["ift"], grads["unrolled"]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    with deq.options(jac_probes=2):
        deq(x)
    assert deq.jac_loss is not None and deq.jac_loss.requires_grad


def test_options_set_the_knobs_for_a_block_and_restore_them_even_after_an_error():
    deq = DEQ(small_cell(), tol=1e-8)
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    with deq.options(pretrain_steps=3, jac_probes=1, jac_probe_kind="rademacher") as same:
        assert same is deq and (deq.pretrain_steps, deq.jac_probes) == (3, 1)
        deq(x)
        assert deq.jac_loss is not None and deq.forward_stats is None
    assert (deq.pretrain_steps, deq.jac_probes, deq.jac_probe_kind) == (0, 0, "gaussian")
    with pytest.raises(RuntimeError, match="boom"):
        with deq.options(pretrain_steps=2):
            raise RuntimeError("boom")
    assert deq.pretrain_steps == 0
    deq(x)
    assert deq.jac_loss is None and deq.forward_stats.all_converged


def test_options_are_validated_and_the_knobs_are_not_set_from_outside():
    deq = DEQ(small_cell())
    with pytest.raises(TypeError, match="unknown option 'jac_probe'.*Did you mean 'jac_probes'"):
        with deq.options(jac_probe=1):
            pass
    with pytest.raises(ValueError, match="pretrain_steps must lie in"):
        with deq.options(pretrain_steps=-1):
            pass
    with pytest.raises(ValueError, match="unknown probe kind 'gauss'"):
        with deq.options(jac_probe_kind="gauss"):
            pass
    with pytest.raises(AttributeError, match=r"with deq.options\(jac_probes=2\)"):
        deq.jac_probes = 2
    assert deq.jac_probes == 0


def test_solver_specs_are_validated_frozen_and_replaceable():
    spec = SolverSpec("anderson", tol=1e-6, max_iter=20, options={"m": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tol = 1e-3
    with pytest.raises(TypeError):
        spec.options["m"] = 4                                  # read-only
    tighter = dataclasses.replace(spec, tol=1e-9)
    assert tighter.tol == 1e-9 and tighter.options == {"m": 3} and spec.tol == 1e-6
    with pytest.raises(ValueError, match="tol must lie in"):
        dataclasses.replace(spec, tol=-1.0)
    with pytest.raises(TypeError, match="unknown option 'mm'.*Did you mean 'm'"):
        SolverSpec("anderson", options={"mm": 3})
    W = torch.eye(4, dtype=DT) * 0.5
    z, stats = spec(lambda z: z @ W.T + 1, torch.zeros(2, 4, dtype=DT))
    assert torch.allclose(z, torch.full((2, 4), 2.0, dtype=DT)) and stats.solver == "anderson"
    assert copy.deepcopy(spec) == spec == pickle.loads(pickle.dumps(spec))
    deq = DEQ(small_cell(), solver="broyden", tol=1e-5, backward_solver="forward_iteration")
    twin = copy.deepcopy(deq)                                  # notebooks copy whole models
    assert twin.forward_solver == deq.forward_solver and twin.gradient.solver == deq.backward_solver
    assert deq.forward_solver == SolverSpec("broyden", tol=1e-5)
    assert deq.backward_solver.name == "forward_iteration" and deq.backward_solver.tol == 1e-5
    assert "broyden(tol=1e-05" in repr(deq)


def test_equilibrium_finds_the_deq_inside_a_model_and_its_map():
    model = nn.Sequential(nn.Linear(3, 5).double(), DEQ(small_cell(), tol=1e-12, max_iter=300))
    x = torch.randn(4, 3, dtype=DT)
    deq, f, z = equilibrium(model, x)
    assert deq is find_deq(model) is model[1]
    assert z.shape == (4, 8) and torch.allclose(f(z), z, atol=1e-10)
    with pytest.raises(ValueError, match="holds 2 DEQ modules"):
        find_deq(nn.Sequential(model, DEQ(small_cell())))


# --- errors that name their cause (nothing lost, nothing silent) ---------------------------------

def test_mismatched_dtypes_name_x_z0_and_the_cell_and_say_how_to_cast():
    deq = DEQ(MLPCell(3, 4))                                   # float32 parameters
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the cell's parameters have "
                                        r"dtype torch.float32.*model.double\(\).*x.float\(\)"):
        deq(torch.randn(2, 3, dtype=DT))
    with pytest.raises(TypeError, match=r"z0 has dtype torch.float64.*z0.float\(\)"):
        deq(torch.randn(2, 3), z0=torch.zeros(2, 4, dtype=DT))
    cell = TwoScaleCell()                                      # float64, a list state
    with pytest.raises(TypeError, match=r"z0\[1\] has dtype torch.float32.*z0.double\(\)"):
        DEQ(cell)(torch.randn(2, 3, dtype=DT), z0=[torch.zeros(2, 4, dtype=DT), torch.zeros(2, 2, 3)])
    with torch.autocast("cpu", dtype=torch.bfloat16):          # autocast mixes dtypes on purpose
        DEQ(MLPCell(3, 4), max_iter=3, on_fail="ignore")(torch.randn(2, 3, dtype=torch.bfloat16))


class ReturnsCell(MLPCell):
    """An MLPCell whose forward returns what `make(z)` makes of the state."""

    def __init__(self, make):
        super().__init__(3, 4)
        self.make = make

    def forward(self, z, injection):
        return self.make(super().forward(z, injection))


@pytest.mark.parametrize("make,error,match", [
    (lambda z: z[:, :2], ValueError, r"returned a tensor of shape \(2, 2\); it must return a state "
                                     r"of the same shape and structure as z: a tensor of shape \(2, 4\)"),
    (lambda z: z[:1], ValueError, r"returned a tensor of shape \(1, 4\)"),
    (lambda z: None, TypeError, r"returned None.*without `return`"),
    (lambda z: (z, z.sum()), ValueError, r"returned a tuple of 2: \(2, 4\), \(\).*new state only"),
    (lambda z: {"z": z}, TypeError, r"returned a dict"),
], ids=["shape", "batch", "none", "tuple", "dict"])
def test_a_cell_returning_no_state_like_z_is_named(make, error, match):
    with pytest.raises(error, match=r"the cell's forward\(z, injection\) \(ReturnsCell\) " + match):
        DEQ(ReturnsCell(make))(torch.randn(2, 3))


def test_a_list_state_of_the_wrong_shapes_names_the_branch():
    from deqlite.cells import MultiscaleCell
    cell = MultiscaleCell(2, [4, 8], groups=2, expansion=1).eval()
    deq, x = DEQ(cell, max_iter=2, on_fail="ignore"), torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"branch 1 of z0, z0\[1\], has shape \(2, 8, 3, 3\) where "
                                         r"\(2, 8, 4, 4\) is expected.*init_state"):
        deq(x, z0=[torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 3, 3)])
    with pytest.raises(ValueError, match=r"branch 0 of z0.*\(2, 8, 4, 4\) where \(2, 4, 8, 8\).*"
                                         r"another order"):
        deq(x, z0=[torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 8, 8)])
    with pytest.raises(ValueError, match=r"z0 is a list of 1: \(2, 4, 8, 8\); the cell's state for "
                                         r"this x has shapes \[\(2, 4, 8, 8\), \(2, 8, 4, 4\)\]"):
        deq(x, z0=[torch.zeros(2, 4, 8, 8)])
    with pytest.raises(ValueError, match=r"z0 is a tensor of shape \(3, 4\); the cell's state for "
                                         r"this x has shape \(2, 4\)"):
        DEQ(MLPCell(5, 4))(torch.randn(2, 5), z0=torch.zeros(3, 4))
    deq(x, z0=cell.init_state(cell.inject(x)))                 # the right shapes pass


def test_nan_weights_are_named_not_blamed_on_the_input():
    deq = DEQ(MLPCell(3, 4))
    with torch.no_grad():
        deq.cell.U.weight[0, 0] = float("nan")                 # e.g. a corrupt checkpoint
    with pytest.raises(ValueError, match=r"x is finite but the cell's inject\(x\) is not: the "
                                         r"cell's parameters contain NaN/inf, in U.weight "
                                         r"\(1 of 12 values\).*checkpoint"):
        deq(torch.randn(2, 3))
    deq = DEQ(MLPCell(3, 4), on_fail="ignore")
    with torch.no_grad():
        deq.cell.W.weight[1] = float("inf")                    # not in the injection: in the solve
    with pytest.raises(ValueError, match=r"forward solve went NaN/inf.*W.weight \(4 of 16"):
        deq(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x, the DEQ's input, contains 2 NaN/inf value\(s\) \(in "
                                         r"sample\(s\) 1\).*layers before the DEQ"):
        deq(torch.tensor([[0.0, 1, 2], [float("nan"), 1, float("inf")]]))
    deq = DEQ(MLPCell(3, 4))
    with torch.no_grad():
        deq.cell.U.weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"inject\(x\) is not, though the cell's parameters are: an "
                                         r"overflow \(\|x\| is up to 2e\+38"):
        deq(torch.full((1, 3), 2e38))                           # 3 · 2e38 > float32's largest


def test_torch_compile_of_the_whole_deq_says_to_compile_the_cell():
    dynamo = pytest.importorskip("torch._dynamo")
    deq = DEQ(small_cell(d_in=3, d=4), tol=1e-10, max_iter=100)
    x = torch.randn(2, 3, dtype=DT)
    dynamo.reset()
    with pytest.raises(Exception, match=r"(?s)compile the cell instead.*torch.compile\(cell\)"):
        torch.compile(deq, fullgraph=True)(x)
    compiled = DEQ(torch.compile(deq.cell, backend="eager"), tol=1e-10, max_iter=100)
    x.requires_grad_()
    for model in (compiled, torch.compile(nn.Sequential(deq), backend="eager")):
        z = model(x)                                           # the same z* and gradient as eager
        torch.testing.assert_close(z, deq(x))
        torch.testing.assert_close(torch.autograd.grad(loss_fn(z), x)[0],
                                   torch.autograd.grad(loss_fn(deq(x)), x)[0])
    dynamo.reset()
