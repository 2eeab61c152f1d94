"""Nothing lost, nothing silent: a run's files cannot be overwritten by a typo or a fresh run,
--resume refuses what it cannot honour, the log survives bad lines and crashes, checkpoints say
what is wrong with them, an interrupt anywhere resumes exactly, and a diverging run stops with
the reason before it saves NaN weights."""
import errno
import json
import os
import signal

import pytest
import torch

from deqlite.stats import DEQNonFiniteWarning
from deqlite.train import (CheckpointError, Trainer, TrainConfig, TrainingDiverged,
                           load_checkpoint, read_log)
from deqlite.train import __main__ as cli
from deqlite.train import checkpoint as checkpoints
from deqlite.train.dashboard import follow
from deqlite.train.log import LogWarning, append_record

SMALL = ["dataset=digits", "limit_train=64", "limit_test=32", "batch_size=32", "epochs=1",
         "model_options.channels=4", "model_options.hidden=16", "pretrain_steps=0",
         "eval_jacobian_samples=0"]


def small_config(tmp_path, **overrides):
    config = dict(dataset="digits", limit_train=64, limit_test=32, batch_size=32, epochs=2,
                  model="deq_classifier", eval_jacobian_samples=0,
                  model_options=dict(channels=4, hidden=16, deq=dict(solver="anderson", tol=1e-3,
                                                                     max_iter=20, on_fail="ignore")),
                  log_path=str(tmp_path / "run.jsonl"), checkpoint_path=str(tmp_path / "run.pt"))
    return {**config, **overrides}


def run_cli(tmp_path, *extra):
    """python -m deqlite.train on the small digits run, its files in tmp_path."""
    sets = [a for s in SMALL for a in ("--set", s)]
    cli.main(["--config", "mnist", *sets, "--log", str(tmp_path / "run.jsonl"),
              "--checkpoint", str(tmp_path / "run.pt"), *extra])


def files(tmp_path):
    return {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}


def train_steps(log):
    return [r["step"] for r in read_log(log) if r.get("split") == "train"]


@pytest.fixture
def finished_run(tmp_path):
    run_cli(tmp_path)
    assert train_steps(tmp_path / "run.jsonl") == [1, 2]
    return tmp_path


# ---- the run directory is sacred -------------------------------------------------------------

def test_a_typo_in_set_changes_no_file(finished_run):
    before = files(finished_run)
    with pytest.raises(SystemExit, match="unknown config key 'epoch'.*Did you mean 'epochs'"):
        run_cli(finished_run, "--set", "epoch=3")
    assert files(finished_run) == before


def test_a_fresh_run_over_a_run_stops_and_names_the_ways_on(finished_run):
    before = files(finished_run)
    with pytest.raises(SystemExit, match="already hold a run; nothing was changed.*--resume.*"
                                         "--log/--checkpoint.*--overwrite"):
        run_cli(finished_run)
    assert files(finished_run) == before
    run_cli(finished_run, "--overwrite", "--set", "seed=1")            # asked for: replaced
    records = read_log(finished_run / "run.jsonl")
    assert train_steps(finished_run / "run.jsonl") == [1, 2] and records[-1]["event"] == "done"
    assert load_checkpoint(finished_run / "run.pt")["config"]["seed"] == 1


def test_the_python_trainer_also_refuses_to_overwrite_a_run(tmp_path):
    config = small_config(tmp_path, epochs=1)
    Trainer(config).fit(progress=False)
    before = files(tmp_path)
    with pytest.raises(FileExistsError, match="Trainer.resume.*overwrite=True"):
        Trainer(config).fit(progress=False)
    assert files(tmp_path) == before
    Trainer(config, overwrite=True).fit(progress=False)
    assert train_steps(tmp_path / "run.jsonl") == [1, 2]


def test_resume_without_a_checkpoint_is_an_error_that_keeps_the_log(tmp_path):
    append_record(tmp_path / "run.jsonl", {"split": "train", "step": 1, "loss": 1.0})
    before = files(tmp_path)
    with pytest.raises(SystemExit, match="no checkpoint at .*run.pt.*the log .* exists"):
        run_cli(tmp_path, "--resume")
    assert files(tmp_path) == before
    (tmp_path / "run.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="run.tp; .* holds run.pt. Did you mean 'run.pt'"):
        load_checkpoint(tmp_path / "run.tp")


def test_resume_refuses_changed_settings_and_trains_a_finished_run_further(finished_run, capsys):
    before = files(finished_run)
    with pytest.raises(SystemExit, match=r"lr: the run has [\d.]+, the command asks for 0.01"):
        run_cli(finished_run, "--resume", "--set", "lr=0.01")
    with pytest.raises(SystemExit, match="unknown config key 'lrr'"):
        run_cli(finished_run, "--resume", "--set", "lrr=0.01")
    run_cli(finished_run, "--resume")                            # finished: nothing to do
    assert "nothing to train" in capsys.readouterr().out and files(finished_run) == before
    run_cli(finished_run, "--resume", "--set", "epochs=2")       # train further
    assert train_steps(finished_run / "run.jsonl") == [1, 2, 3, 4]
    assert read_log(finished_run / "run.jsonl")[-1]["event"] == "done"
    assert load_checkpoint(finished_run / "run.pt")["step"] == 4
    with pytest.raises(ValueError, match="keeps its settings: lr cannot change"):
        Trainer.resume(str(finished_run / "run.pt"), lr=0.5)
    with pytest.raises(ValueError, match="at step 4.*would end at step 2"):
        Trainer.resume(str(finished_run / "run.pt"), epochs=1)


# ---- the log ---------------------------------------------------------------------------------

def test_the_log_survives_bad_lines_and_resume_only_appends(tmp_path):
    config = small_config(tmp_path, epochs=3)
    trainer = Trainer(config)

    def stop(record):
        if record["split"] == "train" and record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.fit(stop, progress=False)
    log = tmp_path / "run.jsonl"
    with open(log, "a") as fh:                    # a blank line, a hand edit, a torn last line
        fh.write("\nnot json\n[1, 2]\n{\"split\": \"train\", \"st")
    written = log.read_bytes()
    with pytest.warns(LogWarning, match="skipped 2 line"):
        assert train_steps(log) == [1, 2, 3]
    resumed = Trainer.resume(config["checkpoint_path"])
    resumed.fit(progress=False)
    assert log.read_bytes().startswith(written)                # appended, never rewritten
    with pytest.warns(LogWarning, match="skipped 3 line"):    # the torn line, closed, counts now
        records = read_log(log)
    assert [r["step"] for r in records if r.get("split") == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r.get("split") == "test"] == [2, 4, 6]


def test_superseded_records_of_an_interrupted_attempt_are_left_out(tmp_path):
    log = tmp_path / "run.jsonl"
    for step in (1, 2, 3):
        append_record(log, {"split": "train", "step": step})
    append_record(log, {"event": "resume", "step": 1})
    append_record(log, {"split": "train", "step": 2, "again": True})
    assert [(r["step"], r.get("again")) for r in read_log(log)] == [(1, None), (2, True)]


def test_follow_reads_past_bad_lines_and_names_a_missing_log(tmp_path):
    log = tmp_path / "run.jsonl"
    append_record(log, {"split": "train", "step": 1, "loss": 1.0})
    with open(log, "a") as fh:
        fh.write("garbage\n")
    append_record(log, {"event": "done", "step": 1})
    with pytest.warns(LogWarning, match="skipped 1 line"):
        dash = follow(log, poll=0.01, timeout=30)          # stops at "done", not at the timeout
    assert dash.points("loss", "train", "loss") == 1
    with pytest.raises(FileNotFoundError, match="no run log at .*rnu.jsonl.*Did you mean 'run.jsonl'"):
        follow(tmp_path / "rnu.jsonl", poll=0.01, start_timeout=0.05)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        follow(tmp_path / "nowhere" / "run.jsonl", poll=0.01)


# ---- checkpoints -----------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    trainer = Trainer(small_config(tmp_path, epochs=1))
    trainer.save_checkpoint()
    return tmp_path / "run.pt", trainer


def test_bad_checkpoints_say_which_file_and_what_is_wrong(checkpoint, tmp_path):
    path, trainer = checkpoint
    good = path.read_bytes()
    cases = {
        "empty.pt": (b"", "empty.pt is empty"),
        "text.pt": (b"hello, not a checkpoint\n", "text.pt is text, not a checkpoint"),
        "cut.pt": (good[: len(good) // 2], "cut.pt is a PyTorch file that is truncated or corrupt"),
        "noise.pt": (os.urandom(256), "noise.pt is not a PyTorch file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    torch.save(trainer.model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="plain state_dict.*model.load_state_dict"):
        load_checkpoint(tmp_path / "weights.pt")
    envelope = torch.load(path, weights_only=True)
    payload = bytearray(envelope["payload"])
    payload[len(payload) // 2] ^= 0xFF                               # one flipped byte
    torch.save(dict(envelope, payload=bytes(payload)), tmp_path / "flipped.pt")
    with pytest.raises(CheckpointError, match="flipped.pt is corrupt: .*checksum"):
        load_checkpoint(tmp_path / "flipped.pt")
    torch.save(dict(envelope, version=checkpoints.VERSION + 1), tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer deqlite"):
        load_checkpoint(tmp_path / "newer.pt")
    with pytest.raises(SystemExit, match="--resume: .*cut.pt is a PyTorch file that is truncated"):
        cli.main(["--config", "mnist", "--resume", "--checkpoint", str(tmp_path / "cut.pt")])


def test_nan_weights_are_never_saved_and_never_loaded(checkpoint, tmp_path):
    path, trainer = checkpoint
    good = path.read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="not saving .*NaN/inf"):
        trainer.save_checkpoint()
    assert path.read_bytes() == good
    state = load_checkpoint(path)
    state["model"] = trainer.model.state_dict()
    checkpoints.save_checkpoint(state, tmp_path / "nan.pt")         # written by other means
    with pytest.raises(CheckpointError, match="nan.pt has NaN/inf weights .*diverged"):
        load_checkpoint(tmp_path / "nan.pt")


def test_a_full_disk_says_where_and_how_much_and_keeps_the_checkpoint(checkpoint, monkeypatch):
    path, trainer = checkpoint
    good = path.read_bytes()

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deqlite._files.os.fdopen", FullDisk)
    trainer.step = 5
    with pytest.raises(OSError, match=r"could not write .*run.pt: No space left on device. It "
                                      r"needs [\d.]+ MiB; [\d.]+ MiB are free .*previous run.pt is "
                                      r"unchanged"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == good and [p.name for p in path.parent.glob("run.pt*")] == ["run.pt"]


# ---- interrupts anywhere resume exactly ------------------------------------------------------

def straight_run(tmp_path, **overrides):
    trainer = Trainer(small_config(tmp_path / "straight", **overrides))
    trainer.fit(progress=False)
    return trainer


def assert_same(a, b):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time", "samples_per_s", "seconds")}  # noqa: E731
                       for r in h]
    assert strip(a.history) == strip(b.history)


def test_ctrl_c_during_an_evaluation_resumes_with_that_evaluation(tmp_path, monkeypatch):
    straight = straight_run(tmp_path)
    config = small_config(tmp_path)
    trainer = Trainer(config)
    real = Trainer.evaluate

    def interrupted(self, *args, **kwargs):
        monkeypatch.setattr(Trainer, "evaluate", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    assert trainer.step == 2 and trainer.pending_eval
    resumed = Trainer.resume(config["checkpoint_path"])
    assert resumed.pending_eval
    resumed.fit(progress=False)
    assert_same(straight, resumed)
    assert [r["step"] for r in read_log(config["log_path"]) if r.get("split") == "test"] == [2, 4]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_ctrl_c_inside_the_optimizer_step_waits_for_the_step_to_be_logged(tmp_path, monkeypatch):
    straight = straight_run(tmp_path)
    config = small_config(tmp_path)
    trainer = Trainer(config)
    real_step = trainer.optimizer.step

    def step_with_ctrl_c(*args, **kwargs):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)         # arrives in the middle of the update
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    monkeypatch.undo()
    assert trainer.step == 3 and load_checkpoint(config["checkpoint_path"])["step"] == 3
    resumed = Trainer.resume(config["checkpoint_path"])
    resumed.fit(progress=False)
    assert_same(straight, resumed)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_second_ctrl_c_stops_at_once_without_saving_a_half_update(tmp_path, monkeypatch, capsys):
    config = small_config(tmp_path)
    trainer = Trainer(config)
    real_step = trainer.optimizer.step

    def step_with_two_ctrl_c(*args, **kwargs):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", step_with_two_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    assert trainer.step == 2 and load_checkpoint(config["checkpoint_path"])["step"] == 2
    assert "was cut off, so no checkpoint is saved" in capsys.readouterr().out


# ---- divergence ------------------------------------------------------------------------------

def test_a_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = small_config(tmp_path, epochs=2)
    trainer = Trainer(config)
    trainer.fit(progress=False)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    good = (tmp_path / "run.pt").read_bytes()
    trainer.total_steps += 2                                       # train on, with a NaN batch
    real = trainer.task.loss
    monkeypatch.setattr(trainer.task, "loss", lambda out, y: (real(out, y)[0] * float("nan"), 0.0))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: the loss is nan .*not "
                                               r"updated; the last checkpoint .*step 4\) is kept"):
        trainer.fit(progress=False)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
    assert (tmp_path / "run.pt").read_bytes() == good


@pytest.mark.parametrize("lr, message", [(1e38, "the optimizer's update overflows"),
                                         (1e30, "turns a finite batch into NaN/inf .*largest "
                                                r"\|weight\| is 1e\+30")])
def test_a_huge_learning_rate_is_named(tmp_path, lr, message):
    with pytest.raises(TrainingDiverged, match=message + ".*Lower lr"):
        Trainer(small_config(tmp_path, lr=lr, log_path=None, checkpoint_path=None)).fit(progress=False)


# ---- settings that meant nothing -------------------------------------------------------------

@pytest.mark.parametrize("key, value, error, message", [
    ("device", "gpu", ValueError, "not a device .*PyTorch calls a GPU \"cuda\""),
    ("limit_train", 0, ValueError, "limit_train must lie in \\[1"),
    ("limit_train", -5, ValueError, "limit_train must lie in \\[1"),
    ("limit_test", 0, ValueError, "limit_test must lie in \\[1"),
    ("max_steps", 0, ValueError, "max_steps must lie in \\[1"),
    ("model_options", 5, TypeError, "model_options must be a dict"),
    ("lr", float("nan"), ValueError, "lr must be a number, got nan"),
    ("lr", float("inf"), ValueError, "lr must be finite"),
])
def test_meaningless_settings_are_errors(key, value, error, message):
    with pytest.raises(error, match=message):
        TrainConfig.from_dict({key: value})


def test_help_lists_resume_overwrite_and_the_run_files(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for words in ("--resume", "--overwrite", "runs/CONFIG.jsonl", "runs/CONFIG.pt", "checksum"):
        assert words in text, words


def test_old_checkpoints_without_an_envelope_still_load(checkpoint, tmp_path):
    path, _ = checkpoint
    state = load_checkpoint(path)
    torch.save(state, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="older deqlite, without a checksum"):
        assert load_checkpoint(tmp_path / "old.pt")["step"] == state["step"]
    assert json.dumps(state["config"])           # the config stays plain data


def test_samples_lost_to_nan_are_named_and_logged_even_under_on_fail_ignore(tmp_path, monkeypatch):
    config = small_config(tmp_path, epochs=1, log_path=None, checkpoint_path=None)
    trainer = Trainer(config)
    assert trainer.deq.on_fail == "ignore"
    real = type(trainer.deq.cell).forward

    def poisoned(self, z, injection):                  # sample 0's state turns NaN
        out = real(self, z, injection)
        return torch.cat([out[:1] * float("nan"), out[1:]])

    monkeypatch.setattr(type(trainer.deq.cell), "forward", poisoned)
    with pytest.warns(DEQNonFiniteWarning), pytest.raises(
            TrainingDiverged, match="the loss is nan; the DEQ's solve lost 1 of 32 samples"):
        trainer.train_step()
    with pytest.warns(DEQNonFiniteWarning):
        assert trainer.evaluate()["nonfinite"] == 1                  # one per held-out batch
    monkeypatch.undo()
    assert trainer.evaluate()["nonfinite"] == 0


def test_missing_data_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="--config cifar10_mdeq_tiny: .*cifar"):
        cli.main(["--config", "cifar10_mdeq_tiny", "--set", f"data_root={tmp_path / 'none'}",
                  "--log", str(tmp_path / "x.jsonl"), "--checkpoint", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.pt").exists()
