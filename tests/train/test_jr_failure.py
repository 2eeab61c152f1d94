"""The failure Jacobian regularization cures, on a short run of notebook 05's setting
(``digits_mdeq_jr``): the unrolled warm-up leaves an MDEQ whose map expands at its output, so the
first solves after it do not converge; training on without JR keeps them failing, with JR
(γ on ‖J_f(z*)‖²_F / d) the solves converge and ρ(J) at z* falls.

JR is off during the warm-up, so both runs are the same model up to the switch to solving: the
first evaluation after it is a control (identical in both), and everything that differs later is
the regularizer's doing. Run with JR switched off in the JR arm, the comparisons below fail.
"""
from __future__ import annotations

import pytest
import torch

from deqlite.train import Trainer, load_preset

SHORT = dict(limit_train=640, epochs=3, pretrain_steps=12, eval_every=12, limit_test=120,
             eval_jacobian_samples=32, seed=1)   # 10 steps an epoch: warm-up 12, then 18 solving


def solve_evals(jac_reg_weight: float) -> list[dict]:
    """The test records after the warm-up of a short run with γ = jac_reg_weight."""
    config = {**load_preset("digits_mdeq_jr"), **SHORT, "jac_reg_weight": jac_reg_weight}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = Trainer(config).fit(progress=False)
    finally:
        torch.set_num_threads(threads)
    return [r for r in history if r["split"] == "test" and r["step"] >= SHORT["pretrain_steps"]]


@pytest.fixture(scope="module")
def runs() -> dict:
    return {"plain": solve_evals(0.0), "jr": solve_evals(load_preset("digits_mdeq_jr")["jac_reg_weight"])}


def test_both_runs_start_from_the_same_failing_solve(runs):
    first_plain, first_jr = runs["plain"][0], runs["jr"][0]
    for key in ("fwd_nfe", "converged", "spectral_radius_max", "acc"):
        assert first_plain[key] == pytest.approx(first_jr[key])
    cap = load_preset("digits_mdeq_jr")["model_options"]["deq"]["max_iter"]
    assert first_plain["fwd_nfe"] == cap                 # the first solves hit the cap
    assert first_plain["converged"] < 0.5


def test_without_jr_the_solves_get_worse_and_with_jr_they_converge(runs):
    first, plain, jr = runs["plain"][0], runs["plain"][-1], runs["jr"][-1]
    assert plain["spectral_radius_max"] > first["spectral_radius_max"]   # harder as it trains
    assert plain["converged"] <= first["converged"]                       # and no recovery
    assert jr["converged"] > plain["converged"] + 0.5
    assert jr["spectral_radius_max"] < 1 < plain["spectral_radius_max"]
    assert jr["fwd_nfe"] < plain["fwd_nfe"]
