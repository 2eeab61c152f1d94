"""The training-loop settings of the published DEQ recipes (locuslab/deq): the learning rate's
linear warm-up, the evaluation depth during the DEQ's warm-up, the random forward cap and γ's
increments; as pure functions of (config, step), in the DEQ (the ``max_iter`` knob, an
injection's context) and in a tiny training run that resumes exactly."""
import importlib
import math
from collections import Counter

import pytest
import torch

from deqlite import DEQ, MLPCell
from deqlite.deq import equilibrium
from deqlite.train import PRESETS, Trainer, TrainConfig, deq_hooks


def cosine(step, total, floor):
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def test_lr_rises_linearly_then_follows_the_cosine_from_step_zero():
    c = TrainConfig(lr=1e-3, lr_min=1e-5, lr_warmup_steps=4)
    got = [deq_hooks.lr_factor(c, k, 10) for k in range(12)]
    floor = 1e-5 / 1e-3
    assert got[:4] == [0.25, 0.25, 0.5, 0.75]          # max(k, 1) / W: locuslab's k / W from step 1
    assert got[4:] == pytest.approx([cosine(k, 10, floor) for k in range(4, 12)], abs=1e-15)
    assert got[10] == got[11] == pytest.approx(floor)   # held at the floor past the end
    constant = TrainConfig(schedule="constant", lr_warmup_steps=3)
    assert [deq_hooks.lr_factor(constant, k, 10) for k in range(6)] == [1 / 3, 1 / 3, 2 / 3, 1, 1, 1]
    plain = TrainConfig()                                # no warm-up: today's cosine
    assert [deq_hooks.lr_factor(plain, k, 8) for k in (0, 4, 8)] == pytest.approx([1, 0.5, 0])


def test_evaluation_in_the_warm_up_unrolls_pretrain_eval_depth():
    c = TrainConfig(pretrain_steps=3, pretrain_depth=2, pretrain_eval_depth=5)
    assert [deq_hooks.warm_up_depth(c, k) for k in (0, 2, 3)] == [2, 2, 0]
    assert [deq_hooks.warm_up_depth(c, k, evaluating=True) for k in (0, 2, 3, 9)] == [5, 5, 0, 0]
    default = TrainConfig(pretrain_steps=3, pretrain_depth=2)
    assert deq_hooks.warm_up_depth(default, 2, evaluating=True) == 2


def test_forward_cap_draws_uniformly_and_repeatably():
    seq = TrainConfig(seed=3, pretrain_steps=10, max_iter_jitter=2)
    assert [deq_hooks.forward_max_iter(seq, k, 12) for k in (0, 9)] == [None, None]   # warm-up
    assert deq_hooks.forward_max_iter(TrainConfig(), 50, 12) is None                    # no jitter
    caps = [deq_hooks.forward_max_iter(seq, k, 12) for k in range(10, 3010)]
    counts = Counter(caps)
    assert set(counts) == {10, 11, 12}                                  # 12 − U{0, 1, 2}
    assert all(850 <= n <= 1150 for n in counts.values()), counts     # uniform: ~1000 each
    assert caps == [deq_hooks.forward_max_iter(seq, k, 12) for k in range(10, 3010)]
    other = TrainConfig(seed=4, pretrain_steps=10, max_iter_jitter=2)
    assert caps[:50] != [deq_hooks.forward_max_iter(other, k, 12) for k in range(10, 60)]
    vision = TrainConfig(pretrain_steps=10, max_iter_jitter=2, max_iter_jitter_rule="vision")
    assert deq_hooks.forward_max_iter(vision, 20, 8) is None            # only on JR steps
    drawn = Counter(deq_hooks.forward_max_iter(vision, k, 8, regularized=True)
                    for k in range(10, 2010))
    assert set(drawn) == {6, 7, 8, 9} and min(drawn.values()) > 400    # 8 + U{−2, ..., 1}
    low = TrainConfig(max_iter_jitter=3)
    assert set(deq_hooks.forward_max_iter(low, k, 2) for k in range(200)) == {1, 2}  # never < 1


def test_jac_weight_increments_as_the_two_published_loops_count_them():
    # DEQ-Sequence, wt103_deq_transformer_reg.sh: γ 1.9, +0.1 at every multiple of 35,000 steps
    # past the 32,000-step warm-up (none in it)
    seq = TrainConfig(jac_reg_weight=1.9, pretrain_steps=32000, pretrain_jac_reg_weight=0.0,
                      jac_reg_increment=0.1, jac_reg_increment_every=35000)
    weight = lambda c, k: deq_hooks.jac_weight(c, k, 10 ** 7)   # noqa: E731
    steps = (31999, 32000, 34999, 35000, 69999, 70000, 105000)
    assert [weight(seq, k) for k in steps] == pytest.approx([0, 1.9, 1.9, 2.0, 2.0, 2.1, 2.2])
    preln = TrainConfig(jac_reg_weight=2.0, pretrain_steps=32000, pretrain_jac_reg_weight=0.0,
                        jac_reg_increment=0.1, jac_reg_increment_every=30000)
    assert [weight(preln, k) for k in (30000, 32000, 59999, 60000)] == pytest.approx([0, 2, 2, 2.1])
    # MDEQ-Vision, cls_mdeq_SMALL_reg.yaml: γ 2.5, +0.1 per 50,000 steps since the warm-up's end
    vision = TrainConfig(jac_reg_weight=2.5, pretrain_steps=510000, pretrain_jac_reg_weight=0.03,
                         jac_reg_increment=0.1, jac_reg_increment_every=50000,
                         jac_reg_increment_rule="vision")
    steps = (509999, 510000, 559999, 560000, 610000)
    assert [weight(vision, k) for k in steps] == pytest.approx([0.03, 2.5, 2.5, 2.6, 2.7])
    stopped = TrainConfig(jac_reg_weight=1.0, jac_reg_increment=0.1, jac_reg_increment_every=2,
                          jac_reg_stop_epoch=1)
    assert [deq_hooks.jac_weight(stopped, k, 10) for k in (0, 2, 9, 10)] == \
        pytest.approx([1.0, 1.1, 1.4, 0.0])


def test_recipe_settings_are_validated():
    for bad in (dict(lr_warmup_steps=-1), dict(max_iter_jitter=-2), dict(pretrain_eval_depth=0),
                dict(jac_reg_increment=-0.1, jac_reg_increment_every=5),
                dict(jac_reg_increment_every=-5, jac_reg_increment=0.1),
                dict(jac_reg_increment=math.inf, jac_reg_increment_every=5)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    for bad in (dict(lr_warmup_steps=2.5), dict(max_iter_jitter=True), dict(pretrain_eval_depth=1.0)):
        with pytest.raises(TypeError):
            TrainConfig(**bad)
    for half in (dict(jac_reg_increment=0.1), dict(jac_reg_increment_every=1000)):
        with pytest.raises(ValueError, match="both or neither"):
            TrainConfig(**half)
    with pytest.raises(ValueError, match="max_iter_jitter_rule"):
        TrainConfig(max_iter_jitter_rule="mdeq")
    with pytest.raises(ValueError, match="jac_reg_increment_rule"):
        TrainConfig(jac_reg_increment_rule="transformer")
    with pytest.raises(KeyError, match="config key"):
        TrainConfig.from_dict(dict(rand_f_thres_delta=2))


class MemoryCell(MLPCell):
    """An MLP cell whose injection also takes a memory (a stand-in for Transformer-XL's)."""

    def inject(self, x, memory=None):
        u = super().inject(x)
        return u if memory is None else u + memory


def test_the_max_iter_knob_caps_the_forward_solve_and_context_reaches_inject():
    torch.manual_seed(0)
    deq = DEQ(MemoryCell(3, 6, weight_scale=0.5), tol=0.0, max_iter=9)
    x = torch.randn(4, 3)
    deq(x)
    assert deq.forward_stats.nfe == 9 and deq.max_iter is None
    with deq.options(max_iter=4):
        assert deq.max_iter == 4
        deq(x)
    assert deq.forward_stats.nfe == 4 and deq.max_iter is None and deq.forward_solver.max_iter == 9
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="max_iter"):
            with deq.options(max_iter=bad):
                pass
    memory = torch.randn(4, 6)
    with torch.no_grad():
        plain, remembered = deq(x), deq(x, memory=memory)
        assert not torch.allclose(plain, remembered)
        f = deq.fixed_point_map(x, memory=memory).f
        assert torch.allclose(f(remembered), remembered, atol=1e-4)   # its equilibrium
    model = torch.nn.Module()
    model.deq = deq
    model.forward = lambda inputs: deq(inputs, memory=memory)
    _, f, z = equilibrium(model, x)
    assert torch.allclose(f(z), z, atol=1e-4) and torch.allclose(z, remembered)


def run_config(tmp_path, **overrides):
    """Digits, an MLP-cell DEQ, tol 0 so that every solve runs to its cap."""
    config = dict(dataset="digits", limit_train=160, limit_test=60, model="deq_classifier",
                  model_options=dict(channels=4, hidden=16,
                                     deq=dict(solver="anderson", tol=0.0, max_iter=6)),
                  epochs=3, max_steps=12, batch_size=32, eval_batch_size=30, lr=4e-3,
                  lr_warmup_steps=5, pretrain_steps=3, pretrain_depth=2, pretrain_eval_depth=5,
                  max_iter_jitter=3, jac_reg_weight=0.5, jac_reg_prob=0.5, jac_reg_increment=0.25,
                  jac_reg_increment_every=4, eval_every=2, eval_jacobian_samples=0,
                  checkpoint_every=3, log_path=str(tmp_path / "run.jsonl"),
                  checkpoint_path=str(tmp_path / "run.pt"))
    config.update(overrides)
    return config


def test_a_run_follows_the_settings_and_resumes_exactly(tmp_path):
    straight = Trainer(run_config(tmp_path / "a"))
    straight.fit(progress=False)
    c, total = straight.config, straight.total_steps
    train = [r for r in straight.history if r["split"] == "train"]
    tests = [r for r in straight.history if r["split"] == "test"]
    assert len(train) == total == 12
    lrs = [r["lr"] for r in train]
    assert lrs[:5] == pytest.approx([4e-3 * f for f in (0.2, 0.2, 0.4, 0.6, 0.8)], rel=1e-12)
    assert lrs[5:] == pytest.approx([4e-3 * cosine(k, total, 0) for k in range(5, 12)], rel=1e-12)
    warm, solved = train[:3], train[3:]
    assert all(r["fwd_cap"] == r["fwd_nfe"] == 2 for r in warm)          # the unrolled depth
    caps = [r["fwd_cap"] for r in solved]
    assert caps == [deq_hooks.forward_max_iter(c, r["step"] - 1, 6) for r in solved]
    assert set(caps) <= {3, 4, 5, 6} and len(set(caps)) >= 3, caps     # 6 − U{0..3}, varying
    assert all(r["fwd_nfe"] <= r["fwd_cap"] for r in solved)
    assert [r["fwd_nfe"] for r in solved] == caps                        # tol 0: the cap binds
    assert [r["jac_weight"] for r in train] == pytest.approx(
        [deq_hooks.jac_weight(c, r["step"] - 1, straight.steps_per_epoch) for r in train])
    assert max(r["jac_weight"] for r in train) == pytest.approx(0.5 + 2 * 0.25)   # at 4, 8
    assert tests[0]["step"] == 2 and tests[0]["fwd_nfe"] == 5           # eval in the warm-up
    assert tests[1]["step"] == 4 and tests[1]["fwd_nfe"] == 6           # eval: the solver's cap

    config = run_config(tmp_path / "b")

    def stop_at_step_7(record):
        if record["split"] == "train" and record["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config).fit(stop_at_step_7, progress=False)
    resumed = Trainer.resume(config["checkpoint_path"])
    assert resumed.step == 7
    resumed.fit(progress=False)
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resume"
    keys = ("step", "loss", "lr", "fwd_cap", "fwd_nfe", "jac_weight", "jac_loss", "grad_norm")
    pick = lambda h: [tuple(r.get(k) for k in keys) for r in h if r["split"] == "train"]  # noqa: E731
    assert pick(resumed.history) == pick(straight.history)


def test_the_vision_rule_jitters_only_regularized_steps(tmp_path):
    trainer = Trainer(run_config(tmp_path, max_steps=8, lr_warmup_steps=0, eval_every=0,
                                 jac_reg_increment=0.0, jac_reg_increment_every=0,
                                 max_iter_jitter=2, max_iter_jitter_rule="vision",
                                 checkpoint_path=None, log_path=None))
    solved = [r for r in trainer.fit(progress=False) if r["split"] == "train"][3:]
    for r in solved:
        if r["jac_loss"] is None:
            assert r["fwd_cap"] == r["fwd_nfe"] == 6
        else:
            assert 4 <= r["fwd_cap"] <= 7 and r["fwd_nfe"] == r["fwd_cap"]
    assert any(r["jac_loss"] is not None for r in solved)


def test_no_preset_keeps_a_list_of_settings_it_cannot_express():
    for name in PRESETS:
        module = importlib.import_module(f"deqlite.train.configs.{name}")
        assert not hasattr(module, "WANTS"), f"{name} still has WANTS: {sorted(module.WANTS)}"


def test_every_preset_says_what_it_follows_and_what_it_aims_for():
    """A preset's docstring names the published run it follows (or says it follows none) and what
    it aims for."""
    for name in PRESETS:
        doc = importlib.import_module(f"deqlite.train.configs.{name}").__doc__ or ""
        assert "Follows" in doc and "Aims for" in doc, name
