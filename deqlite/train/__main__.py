"""The command line: train a preset, on one process or under torchrun.

    python -m deqlite.train --config mnist [--set epochs=3] [--log runs/mnist.jsonl]
    python -m deqlite.train --config cifar10_mdeq_tiny --set amp=bf16 --set channels_last=true
    python -m deqlite.train --config cifar10_mdeq_tiny --resume        # go on from runs/NAME.pt
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
import time
from pathlib import Path

from .configs import PRESETS, load_preset
from .distributed import Place, shutdown_distributed
from .trainer import Trainer


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deqlite.train",
                                     description="Train a preset (under torchrun: on every process).")
    parser.add_argument("--config", required=True, help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set epochs=2 --set model_options.hidden=64")
    parser.add_argument("--log", "--log-path", dest="log",
                        help="JSONL log path (default runs/CONFIG.jsonl); spell it --log-path under "
                             "torchrun, whose own parser takes --log for an abbreviation of its options")
    parser.add_argument("--checkpoint", help="checkpoint path (default runs/CONFIG.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _arguments(argv)
    try:
        config = load_preset(args.config, args.set)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    config.setdefault("log_path", args.log or f"runs/{args.config}.jsonl")
    config.setdefault("checkpoint_path", args.checkpoint or f"runs/{args.config}.pt")
    if args.log:
        config["log_path"] = args.log
    if args.checkpoint:
        config["checkpoint_path"] = args.checkpoint
    main_process = Place.from_env().is_main
    finished = False
    try:
        if args.resume and Path(config["checkpoint_path"]).exists():
            trainer = Trainer.resume(config["checkpoint_path"], log_path=config["log_path"],
                                     checkpoint_path=config["checkpoint_path"])
        else:
            if main_process and config.get("log_path") and Path(config["log_path"]).exists():
                Path(config["log_path"]).unlink()
            trainer = Trainer(config)
        start = time.perf_counter()
        trainer.fit()
        finished = True
    finally:
        shutdown_distributed(wait=finished)
    final = [r for r in trainer.history if r["split"] == "test"][-1]
    if main_process:
        print(f"{trainer.task.summary(final)}, forward NFE {final['fwd_nfe']}, "
              f"{time.perf_counter() - start:.1f} s, {trainer.place.world_size} process(es) "
              f"(log: {config['log_path']}, checkpoint: {config['checkpoint_path']})")


if __name__ == "__main__":
    main()
