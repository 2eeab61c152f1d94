"""TensorBoard events (``config.tensorboard``): every number of every logged record, at its step,
read back equal to ``read_log`` -- through the command line, across a resume that supersedes
an interrupted attempt's records, written by rank 0 alone, never over another run's events, and
a missing package said at once."""
import math
import os
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from deqlite.train import Trainer, TrainConfig, read_log
from deqlite.train import __main__ as cli
from deqlite.train.config import RESUMABLE
from deqlite.train.distributed import Place
from deqlite.train.tensorboard_log import TensorBoardLog

BOOKKEEPING = {"split", "step", "epoch", "time"}
SMALL = ["dataset=digits", "limit_train=64", "limit_test=32", "batch_size=32", "epochs=1",
         "model_options.channels=4", "model_options.hidden=16", "pretrain_steps=0",
         "eval_jacobian_samples=0"]


def small_config(tmp_path, **overrides):
    """2 steps an epoch on digits; a DEQ with a warm-up step, the Jacobian regularizer and
    ρ(J) at evaluation, so that the records carry the DEQ's numbers too."""
    config = dict(dataset="digits", limit_train=64, limit_test=32, batch_size=32, epochs=2,
                  model="deq_classifier", pretrain_steps=1, pretrain_depth=3, jac_reg_weight=0.1,
                  eval_jacobian_samples=4,
                  model_options=dict(channels=4, hidden=16, deq=dict(solver="anderson", tol=1e-3,
                                                                     max_iter=20, on_fail="ignore")),
                  log_path=str(tmp_path / "run.jsonl"), checkpoint_path=str(tmp_path / "run.pt"),
                  tensorboard=tmp_path / "tb")
    return {**config, **overrides}


def expected_scalars(log_path) -> dict:
    """{(tag, step): (value, time)} for every number of every record of the run's log (the
    test's own reading of the rule, not the module's)."""
    out = {}
    for record in read_log(log_path):
        if "split" not in record:
            continue                                   # the "done" event
        for key, value in record.items():
            if key in BOOKKEEPING or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            pair = (f"{record['split']}/{key}", record["step"])
            assert pair not in out, f"the log holds {pair} twice"
            out[pair] = (value, record["time"])
    return out


def read_events(folder) -> dict:
    """{(tag, step): ScalarEvent} as TensorBoard reads the folder; a (tag, step) twice fails."""
    reader = event_accumulator.EventAccumulator(
        str(folder), size_guidance={kind: 0 for kind in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    reader.Reload()
    pairs = [(tag, e.step, e) for tag in reader.Tags()["scalars"] for e in reader.Scalars(tag)]
    events = {(tag, step): e for tag, step, e in pairs}
    assert len(events) == len(pairs), "a (tag, step) has more than one event"
    return events


def assert_events_match_the_log(folder, log_path) -> dict:
    expected, events = expected_scalars(log_path), read_events(folder)
    assert set(events) == set(expected), (set(events) ^ set(expected))
    for pair, (value, walltime) in expected.items():
        assert math.isclose(events[pair].value, value, rel_tol=1e-6), (pair, events[pair], value)
        assert events[pair].wall_time == pytest.approx(walltime, abs=1e-6), pair
    return events


def run_cli(tmp_path, *extra):
    """python -m deqlite.train on the small digits run, its files in tmp_path."""
    sets = [a for s in SMALL for a in ("--set", s)]
    return cli.main(["--config", "mnist", *sets, "--log", str(tmp_path / "run.jsonl"),
                     "--checkpoint", str(tmp_path / "run.pt"), *extra])


def test_every_number_of_every_record_is_a_scalar_at_its_step(tmp_path):
    Trainer(small_config(tmp_path)).fit(progress=False)
    events = assert_events_match_the_log(tmp_path / "tb", tmp_path / "run.jsonl")
    tags = {tag for tag, _ in events}
    for tag in ("train/loss", "train/acc", "train/lr", "train/grad_norm", "train/samples_per_s",
                "train/fwd_cap", "train/fwd_nfe", "train/bwd_nfe", "train/residual",
                "train/jac_weight", "train/jac_loss", "test/loss", "test/acc", "test/fwd_nfe",
                "test/residual", "test/spectral_radius", "test/jac_frobenius"):
        assert tag in tags, tag
    assert not tags & {"train/step", "train/epoch", "train/time", "train/pretrain", "test/split"}
    assert sorted(s for t, s in events if t == "train/loss") == [1, 2, 3, 4]
    assert sorted(s for t, s in events if t == "test/acc") == [2, 4]
    assert ("train/bwd_nfe", 1) not in events           # None in the warm-up step: no event
    assert len(list((tmp_path / "tb").iterdir())) == 1   # one event file


def test_the_command_line_writes_events_and_a_resume_goes_on_in_the_same_folder(tmp_path):
    folder = tmp_path / "runs" / "tb"
    run_cli(tmp_path, "--set", f"tensorboard={folder}")
    assert_events_match_the_log(folder, tmp_path / "run.jsonl")
    # --resume without naming the folder keeps the run's own (it is in the checkpoint's config)
    trainer = run_cli(tmp_path, "--resume", "--set", "epochs=2")
    assert trainer.config.tensorboard == str(folder) and trainer.step == 4
    events = assert_events_match_the_log(folder, tmp_path / "run.jsonl")
    assert sorted(s for t, s in events if t == "train/loss") == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match=r"the 2 TensorBoard event file\(s\) in .*tb already hold "
                                         r"a run; nothing was changed"):
        run_cli(tmp_path / "elsewhere", "--set", f"tensorboard={folder}")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(SystemExit, match="tensorboard must be a folder path"):
        run_cli(tmp_path, "--set", "tensorboard=3")


@pytest.mark.parametrize("crash, resumed_at", [(RuntimeError, 6), (KeyboardInterrupt, 7)],
                         ids=["hard crash: last periodic checkpoint", "ctrl-c saves a checkpoint"])
def test_a_resumed_run_reads_back_as_its_log_with_the_interrupted_attempt_superseded(
        tmp_path, crash, resumed_at):
    config = small_config(tmp_path, epochs=4, max_steps=4, checkpoint_every=2)
    Trainer(config).fit(progress=False)                                   # to step N = 4
    assert_events_match_the_log(tmp_path / "tb", tmp_path / "run.jsonl")

    def crash_at_step_7(record):
        if record["split"] == "train" and record["step"] == 7:
            raise crash("stop")

    attempt = Trainer.resume(tmp_path / "run.pt", max_steps=8)            # on to 2N = 8 ...
    with pytest.raises(crash):
        attempt.fit(crash_at_step_7, progress=False)                      # ... stops at step 7
    first = read_events(tmp_path / "tb")[("train/loss", 7)]               # written, kept on disk
    assert attempt.checkpoint_step == resumed_at and attempt.tensorboard.writer is None

    Trainer.resume(tmp_path / "run.pt", max_steps=8).fit(progress=False)  # from there to 8
    events = assert_events_match_the_log(tmp_path / "tb", tmp_path / "run.jsonl")
    assert sorted(s for t, s in events if t == "train/loss") == list(range(1, 9))
    assert sorted(s for t, s in events if t == "test/acc") == [2, 4, 6, 8]
    # a hard crash's step 7 is superseded (the resumed run's is later); a Ctrl-C's is the run's
    assert (events[("train/loss", 7)].wall_time > first.wall_time) == (resumed_at < 7)
    assert len(list((tmp_path / "tb").iterdir())) == 3                    # a file per attempt


def test_a_new_event_file_sorts_after_the_folders_newest(tmp_path):
    """Readers take a folder's files in name order, and a name begins with the second the file
    was made in: a resumed run's file, made in the same second as the last, could sort before it
    (``...pid.10`` < ``...pid.9``), and its purge would come first. ``open`` waits that second out."""
    folder = tmp_path / "tb"
    folder.mkdir()
    newest = folder / f"events.out.tfevents.{int(time.time()):010d}.zzzz.1.1"  # last in its second
    newest.write_bytes(b"")
    log = TensorBoardLog(str(folder), is_main=True)
    log.open(4)
    log.close()
    assert sorted(folder.iterdir())[0] == newest and len(list(folder.iterdir())) == 2


def test_a_process_that_is_not_rank_0_makes_no_folder_and_no_file(tmp_path, monkeypatch):
    """Every rank but 0 sees itself as ``place.is_main`` False; the trainer asks only that (a
    real two-process run costs ~15 s here; test_distributed covers DDP's own rank-0 writing)."""
    monkeypatch.setattr(Place, "is_main", property(lambda place: False))   # as rank 1 sees itself
    trainer = Trainer(small_config(tmp_path, epochs=1))
    trainer.fit(progress=False)
    assert len(trainer.history) == 3 and trainer.tensorboard.writer is None
    assert not list(tmp_path.iterdir())                  # no folder, no event file (nor log)


def test_a_fresh_run_never_writes_over_a_runs_events(tmp_path):
    folder = tmp_path / "tb"
    first = tmp_path / "first"
    Trainer(small_config(first, epochs=1, tensorboard=folder)).fit(progress=False)
    (old,) = folder.glob("events.out.tfevents.*")
    (folder / "notes.txt").write_text("mine")
    (folder / "other").mkdir()
    (folder / "other" / old.name).write_bytes(b"another run's events")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    config = small_config(tmp_path / "second", epochs=1, tensorboard=folder)
    with pytest.raises(FileExistsError, match=r"TensorBoard event file\(s\) in .*tb already hold "
                                              r"a run; nothing was changed.*overwrite=True"):
        Trainer(config).fit(progress=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "second").exists()

    Trainer(config, overwrite=True).fit(progress=False)
    assert not old.exists()                                         # the run's events, replaced
    assert (folder / "notes.txt").read_text() == "mine"             # anything else stays
    assert (folder / "other" / old.name).read_bytes() == b"another run's events"
    assert_events_match_the_log(folder, tmp_path / "second" / "run.jsonl")


def test_a_missing_tensorboard_package_fails_when_the_trainer_is_made(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'deqlite\[tensorboard\]'"):
        Trainer(small_config(tmp_path))
    monkeypatch.setattr(Place, "is_main", property(lambda place: False))
    with pytest.raises(ImportError, match="deqlite.tensorboard"):          # on every rank
        Trainer(small_config(tmp_path))
    assert not list(tmp_path.iterdir())
    Trainer(small_config(tmp_path, tensorboard=None))                     # off: not needed


def test_tensorboard_setting_is_validated():
    for bad in (3, True, b"runs/tb", ["runs"], {"dir": "runs"}):
        with pytest.raises(TypeError, match="tensorboard must be a folder path"):
            TrainConfig(tensorboard=bad)
    with pytest.raises(ValueError, match="tensorboard must be a folder path.*None: off"):
        TrainConfig(tensorboard="")
    assert TrainConfig(tensorboard=Path("runs") / "tb").tensorboard == os.path.join("runs", "tb")
    assert TrainConfig().tensorboard is None and "tensorboard" in RESUMABLE
