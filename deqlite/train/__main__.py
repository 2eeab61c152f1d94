"""The command line: train a preset, on one process or under torchrun.

    python -m deqlite.train --config mnist [--set epochs=3] [--log runs/mnist.jsonl]
    python -m deqlite.train --config cifar10_mdeq_tiny --set amp=bf16 --set channels_last=true
    python -m deqlite.train --config cifar10_mdeq_tiny --resume        # go on from runs/NAME.pt
    python -m deqlite.train --config mnist --resume --set epochs=8     # train a finished run further
    python -m deqlite.train --config mnist --overwrite                 # start afresh over runs/mnist.*
    python -m deqlite.train --config wt103_deq_transformer_jr --dry-run   # what it builds, no run
    # one machine with 4 GPUs, one process each (batch_size stays the global batch):
    torchrun --standalone --nproc-per-node 4 -m deqlite.train --config imagenet_mdeq_small_jr \
        --set amp=bf16 --set channels_last=true --set num_workers=8
    # 2 machines × 4 GPUs: run on both, R = 0 on the machine called HOST and 1 on the other:
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --master-addr HOST --master-port 29500 \
        -m deqlite.train --config imagenet_mdeq_small_jr --set amp=bf16 --set num_workers=8

Presets live in ``deqlite/train/configs``; ``--set KEY=VALUE`` overrides any config key (values
are read as JSON when they parse, ``model_options.hidden=64`` reaches into a dict). Under
torchrun spell ``--log`` as ``--log-path`` (torchrun's own parser takes ``--log`` for an
abbreviation of its options). ImageNet: ``export DEQLITE_DATA=/folder/with/imagenet`` first (see
``deqlite.data``). With several machines, put the log and checkpoint on a shared file system.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ..data.integrity import DataFileError
from ..models import count_parameters
from .checkpoint import files_in_use_message, load_checkpoint, run_files_in_use
from .config import RESUMABLE, TrainConfig
from .configs import PRESETS, load_preset
from .distributed import Place, shutdown_distributed
from .trainer import Trainer

RUN_FILES = """\
run files:
  runs/CONFIG.jsonl   the log: one JSON record per step and evaluation, only ever appended to
                      (read it with deqlite.train.read_log, draw it live with dashboard.follow)
  runs/CONFIG.pt      the checkpoint: written atomically with a checksum at the end of every
                      epoch (checkpoint_every), and on Ctrl-C
  DIR/events.out.*    with --set tensorboard=DIR (off by default): the log's numbers as
                      TensorBoard scalars (pip install 'deqlite[tensorboard]'); see them with
                      tensorboard --logdir DIR
A fresh run never touches an existing run's files (nor event files in DIR): it stops and asks
for --resume, other --log/--checkpoint paths, or --overwrite. --resume needs the checkpoint,
keeps the run's settings (and its tensorboard DIR unless --set names another) and accepts only
--set epochs=/max_steps= (train further) and --set for log_path, checkpoint_path, tensorboard,
data_root, download, num_workers, device.
"""


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deqlite.train", epilog=RUN_FILES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Train a preset (under torchrun: on every process).")
    parser.add_argument("--config", required=True, help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set epochs=2 --set model_options.hidden=64")
    parser.add_argument("--log", "--log-path", dest="log",
                        help="JSONL log path (default runs/CONFIG.jsonl); spell it --log-path under "
                             "torchrun, whose own parser takes --log for an abbreviation of its options")
    parser.add_argument("--checkpoint", help="checkpoint path (default runs/CONFIG.pt)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the run (data, model, optimizer), say what it would train, and "
                             "stop: no training, no file written")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="go on with the run whose checkpoint is at --checkpoint")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh, deleting the log and checkpoint of the run at these paths "
                            "(and the event files in its tensorboard folder)")
    return parser.parse_args(argv)


def _config(args) -> TrainConfig:
    """The preset with the --set overrides and the run's paths, validated before any file is
    touched."""
    try:
        config = load_preset(args.config, args.set)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    config["log_path"] = args.log or config.get("log_path") or f"runs/{args.config}.jsonl"
    config["checkpoint_path"] = (args.checkpoint or config.get("checkpoint_path")
                                 or f"runs/{args.config}.pt")
    try:
        return TrainConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--config {args.config} --set ...: {e.args[0] if e.args else e}") from None


def _resume_changes(config: TrainConfig, state: dict, path: str) -> dict:
    """The settings the command line changes against the checkpoint's run: only those in
    RESUMABLE are allowed (a typo'd key has already failed in _config)."""
    saved = dataclasses.asdict(TrainConfig.from_dict(state["config"]))
    given = dataclasses.asdict(config)
    changed = {k: v for k, v in given.items() if v != saved[k]}
    if given["tensorboard"] is None:            # not named on this command line: the run's own
        changed.pop("tensorboard", None)
    fixed = [k for k in changed if k not in RESUMABLE]
    if fixed:
        lines = "\n".join(f"  {k}: the run has {saved[k]!r}, the command asks for {given[k]!r}"
                           for k in fixed)
        raise SystemExit(f"--resume: {path} is a run with other settings:\n{lines}\n"
                         f"A resumed run keeps its settings (it may change only "
                         f"{', '.join(RESUMABLE)}). Drop those --set, or start a new run with "
                         f"other --log/--checkpoint paths.")
    return changed


def _trainer(args, config: TrainConfig, main_process: bool) -> Trainer | None:
    """The run to train: resumed from its checkpoint, or fresh on free paths; None when a
    resumed run has nothing left to do."""
    log, checkpoint = config.log_path, config.checkpoint_path
    if args.dry_run and not args.resume:
        try:
            return Trainer(config)                  # touches no file until fit()
        except (FileNotFoundError, DataFileError) as e:
            raise SystemExit(f"--config {args.config}: {e}") from None
    if not args.resume:
        taken = run_files_in_use(log, checkpoint, config.tensorboard) if main_process else []
        if taken and not args.overwrite:
            raise SystemExit(files_in_use_message(taken, cli=True))
        try:
            return Trainer(config, overwrite=args.overwrite)
        except (FileNotFoundError, DataFileError) as e:     # the data: the message says what to do
            raise SystemExit(f"--config {args.config}: {e}") from None
    if not Path(checkpoint).exists():
        raise SystemExit(f"--resume: no checkpoint at {checkpoint}"
                         + (f" (the log {log} exists: the run stopped before its first "
                            f"checkpoint; start afresh with --overwrite)" if Path(log).exists()
                            else "; start a fresh run without --resume")
                         + ", or give its path with --checkpoint.")
    try:
        state = load_checkpoint(checkpoint)
        changes = _resume_changes(config, state, checkpoint)
        trainer = Trainer.resume(checkpoint, **changes)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"--resume: {e.args[0] if isinstance(e, KeyError) else e}") from None
    if trainer.step >= trainer.total_steps and not trainer.pending_eval:
        if main_process:
            print(f"{checkpoint}: the run finished at step {trainer.step}/{trainer.total_steps}; "
                  f"nothing to train. To train further: --resume --set epochs=N (now "
                  f"{config.epochs}) or --set max_steps=N.")
        return None
    return trainer


def describe(trainer: Trainer) -> str:
    """One line on what the run trains: the model, its parameters, its DEQ's solvers, and for a
    language model its positions and memory."""
    c, model = trainer.config, trainer.model
    parts = [f"{c.model} on {c.dataset}: {count_parameters(model):,} parameters"]
    if trainer.deq is not None:
        parts.append(f"DEQ: {trainer.deq.forward_solver.name} forward (≤ "
                     f"{trainer.deq.forward_solver.max_iter}), {trainer.deq.backward_rule} backward")
    if getattr(model, "relative", False):
        parts.append("relative positions")
    if getattr(model, "mem_len", 0) or getattr(model, "eval_mem_len", 0):
        parts.append(f"memory of {model.mem_len} tokens ({model.eval_mem_len} in evaluation)")
    return "; ".join(parts)


def main(argv=None) -> Trainer | None:
    """Run the command line (`argv`: its arguments, default sys.argv); returns the Trainer (None
    when a resumed run had nothing left to do)."""
    args = _arguments(argv)
    config = _config(args)
    main_process = Place.from_env().is_main
    finished, trainer = False, None
    try:
        trainer = _trainer(args, config, main_process)
        if trainer is None:
            return None
        if main_process:
            print(describe(trainer), flush=True)
        if args.dry_run:
            finished = True
            if main_process:
                print(f"dry run: {trainer.total_steps:,} steps of {config.batch_size} would be "
                      f"trained ({trainer.steps_per_epoch:,} per epoch); nothing was written.")
            return trainer
        start = time.perf_counter()
        trainer.fit()
        finished = True
    finally:
        shutdown_distributed(wait=finished, holder=trainer)
    final = [r for r in trainer.history if r["split"] == "test"][-1]
    if main_process:
        print(f"{trainer.task.summary(final)}, forward NFE {final['fwd_nfe']}, "
              f"{time.perf_counter() - start:.1f} s, {trainer.place.world_size} process(es) "
              f"(log: {config.log_path}, checkpoint: {config.checkpoint_path})")
    return trainer


if __name__ == "__main__":
    main()
