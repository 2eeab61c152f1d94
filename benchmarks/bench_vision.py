"""Benchmark of the vision presets: parameter counts vs the published ones, and CPU training speed.

    .venv/bin/python benchmarks/bench_vision.py              # full width (ImageNet: minutes on CPU)
    .venv/bin/python benchmarks/bench_vision.py --quick      # reduced width, a few seconds
    .venv/bin/python benchmarks/bench_vision.py --presets cifar10_mdeq_tiny --batch 16
    .venv/bin/python benchmarks/bench_vision.py --threads 0          # torch's default threads

For each preset's model (at the preset's image size: 32 for CIFAR-10, 224 for ImageNet) it times
the ``Trainer``'s own ``train_step`` on synthetic images, in equilibrium mode (forward solve, IFT
backward with the adjoint solve, optimizer step; no Jacobian regularization, which the presets
apply on 2-8 % of the steps) and in warm-up mode (the cell unrolled ``pretrain_depth`` times). Times are medians of ``--repeats`` runs after one
untimed run, on ``--threads`` CPU threads (default 1: on a machine shared with other jobs, every
multi-threaded op waits at its barrier for a descheduled thread, ~8 ms per op on the 2-core
development machine, which swamps the measurement). The baseline, measured in the same process,
is one application of the cell f (no graph) on the same batch: "cost in f" = step time / time of
one f.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from deqlite.models import count_parameters
from deqlite.train import Trainer, load_preset

# Parameter counts the papers report (see each preset's docstring for the source).
PUBLISHED = {
    "cifar10_mdeq_tiny": (170e3, "MDEQ (NeurIPS 2020), Table 1, MDEQ-small"),
    "cifar10_mdeq_large_jr": (10e6, "JR (ICML 2021), CIFAR-10 MDEQ + JR"),
    "imagenet_mdeq_small_jr": (17e6, "JR (ICML 2021), ImageNet MDEQ-small + JR"),
}
IMAGE_SIZE = {"cifar10": 32, "imagenet": 224}


def shrink(options: dict) -> dict:
    """The model at reduced width (--quick): 8 channels per branch, small head."""
    n = len(options["channels"])
    return {**options, "channels": [8] * n, "head_channels": [2] * n, "final_channels": 16,
            "groups": 4}




def trainer_on(config: dict, images: TensorDataset, **overrides) -> Trainer:
    """A Trainer with the preset's settings on synthetic images: what the benchmark times is the
    step the Trainer takes (``train_step``), not a rewrite of it. On the CPU in float32 and NCHW
    layout (the presets' bf16 autocast and channels-last are for GPUs: on a CPU they are slower)."""
    config = dict(config, **overrides, device="cpu", amp="none", channels_last=False,
                  log_path=None, checkpoint_path=None, eval_jacobian_samples=0, max_steps=None,
                  epochs=1, jac_reg_weight=0.0, pretrain_jac_reg_weight=None)
    return Trainer(config, data=(images, images))


def bench_preset(name: str, batch: int, repeats: int, quick: bool) -> dict:
    config = load_preset(name)
    options = shrink(config["model_options"]) if quick else config["model_options"]
    size = IMAGE_SIZE[config["dataset"]]
    g = torch.Generator().manual_seed(0)
    n = batch * (repeats + 2)
    images = TensorDataset(torch.rand(n, 3, size, size, generator=g),
                           torch.randint(0, options["n_classes"], (n,), generator=g))
    trainer = trainer_on(config, images, model_options=options, batch_size=batch, pretrain_steps=0)
    model = trainer.model.train()
    x = trainer.task.inputs(images.tensors[0][:batch])
    with torch.no_grad():                                  # baseline: f at a typical state
        m = model.deq.fixed_point_map(model.stem(x))
        z = m.f(m.f(m.z0))
        t_f = median_time(lambda: m.f(z), max(9, 3 * repeats))
    t_deq = median_time(trainer.train_step, repeats)
    record = trainer.train_step()
    params, nfe = count_parameters(model), (record["fwd_nfe"], record["bwd_nfe"])
    warm_up = trainer_on(config, images, model_options=options, batch_size=batch,
                         pretrain_steps=10 ** 9)             # every step a warm-up step
    t_warm = median_time(warm_up.train_step, repeats)
    return dict(name=name, params=params, size=size, t_f=t_f, t_deq=t_deq, t_warm=t_warm,
                nfe=nfe, depth=config["pretrain_depth"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced width, for a smoke run")
    parser.add_argument("--presets", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imagenet-batch", type=int, default=4,
                        help="batch for the ImageNet preset (224×224 images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, float32, "
          f"{'REDUCED width (--quick)' if args.quick else 'full width'}")
    rows = [bench_preset(name, args.imagenet_batch if "imagenet" in name else args.batch,
                         args.repeats, args.quick) for name in args.presets]

    print("\n## Parameters vs published\n")
    print("| preset | parameters | published | ratio | source |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        published, source = PUBLISHED[r["name"]]
        print(f"| {r['name']} | {r['params']:,} | {published:,.0f} | "
              f"{r['params'] / published:.2f} | {source} |")

    print(f"\n## One training step on CPU (medians of {args.repeats}; baseline: one application "
          f"of f, no graph)\n")
    print("| preset | image | batch | f (ms) | equilibrium step (s) | images/s | cost in f | "
          "fwd/bwd NFE | warm-up step (s) | images/s | cost in f |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        batch = args.imagenet_batch if "imagenet" in r["name"] else args.batch
        print(f"| {r['name']} | {r['size']}² | {batch} | {r['t_f'] * 1e3:.1f} | "
              f"{r['t_deq']:.2f} | {batch / r['t_deq']:.1f} | {r['t_deq'] / r['t_f']:.0f} | "
              f"{r['nfe'][0]}/{r['nfe'][1]} | {r['t_warm']:.2f} (depth {r['depth']}) | "
              f"{batch / r['t_warm']:.1f} | {r['t_warm'] / r['t_f']:.0f} |")


if __name__ == "__main__":
    main()
