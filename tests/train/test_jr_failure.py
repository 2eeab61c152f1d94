"""The failure Jacobian regularization cures, on a short run of notebook 05's setting
(``stdlib_chars_jr``, a tiny character-level DEQ-Transformer): trained without JR, the model's
fixed-point problem gets harder as it learns, the solver's forward NFE climbing from about 9 to
its cap of 30 and ρ(J) at z* crossing 1 (the map expands there); with JR (γ on ‖J_f(z*)‖²_F / d)
the same model trained on the same batches keeps its solves short and ρ(J) below 1. This is the
paper's motivating observation (Bai, Koltun, Kolter, ICML 2021) at CPU size, in 120 steps.

The signal is the training forward NFE, averaged over the first and over the last 20 steps: each
step solves one batch, so the mean over steps is steadier than a test evaluation's NFE (a test
batch counts the iterations of its slowest window). Seed 1 is used because its drift is the
largest of seeds 0-2 (after 200 steps without JR, a last-20 mean of 24.4 against 11.4 and 17.1:
benchmarks/README.md); here it reaches the cap by step ~100.

The preset has no warm-up, so both runs start from the same model and the same first batch: the
first training step's loss and NFE are a control (identical in both), and everything that differs
later is the regularizer's doing. Run with γ = 0 in the JR arm, the comparisons below fail.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from deqlite.train import Trainer, load_preset

PRESET = "stdlib_chars_jr"
SHORT = dict(max_steps=120, eval_every=60, seed=1)   # evaluations at steps 60 and 120
WINDOW = 20                                          # training steps averaged at each end


def run(jac_reg_weight: float) -> dict:
    """A short run with γ = jac_reg_weight on one thread: its training and its test records."""
    config = {**load_preset(PRESET), **SHORT, "jac_reg_weight": jac_reg_weight}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = Trainer(config).fit(progress=False)
    finally:
        torch.set_num_threads(threads)
    return dict(train=[r for r in history if r.get("split") == "train"],
                test=[r for r in history if r.get("split") == "test"])


def mean_nfe(records: list[dict]) -> float:
    return statistics.mean(r["fwd_nfe"] for r in records)


@pytest.fixture(scope="module")
def runs() -> dict:
    return {"plain": run(0.0), "jr": run(load_preset(PRESET)["jac_reg_weight"])}


def test_both_runs_start_from_the_same_model(runs):
    first_plain, first_jr = runs["plain"]["train"][0], runs["jr"]["train"][0]
    assert first_plain["loss"] == first_jr["loss"]       # same weights, same batch: bit for bit
    assert first_plain["fwd_nfe"] == first_jr["fwd_nfe"]
    assert len(runs["plain"]["train"]) == len(runs["jr"]["train"]) == SHORT["max_steps"]


def test_without_jr_the_solves_grow_and_with_jr_they_stay_short(runs):
    plain, jr = runs["plain"]["train"], runs["jr"]["train"]
    cap = load_preset(PRESET)["model_options"]["deq"]["max_iter"]
    plain_first, plain_last = mean_nfe(plain[:WINDOW]), mean_nfe(plain[-WINDOW:])
    jr_first, jr_last = mean_nfe(jr[:WINDOW]), mean_nfe(jr[-WINDOW:])
    assert plain_last >= 2 * plain_first                 # harder to solve as it trains
    assert max(r["fwd_nfe"] for r in plain[-WINDOW:]) == cap   # up to the cap
    assert plain_last >= 2 * jr_last                     # JR holds it
    assert jr_last < jr_first                            # and even eases it


def test_without_jr_the_map_expands_at_its_fixed_point_and_with_jr_it_contracts(runs):
    plain, jr = runs["plain"]["test"][-1], runs["jr"]["test"][-1]
    assert plain["step"] == jr["step"] == SHORT["max_steps"]
    assert jr["spectral_radius_max"] < 1 < plain["spectral_radius_max"]
