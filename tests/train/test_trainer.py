"""Training loop: it learns, logs, checkpoints atomically and resumes to the identical result, for
images and (with a tiny stand-in language model defined here) for text."""
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import torchrun_process, write_image_tree

from deqlite import DEQ, spectral_rescale_
from deqlite.models import MODELS
from deqlite.train import PRESETS, Trainer, TrainConfig, deq_hooks, load_preset, read_log
from deqlite.train import __main__ as cli
from deqlite.train.configs import merge, parse_overrides


def tiny_config(tmp_path, **overrides):
    config = dict(dataset="mnist5k", limit_train=640, limit_test=300, model="deq_classifier",
                  model_options=dict(channels=8, hidden=64,
                                     deq=dict(solver="anderson", tol=1e-4, max_iter=40,
                                              on_fail="ignore")),
                  epochs=2, batch_size=32, lr=3e-3, pretrain_steps=3, pretrain_depth=3,
                  log_path=str(tmp_path / "run.jsonl"), checkpoint_path=str(tmp_path / "run.pt"))
    config.update(overrides)
    return config


def test_it_learns_and_logs_every_metric(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3))
    history = trainer.fit(progress=False)
    train_recs = [r for r in history if r["split"] == "train"]
    tests = [r for r in history if r["split"] == "test"]
    assert len(train_recs) == trainer.total_steps == 3 * 20 and len(tests) == 3
    assert tests[-1]["acc"] > 0.7 and tests[-1]["loss"] < tests[0]["loss"]
    first, last = train_recs[0], train_recs[-1]
    assert first["pretrain"] and first["fwd_nfe"] == 3 and first["bwd_nfe"] is None
    for key in ("loss", "acc", "fwd_nfe", "bwd_nfe", "residual", "samples_per_s", "lr"):
        assert last[key] is not None, key
    assert not last["pretrain"] and last["bwd_nfe"] >= 1
    log = read_log(tmp_path / "run.jsonl")
    assert log[-1]["event"] == "done" and len(log) == len(history) + 1


@pytest.mark.parametrize("crash, resumed_at", [(KeyboardInterrupt, 27), (RuntimeError, 25)],
                         ids=["ctrl-c saves a checkpoint", "hard crash: last periodic checkpoint"])
def test_resume_after_interruption_ends_exactly_like_an_uninterrupted_run(tmp_path, crash, resumed_at):
    straight = Trainer(tiny_config(tmp_path / "a"))
    straight.fit(progress=False)

    config = tiny_config(tmp_path / "b", checkpoint_every=5)
    interrupted = Trainer(config)

    def stop_at_step_27(record):
        if record["split"] == "train" and record["step"] == 27:
            raise crash

    with pytest.raises(crash):
        interrupted.fit(stop_at_step_27, progress=False)
    resumed = Trainer.resume(config["checkpoint_path"])
    assert resumed.step == resumed_at
    resumed.fit(progress=False)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    losses = lambda h: [r["loss"] for r in h if r["split"] == "train"]  # noqa: E731
    assert losses(resumed.history) == losses(straight.history)
    steps = [r["step"] for r in read_log(config["log_path"]) if r.get("split") == "train"]
    assert steps == list(range(1, straight.total_steps + 1)), "log lost or duplicated steps"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, epochs=1))
    trainer.save_checkpoint()
    good = (tmp_path / "run.pt").read_bytes()
    real_save = torch.save

    def crash_midway(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    trainer.step = 99
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "run.pt").read_bytes() == good
    assert [p.name for p in tmp_path.glob("run.pt*")] == ["run.pt"]   # no temporary file left
    assert Trainer.resume(str(tmp_path / "run.pt")).step == 0


def test_config_errors():
    with pytest.raises(KeyError, match="unknown config key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(KeyError, match="Did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="unknown optimizer 'adan'"):
        TrainConfig(optimizer="adan")
    with pytest.raises(TypeError, match="unknown option 'hiden'"):
        Trainer(dict(dataset="digits", model_options={"hiden": 3}))
    with pytest.raises(ValueError, match="unknown config preset"):
        load_preset("mnits")
    assert "mnist" in PRESETS and TrainConfig.from_dict(load_preset("mnist")).dataset == "mnist5k"
    for name in PRESETS:                                   # every preset is a valid config
        TrainConfig.from_dict(load_preset(name))
    assert load_preset("mnist_jr")["jac_reg_weight"] > 0
    tuned = load_preset("mnist", ["epochs=2", "model_options.hidden=8", "optimizer=sgd",
                                  'model_options.deq={"tol": 0.01}'])
    assert (tuned["epochs"], tuned["optimizer"], tuned["model_options"]["hidden"]) == (2, "sgd", 8)
    deq = tuned["model_options"]["deq"]                # a dict value merges into the preset's
    assert deq["tol"] == 0.01 and deq["solver"] == "anderson" and tuned["model_options"]["channels"] == 16
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_preset("mnist", ["epochs"])


def test_command_line_runs_a_preset_with_overrides(tmp_path, capsys):
    log = tmp_path / "cli.jsonl"
    cli.main(["--config", "mnist", "--set", "dataset=digits", "--set", "epochs=1",
                "--set", "model_options.channels=4", "--set", "model_options.hidden=16",
                "--set", "pretrain_steps=0", "--log", str(log), "--checkpoint", str(tmp_path / "c.pt")])
    out = capsys.readouterr().out
    assert "test accuracy" in out
    records = read_log(log)
    assert records[-1]["event"] == "done" and (tmp_path / "c.pt").exists()
    with pytest.raises(SystemExit):
        cli.main(["--config", "mnist", "--set", "epochs"])


def test_jacobian_regularization_in_training(tmp_path):
    config = tiny_config(tmp_path, epochs=1, pretrain_steps=0, eval_jacobian_samples=50,
                         jac_reg_weight=5.0, jac_reg_prob=0.5, jac_reg_ramp_steps=10, jac_reg_probes=2)
    history = Trainer(config).fit(progress=False)
    train_recs = [r for r in history if r["split"] == "train"]
    applied = [r["jac_loss"] is not None for r in train_recs]
    assert 3 <= sum(applied) <= len(applied) - 3                      # p = 0.5: some, not all
    weights = [r["jac_weight"] for r in train_recs]
    assert weights[:10] == pytest.approx([5.0 * (k + 1) / 10 for k in range(10)])   # the ramp
    assert weights[10:] == pytest.approx([5.0] * (len(weights) - 10))
    test = [r for r in history if r["split"] == "test"][-1]
    assert 0 < test["spectral_radius"] <= test["spectral_radius_max"] and test["jac_frobenius"] > 0
    # the same run again: the same steps are regularized (draws seeded by step, so resume agrees)
    again = Trainer(dict(config, log_path=None, checkpoint_path=None)).fit(progress=False)
    assert [r["jac_loss"] is not None for r in again if r["split"] == "train"] == applied


def test_jacobian_regularization_lowers_the_jacobian(tmp_path):
    def final(gamma):
        config = tiny_config(tmp_path / str(gamma), epochs=1, pretrain_steps=0,
                             eval_jacobian_samples=100, jac_reg_weight=gamma,
                             log_path=None, checkpoint_path=None)
        trainer = Trainer(config)
        return [r for r in trainer.fit(progress=False) if r["split"] == "test"][-1]

    plain, regularized = final(0.0), final(10.0)
    assert plain.get("jac_frobenius") and regularized["jac_frobenius"] < 0.7 * plain["jac_frobenius"]
    assert regularized["spectral_radius"] < plain["spectral_radius"]


def test_jacobian_regularization_config_errors():
    with pytest.raises(ValueError, match="jac_reg_prob must lie in"):
        TrainConfig(jac_reg_prob=1.5)
    with pytest.raises(ValueError, match="jac_reg_weight"):
        TrainConfig(jac_reg_weight=-1.0)
    with pytest.raises(KeyError, match="Did you mean 'jac_reg_weight'"):
        TrainConfig.from_dict({"jac_reg_weigth": 1.0})


def interrupted_and_resumed(config, stop_at, **resume_overrides):
    """A run stopped by Ctrl-C after step `stop_at` (a checkpoint is saved), then resumed."""
    def stop(record):
        if record["split"] == "train" and record["step"] == stop_at:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).fit(stop, progress=False)
    resumed = Trainer.resume(config["checkpoint_path"], **resume_overrides)
    assert resumed.step == stop_at
    resumed.fit(progress=False)
    return resumed


def assert_same_run(a, b, log_path):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    losses = lambda h: [r["loss"] for r in h if r["split"] == "train"]  # noqa: E731
    assert losses(a.history) == losses(b.history)
    steps = [r["step"] for r in read_log(log_path) if r.get("split") == "train"]
    assert steps == list(range(1, a.total_steps + 1)), "log lost or duplicated steps"


def test_image_folders_stream_and_resume_exactly_mid_epoch_with_other_workers(tmp_path):
    """ImageNet's layout read from disk with random crops: a run resumed in the middle of an epoch,
    with 2 loader workers instead of none, sees the same crops and ends identically."""
    root = write_image_tree(tmp_path / "data")                           # 3 classes × 4 train images
    config = dict(dataset="imagenet", data_root=str(root), augment=True, model="deq_classifier",
                  model_options=dict(channels=2, hidden=8, deq=dict(solver="anderson", tol=1e-3,
                                                                    max_iter=20, on_fail="ignore")),
                  epochs=2, batch_size=4, lr=3e-3, eval_jacobian_samples=2, eval_batch_size=4)
    straight = Trainer(dict(config, log_path=str(tmp_path / "a.jsonl")))
    assert straight.model.head.out_features == 3 and straight.steps_per_epoch == 3
    straight.fit(progress=False)
    config.update(log_path=str(tmp_path / "b.jsonl"), checkpoint_path=str(tmp_path / "b.pt"))
    resumed = interrupted_and_resumed(config, 4, num_workers=2)
    assert resumed.config.num_workers == 2
    assert_same_run(straight, resumed, config["log_path"])
    test = [r for r in resumed.history if r["split"] == "test"][-1]
    assert 0 <= test["acc"] <= 1 and test["spectral_radius"] > 0


def test_vision_options_train_and_resume_exactly(tmp_path, cifar_root):
    """CIFAR-10's augmentation, normalization, SGD with Nesterov momentum, a cosine schedule down to
    lr_min, gradient clipping, fp16 autocast with its gradient scaler and channels-last together:
    resuming restores all of their state."""
    config = dict(dataset="cifar10", data_root=str(cifar_root), augment=True,
                  normalize=[[0.49, 0.48, 0.45], [0.25, 0.24, 0.26]], model="deq_classifier",
                  model_options=dict(channels=4, hidden=16, deq=dict(solver="anderson", tol=1e-3,
                                                                     max_iter=20, on_fail="ignore")),
                  epochs=2, batch_size=8, optimizer="sgd", lr=0.05, lr_min=0.01,
                  optimizer_options=dict(momentum=0.9, nesterov=True), grad_clip=1.0, amp="fp16",
                  channels_last=True, pretrain_steps=2, pretrain_depth=3, eval_jacobian_samples=4)
    straight = Trainer(dict(config, log_path=str(tmp_path / "a.jsonl")))
    history = straight.fit(progress=False)
    trains = [r for r in history if r["split"] == "train"]
    assert len(trains) == 6 and trains[-1]["lr"] > 0.01 and all(r["grad_norm"] is not None for r in trains)
    assert straight.optimizer.param_groups[0]["nesterov"]
    config.update(log_path=str(tmp_path / "b.jsonl"), checkpoint_path=str(tmp_path / "b.pt"))
    resumed = interrupted_and_resumed(config, 4)
    assert_same_run(straight, resumed, config["log_path"])
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()      # its growth tracker too


def test_fit_leaves_the_callers_random_state_alone(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=1, limit_train=64, pretrain_steps=0,
                                  log_path=None, checkpoint_path=None))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    trainer.fit(progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_jacobian_weight_schedule_warm_up_ramp_and_stop(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=4, pretrain_steps=5, jac_reg_weight=2.0,
                                  jac_reg_ramp_steps=10, pretrain_jac_reg_weight=0.5,
                                  jac_reg_stop_epoch=3))
    per_epoch, c = trainer.steps_per_epoch, trainer.config                   # 20 steps
    weight = lambda step: deq_hooks.jac_weight(c, step, per_epoch)  # noqa: E731
    assert [weight(s) for s in range(5)] == [0.5] * 5                         # warm-up weight
    assert weight(5) == pytest.approx(2.0 * 6 / 10)                           # on the ramp
    assert weight(3 * per_epoch - 1) == 2.0 == trainer.jac_weight(3 * per_epoch - 1)
    assert weight(3 * per_epoch) == 0.0                                       # stopped
    assert [deq_hooks.warm_up_depth(c, s) for s in (0, 4, 5)] == [c.pretrain_depth] * 2 + [0]
    with pytest.raises(ValueError, match="pretrain_jac_reg_weight"):
        TrainConfig(pretrain_jac_reg_weight=-0.1)


# --- language models -------------------------------------------------------------------------------

class CausalTanhCell(torch.nn.Module):
    """f(z, x) = tanh(W z + U x + b) at every position of a (batch, T, width) state."""

    def __init__(self, width):
        super().__init__()
        self.W = torch.nn.Linear(width, width, bias=False)
        self.U = torch.nn.Linear(width, width)
        spectral_rescale_(self.W.weight, 0.5)

    def inject(self, x):
        return self.U(x)

    def init_state(self, injection):
        return torch.zeros_like(injection)

    def forward(self, z, injection):
        return torch.tanh(self.W(z) + injection)


class StandInLM(torch.nn.Module):
    """A tiny language model with the LM contract (``loss``, ``forward`` → logits): embeddings, a
    causal convolution over the last `context` tokens, a DEQ (or one tanh) per position, a head."""

    def __init__(self, *, vocab_size, max_len=64, width=24, context=4, deq=None):
        super().__init__()
        self.max_len, self.context = max_len, context
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.mix = torch.nn.Conv1d(width, width, context)
        self.deq = DEQ(CausalTanhCell(width), **deq) if deq is not None else None
        self.head = torch.nn.Linear(width, vocab_size)

    def forward(self, tokens):
        assert tokens.shape[1] <= self.max_len
        h = torch.nn.functional.pad(self.embed(tokens).transpose(1, 2), (self.context - 1, 0))
        h = self.mix(h).transpose(1, 2)                          # position t sees t-3 .. t
        return self.head(self.deq(h) if self.deq is not None else torch.tanh(h))

    def loss(self, tokens, targets):
        return torch.nn.functional.cross_entropy(self(tokens).flatten(0, 1).float(), targets.flatten())


LM_DEQ = dict(solver="anderson", tol=1e-4, max_iter=30, on_fail="ignore")


@pytest.fixture
def stand_in_lm(monkeypatch):
    """Registers the stand-in as model "stand_in_lm" for one test, which runs on one thread: its
    tensors are tiny, and a busy machine's thread pool makes them up to 100× slower."""
    monkeypatch.setitem(MODELS, "stand_in_lm", StandInLM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "stand_in_lm"
    torch.set_num_threads(threads)


def lm_config(tmp_path, **overrides):
    config = dict(dataset="stdlib_chars", limit_train=20_000, limit_test=1_000, seq_len=32,
                  model="stand_in_lm", model_options=dict(deq=LM_DEQ), batch_size=8,
                  eval_batch_size=8, max_steps=30, eval_every=15, lr=1e-2, eval_jacobian_samples=2,
                  log_path=str(tmp_path / "lm.jsonl"), checkpoint_path=str(tmp_path / "lm.pt"))
    config.update(overrides)
    return config


def test_a_deq_language_model_learns_on_the_stdlib_corpus(tmp_path, stand_in_lm):
    trainer = Trainer(lm_config(tmp_path, pretrain_steps=2, pretrain_depth=3))
    assert trainer.model.embed.num_embeddings == trainer.train_set.vocab_size > 60
    assert trainer.model.max_len == 32                                     # seq_len passed on
    untrained = trainer.evaluate()
    history = trainer.fit(progress=False)
    trains = [r for r in history if r["split"] == "train"]
    tests = [r for r in history if r["split"] == "test"]
    assert [r["step"] for r in tests] == [15, 30] and len(trains) == 30
    assert sum(r["loss"] for r in trains[-5:]) / 5 < trains[0]["loss"] - 0.8
    assert tests[-1]["loss"] < untrained["loss"] - 0.3
    assert trains[0]["pretrain"] and trains[0]["fwd_nfe"] == 3 and trains[-1]["bwd_nfe"] >= 1
    for r in trains + tests:
        assert "acc" not in r
        assert r["bits_per_token"] == pytest.approx(r["loss"] / math.log(2))
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["tokens_per_s"] > 0 and (r.get("pretrain") or r["residual"] < 1e-2)
    test = tests[-1]
    assert test["eval_split"] == "valid" and test["tokens"] == 8 * ((1_000 - 1) // 8)
    assert 0 < test["spectral_radius"] <= test["spectral_radius_max"] and test["jac_frobenius"] > 0
    log = read_log(tmp_path / "lm.jsonl")
    assert log[-1]["event"] == "done" and len(log) == len(history) + 1
    final = trainer.evaluate(split="test")                     # the test split, at the end
    assert final["eval_split"] == "test" and final["tokens"] == test["tokens"]
    assert final["loss"] != test["loss"] and final["loss"] < untrained["loss"]


def test_a_language_model_resumes_exactly(tmp_path, stand_in_lm):
    """Warm-up, Jacobian regularization on some steps, gradient clipping and the cosine
    schedule, interrupted mid-epoch: the resumed run ends exactly like the straight one."""
    config = lm_config(tmp_path / "a", max_steps=10, eval_every=5, pretrain_steps=2,
                       jac_reg_weight=0.5, jac_reg_prob=0.5, grad_clip=1.0, limit_test=600,
                       checkpoint_every=4)
    straight = Trainer(config)
    straight.fit(progress=False)
    assert any(r["jac_loss"] for r in straight.history if r["split"] == "train")
    config.update(log_path=str(tmp_path / "b.jsonl"), checkpoint_path=str(tmp_path / "b.pt"))
    resumed = interrupted_and_resumed(config, 7)
    assert_same_run(straight, resumed, config["log_path"])
    valid = lambda h: [r["loss"] for r in h if r["split"] == "test"]  # noqa: E731
    assert valid(resumed.history) == valid(straight.history)


def test_language_model_options_and_errors(tmp_path, stand_in_lm):
    explicit = dict(model_options={}, log_path=None, checkpoint_path=None, eval_jacobian_samples=0)
    record = Trainer(lm_config(tmp_path, amp="bf16", **explicit)).train_step()
    assert record["fwd_nfe"] is None and math.isfinite(record["loss"])
    with pytest.raises(ValueError, match="seq_len must lie in"):
        TrainConfig(dataset="stdlib_chars", seq_len=0)
    with pytest.raises(KeyError, match="Did you mean 'seq_len'"):
        TrainConfig.from_dict({"seqlen": 64})
    for option in (dict(augment=True), dict(channels_last=True), dict(normalize=[[0.5], [0.2]])):
        with pytest.raises(ValueError, match=f"{next(iter(option))} applies to images; dataset "
                                             f"'stdlib_chars' is text"):
            TrainConfig(dataset="stdlib_chars", **option)
    with pytest.raises(ValueError, match="needs a language model, and model 'deq_classifier'"):
        Trainer(lm_config(tmp_path, model="deq_classifier", **explicit))
    with pytest.raises(ValueError, match="needs an image model.*deq_classifier"):
        Trainer(dict(dataset="digits", model="stand_in_lm"))
    with pytest.raises(ValueError, match="max_len = 16 is shorter than seq_len = 32"):
        Trainer(lm_config(tmp_path, **dict(explicit, model_options=dict(max_len=16))))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        Trainer(lm_config(tmp_path, limit_train=200, **explicit))       # 8 rows of 24 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lm_in_process(rank, world_size, port, config, out):
    """One process of a language-model run started by mp.spawn (a fresh interpreter: the stand-in
    model is registered here)."""
    MODELS["stand_in_lm"] = StandInLM
    with torchrun_process(rank, world_size, port):
        trainer = Trainer(config)
        history = trainer.fit(progress=False)
        torch.save(dict(model=trainer.model.state_dict(), history=history,
                        rows=len(trainer.batches(0)[1])), Path(out) / f"rank{rank}.pt")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no Gloo")
def test_two_processes_train_a_language_model_like_one(tmp_path, stand_in_lm):
    """Each of 2 processes takes half the rows of every window; DDP (around model.loss) averages
    the gradients, so the run ends where one process training on all the rows ends."""
    tight = dict(solver="anderson", tol=1e-7, max_iter=60, on_fail="ignore")
    config = lm_config(tmp_path, model_options=dict(deq=tight), max_steps=3, eval_every=3,
                       limit_test=400, eval_jacobian_samples=0, optimizer="sgd", lr=0.5,
                       checkpoint_path=None)
    mp.spawn(_lm_in_process, args=(2, free_port(), config, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["rows"] == ranks[1]["rows"] == 4
    single = Trainer(dict(config, log_path=None))
    single.fit(progress=False)
    for name, p in single.model.state_dict().items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
        torch.testing.assert_close(ranks[0]["model"][name], p, atol=2e-6, rtol=1e-5, msg=name)
    losses = lambda h: [r["loss"] for r in h if r["split"] == "train"]  # noqa: E731
    assert losses(ranks[0]["history"]) == pytest.approx(losses(single.history), rel=1e-5)
    (test,) = [r for r in read_log(tmp_path / "lm.jsonl") if r.get("split") == "test"]
    (expected,) = [r for r in single.history if r["split"] == "test"]
    assert test["tokens"] == expected["tokens"]
    assert test["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_command_line_reports_the_validation_score(tmp_path, stand_in_lm, monkeypatch, capsys):
    preset = lm_config(tmp_path, max_steps=4, eval_every=0, limit_test=300, eval_jacobian_samples=0)
    monkeypatch.setattr(cli, "load_preset",
                        lambda name, overrides=(): merge(dict(preset), parse_overrides(overrides)))
    cli.main(["--config", "lm", "--set", "seq_len=16", "--log", str(tmp_path / "cli.jsonl")])
    out = capsys.readouterr().out
    assert "validation loss" in out and "bits/token" in out and "perplexity" in out
    assert read_log(tmp_path / "cli.jsonl")[-1]["event"] == "done"
