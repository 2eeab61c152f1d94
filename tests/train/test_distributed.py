"""Training at scale: two processes (DistributedDataParallel over Gloo on CPU) take the same steps
as one process on the whole global batch; mixed precision and channels-last train; the new
config keys are validated."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import torchrun_process, write_image_tree

from deqlite.train import Trainer, TrainConfig, load_checkpoint, load_preset, read_log
from deqlite.train import __main__ as cli

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the Gloo backend is not available")
TIGHT_DEQ = dict(solver="anderson", tol=1e-6, max_iter=100, backward_tol=1e-6,
                 backward_max_iter=100, on_fail="ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_gloo
def test_torchrun_two_processes_step_like_one_process_on_the_global_batch(tmp_path):
    """`torchrun --nproc-per-node 2 -m deqlite.train`: each process trains on half of every global
    batch of 32; DDP must average the gradients of all parameters, also those that reach the cell
    through the IFT backward's hook (its adjoint solve calls autograd.grad inside backward). The
    per-sample solves are tight, so the two halves solve exactly as the whole batch does."""
    sets = ["dataset=digits", "limit_train=96", "limit_test=40", "epochs=1", "batch_size=32",
            "model_options.channels=4", "model_options.hidden=16",
            f"model_options.deq={json.dumps(TIGHT_DEQ)}",
            "pretrain_steps=1", "pretrain_depth=3", "optimizer=sgd", "lr=0.5", "eval_jacobian_samples=4"]
    args = [a for s in sets for a in ("--set", s)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deqlite.train", "--config", "mnist", *args,                 # (a free port)
               "--log-path", str(tmp_path / "ddp.jsonl"), "--checkpoint", str(tmp_path / "ddp.pt")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("test accuracy") == 1 and "2 process(es)" in run.stdout   # rank 0 prints

    config = load_preset("mnist", sets)
    single = Trainer(config)
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit(progress=False)
    ddp = load_checkpoint(tmp_path / "ddp.pt")
    assert ddp["step"] == single.step == 3 and ddp["world_size"] == 2
    for name, p in single.model.state_dict().items():
        assert (p - initial[name]).abs().max() > 1e-3, f"{name} did not train"
        torch.testing.assert_close(ddp["model"][name], p, atol=2e-6, rtol=1e-5, msg=name)

    log = read_log(tmp_path / "ddp.jsonl")                 # written once, by rank 0
    trains = [r for r in log if r.get("split") == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3] and log[-1]["event"] == "done"
    expected = [r for r in single.history if r["split"] == "train"]
    assert [r["loss"] for r in trains] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
    assert [r["acc"] for r in trains] == [r["acc"] for r in expected]
    assert trains[-1]["fwd_nfe"] == expected[-1]["fwd_nfe"]    # the slowest half = the whole batch
    (test,) = [r for r in log if r.get("split") == "test"]
    (expected_test,) = [r for r in single.history if r["split"] == "test"]
    assert test["acc"] == expected_test["acc"] and test["loss"] == pytest.approx(expected_test["loss"], rel=1e-5)


def _train_in_process(rank, world_size, port, config, out):
    """One process of a run started by mp.spawn, with the environment torchrun would set."""
    with torchrun_process(rank, world_size, port):
        trainer = Trainer(config)
        history = trainer.fit(progress=False)
        torch.save(dict(model=trainer.model.state_dict(), history=history,
                        batch=len(trainer.batches.indices(0))), Path(out) / f"rank{rank}.pt")


@needs_gloo
def test_every_gradient_is_averaged_with_streamed_images_bf16_and_jacobian_regularization(tmp_path):
    """The Trainer API in two processes: ImageNet-layout folders read by DataLoaders (one shard
    each), bf16 autocast, channels-last, and the Jacobian regularizer (autograd.grad with a graph
    inside the forward) on top of the IFT hook: both processes must end with identical
    parameters, as DDP averages every gradient; only rank 0 writes the log and the checkpoint."""
    root = write_image_tree(tmp_path / "data", per_class=(4, 2))     # 12 train, 6 val images
    config = dict(dataset="imagenet", data_root=str(root), augment=True, model="deq_classifier",
                  model_options=dict(channels=2, hidden=8, deq=dict(solver="anderson", tol=2e-3,
                                                                    max_iter=15, on_fail="ignore")),
                  epochs=1, batch_size=4, amp="bf16", channels_last=True, grad_clip=5.0,
                  jac_reg_weight=1.0, jac_reg_probes=1, eval_jacobian_samples=2, eval_batch_size=2,
                  log_path=str(tmp_path / "run.jsonl"), checkpoint_path=str(tmp_path / "run.pt"))
    mp.spawn(_train_in_process, args=(2, free_port(), config, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["batch"] == ranks[1]["batch"] == 2                  # 4 per step, 2 per process
    for name, p in ranks[0]["model"].items():
        assert torch.equal(p, ranks[1]["model"][name]), f"{name} differs between the processes"
    trains = [r for r in read_log(tmp_path / "run.jsonl") if r.get("split") == "train"]
    assert [r["step"] for r in trains] == [1, 2, 3] and all(r["jac_loss"] is not None for r in trains)
    assert ranks[0]["history"][-1]["acc"] == ranks[1]["history"][-1]["acc"]    # reduced metrics
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 3


def _gloo_threads() -> int:
    """How many of Gloo's threads run in this process (Linux names them gloo_tcp_loop, pt_gloo_runloop)."""
    return sum("gloo" in (task / "comm").read_text() for task in Path("/proc/self/task").iterdir())


def _small_command_line(tmp_path, *sets) -> list[str]:
    """`python -m deqlite.train`'s arguments for a run of a few steps on digits, logged in tmp_path."""
    sets = ["dataset=digits", "limit_test=32", "epochs=1", "batch_size=32", "pretrain_steps=0",
            "model_options.channels=4", "model_options.hidden=16", "eval_jacobian_samples=0", *sets]
    return ["--config", "mnist", *[a for s in sets for a in ("--set", s)],
            "--log-path", str(tmp_path / "run.jsonl")]


def _command_line_in_process(rank, world_size, port, argv, out):
    with torchrun_process(rank, world_size, port):
        trainer = cli.main(argv)                  # returns with the run's Trainer still alive
        (Path(out) / f"threads{rank}").write_text(f"{_gloo_threads()}")
        assert trainer is not None


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_the_command_line_stops_gloos_threads_before_it_returns(tmp_path):
    """After a run of two processes, each leaves the process group with no Gloo thread left
    running: a thread still running while the interpreter exits can end a finished run in SIGABRT.
    Two things held the group: the DDP wrapper, and torch.distributed.nn's defaults
    ``group=group.WORLD`` when that module was first imported after the group was formed."""
    argv = _small_command_line(tmp_path, "limit_train=64") + ["--checkpoint", str(tmp_path / "run.pt")]
    mp.spawn(_command_line_in_process, args=(2, free_port(), argv, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"threads{r}").read_text() for r in range(2)] == ["0", "0"]
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 2


def _fails_with_a_collective_in_flight(rank, world_size, port, argv, out):
    """Rank 1 starts an all-reduce that rank 0 never joins and fails; rank 0 is busy meanwhile."""
    original, failed_at = Trainer.train_step, []

    def train_step(self):
        if self.step == 1 and rank == 1:
            dist.all_reduce(torch.ones(1), async_op=True)
            failed_at.append(time.monotonic())
            raise RuntimeError("planted failure")
        if self.step == 1:
            time.sleep(6)                                # rank 0: long enough to tell a wait
        return original(self)

    Trainer.train_step = train_step
    try:
        with torchrun_process(rank, world_size, port):     # (main has left the group by then)
            cli.main(argv)
        outcome = "finished"
    except Exception as e:                          # rank 0: its peer is gone
        outcome = str(e) if rank == 1 else "failed"
    left = f" after {time.monotonic() - failed_at[0]:.1f} s" if failed_at else ""
    (Path(out) / f"rank{rank}").write_text(outcome + left)
    os._exit(0)             # the group is kept, Gloo's threads run: skip the interpreter's teardown


@needs_gloo
def test_after_an_error_a_process_leaves_at_once_even_with_a_collective_in_flight(tmp_path):
    """Leaving on an error must not wait for the peers: freeing the process group would wait
    for the all-reduce that rank 1 left in flight until rank 0 joins it or exits (6 s here), and a
    peer stuck on this process would then never let it go. Both processes end, both with an error."""
    argv = _small_command_line(tmp_path, "limit_train=96")
    run = mp.spawn(_fails_with_a_collective_in_flight, args=(2, free_port(), argv, str(tmp_path)),
                   nprocs=2, join=False)
    deadline = time.monotonic() + 40
    while not run.join(timeout=1):
        if time.monotonic() > deadline:
            for process in run.processes:
                process.kill()
            pytest.fail("the two processes were still running 40 s after the failure: deadlocked")
    rank1 = (tmp_path / "rank1").read_text()
    assert rank1.startswith("planted failure after ")
    assert float(rank1.split()[-2]) < 3, rank1
    assert (tmp_path / "rank0").read_text() == "failed"


def tiny(tmp_path, **overrides):
    return dict(dict(dataset="digits", limit_train=64, limit_test=32, epochs=1, batch_size=32,
                     model_options=dict(channels=4, hidden=16, deq=dict(solver="anderson", tol=1e-3,
                                                                         max_iter=20, on_fail="ignore")),
                     eval_jacobian_samples=0, log_path=None, checkpoint_path=None), **overrides)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, amp):
    trainer = Trainer(tiny(tmp_path, amp=amp))
    before = [p.clone() for p in trainer.model.parameters()]
    record = trainer.train_step()
    assert torch.isfinite(torch.tensor(record["loss"])) and record["bwd_nfe"] >= 1
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())    # weights stay fp32
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters()))
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert trainer.evaluate()["acc"] >= 0


def test_channels_last_keeps_the_convolutions_in_nhwc(tmp_path):
    trainer = Trainer(tiny(tmp_path, channels_last=True, max_steps=1))
    conv = trainer.model.stem[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.fit(progress=False)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_scale_config_errors_name_the_valid_values():
    with pytest.raises(ValueError, match="unknown amp mode 'bf61'; choose one of 'none', 'bf16', "
                                         "'fp16'. Did you mean 'bf16'"):
        TrainConfig(amp="bf61")
    with pytest.raises(KeyError, match="unknown config key 'num_worker'. Did you mean 'num_workers'"):
        TrainConfig.from_dict({"num_worker": 4})
    with pytest.raises(KeyError, match="Valid config keys: .*channels_last"):
        TrainConfig.from_dict({"channel_last": True})
    with pytest.raises(TypeError, match="augment must be true or false"):
        TrainConfig(augment="yes")
    with pytest.raises(ValueError, match="num_workers must lie in"):
        TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="grad_clip must lie in"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(TypeError, match="unknown option 'momentom'. Did you mean 'momentum'"):
        TrainConfig(optimizer="sgd", optimizer_options={"momentom": 0.9})
    with pytest.raises(TypeError, match="config's own key"):
        TrainConfig(optimizer_options={"lr": 0.1})
    with pytest.raises(ValueError, match="normalize must be \\[mean, std\\]"):
        TrainConfig(normalize=[[0.5, 0.5], [0.2]])
    with pytest.raises(ValueError, match="lr_min applies to the cosine schedule"):
        TrainConfig(schedule="constant", lr_min=1e-5)
    with pytest.raises(ValueError, match="normalize has 3 numbers.*1 channel"):
        Trainer(dict(dataset="digits", normalize=[[0.5] * 3, [0.2] * 3]))
    with pytest.raises(SystemExit, match="unknown amp mode"):
        cli.main(["--config", "mnist", "--set", "amp=fp32"])
