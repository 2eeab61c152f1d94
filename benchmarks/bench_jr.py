"""Jacobian regularization at CPU scale: the paper's three numbers for the ``digits_mdeq_jr`` preset.

    .venv/bin/python benchmarks/bench_jr.py                 # 3 seeds × 2 settings, a few minutes
    .venv/bin/python benchmarks/bench_jr.py --quick         # 2 short epochs on fewer digits: a smoke run
    .venv/bin/python benchmarks/bench_jr.py --seeds 5 --threads 1

Bai, Koltun and Kolter (ICML 2021) report, for an MDEQ on CIFAR-10, 93.6% at 17 forward NFE
without JR against 93.1% at 6 with it. This trains the preset's small MDEQ on the 8×8 digits with
γ = 0 and with the preset's γ, seed by seed (the two settings of a seed one after the other, so
that load from other programs hits both alike), and prints per run and per setting:

* at the last evaluation: the test forward NFE (mean over the test batches), the share of the
  first ``eval_jacobian_samples`` test digits whose solve converged, and the largest ρ(J) at z*
  among them;
* the final test accuracy;
* the wall time of ``fit`` until the first evaluation that reached the *common accuracy*: the
  lowest of the runs' best accuracies, which every run reaches.

The ratios JR / no JR (NFE, time to the common accuracy) are computed here, from these runs.
Wall times depend on the machine's load; the ratio of interleaved runs less so.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from deqlite.train import Trainer, load_preset

PRESET = "digits_mdeq_jr"
QUICK = dict(epochs=3, pretrain_steps=23, limit_test=120, eval_jacobian_samples=16)


def settings(preset: str) -> dict:
    """{label: config changes}: the preset without JR and as it is (with JR)."""
    gamma = load_preset(preset)["jac_reg_weight"]
    return {"no JR": dict(jac_reg_weight=0.0), f"JR (γ = {gamma:g})": {}}


def train(preset: str, changes: dict) -> dict:
    """One run: its test records (after the warm-up) and their wall times since fit() began."""
    config = {**load_preset(preset), **changes}
    trainer = Trainer(config)
    start = time.time()
    trainer.fit(progress=False)
    evals = [r for r in trainer.history if r["split"] == "test" and r["step"] >= config["pretrain_steps"]]
    return dict(evals=evals, seconds=[r["time"] - start for r in evals],
                total=time.time() - start)


def time_to(run: dict, target: float) -> float:
    """Wall seconds until the run's first evaluation with accuracy ≥ target."""
    return next(s for r, s in zip(run["evals"], run["seconds"]) if r["acc"] >= target)


def summarize(runs: dict, seeds: list, labels: list) -> dict:
    """Per run: final NFE, converged share, max ρ(J), accuracy, time to the common accuracy."""
    target = min(max(r["acc"] for r in run["evals"]) for run in runs.values())
    rows = {}
    for (label, seed), run in runs.items():
        last = run["evals"][-1]
        rows[label, seed] = dict(nfe=last["fwd_nfe"], converged=last["converged"],
                                 rho_max=last["spectral_radius_max"],
                                 acc=last["acc"], to_target=time_to(run, target),
                                 total=run["total"])
    means = {label: {k: statistics.mean(rows[label, s][k] for s in seeds) for k in rows[label, seeds[0]]}
             for label in labels}
    return dict(target=target, rows=rows, means=means)


def report(summary: dict, seeds: list, labels: list) -> None:
    keys = ("nfe", "converged", "rho_max", "acc", "to_target", "total")
    head = ("final NFE", "converged", "final max ρ(J)", "accuracy", "s to common acc", "s in all")
    print(f"\ncommon accuracy (the lowest best accuracy of all runs): {summary['target']:.1%}\n")
    print("| setting | seed | " + " | ".join(head) + " |")
    print("| --- " * (len(head) + 2) + "|")
    fmt = dict(nfe="{:.1f}", converged="{:.0%}", rho_max="{:.2f}", acc="{:.1%}", to_target="{:.1f}",
               total="{:.1f}")
    for label in labels:
        for seed in seeds + ["mean"]:
            row = summary["rows"][label, seed] if seed != "mean" else summary["means"][label]
            print(f"| {label} | {seed} | " + " | ".join(fmt[k].format(row[k]) for k in keys) + " |")
    base, jr = (summary["means"][label] for label in labels)
    print(f"\nJR / no JR (means over {len(seeds)} seeds): final NFE {jr['nfe'] / base['nfe']:.2f}×, "
          f"time to {summary['target']:.1%} {jr['to_target'] / base['to_target']:.2f}×, "
          f"accuracy {100 * (jr['acc'] - base['acc']):+.1f} points, "
          f"converged {base['converged']:.0%} → {jr['converged']:.0%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (0, 1, ...)")
    parser.add_argument("--quick", action="store_true", help="3 short epochs: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--preset", default=PRESET, help="a preset with jac_reg_weight > 0")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if load_preset(args.preset)["jac_reg_weight"] <= 0:
        parser.error(f"preset {args.preset!r} has jac_reg_weight 0: nothing to compare")
    torch.set_num_threads(args.threads)
    seeds, arms = list(range(args.seeds)), settings(args.preset)
    labels = list(arms)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); preset {args.preset}"
          + (" (quick)" if args.quick else ""))
    runs = {}
    with tqdm(total=len(seeds) * len(labels), unit="run") as bar:
        for seed in seeds:
            for label, changes in arms.items():
                bar.set_description(f"{label}, seed {seed}")
                runs[label, seed] = train(args.preset, {**changes, "seed": seed,
                                                        **(QUICK if args.quick else {})})
                bar.update(1)
    report(summarize(runs, seeds, labels), seeds, labels)
    print("\ncommand: " + shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
