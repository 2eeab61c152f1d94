"""Jacobian regularization at CPU scale: a DEQ with and without it, for a preset with JR
(default ``stdlib_chars_jr``, a tiny character-level DEQ-Transformer; or ``digits_mdeq_jr``, an
MDEQ classifier on the 8×8 digits).

    .venv/bin/python benchmarks/bench_jr.py                           # 3 seeds × 2 settings, 2-3 min
    .venv/bin/python benchmarks/bench_jr.py --quick                   # 40 steps, fewer test data: a smoke run
    .venv/bin/python benchmarks/bench_jr.py --preset digits_mdeq_jr   # the MDEQ, a few minutes
    .venv/bin/python benchmarks/bench_jr.py --seeds 5 --threads 1

Bai, Koltun and Kolter (ICML 2021) show a plain DEQ growing harder to solve as it trains (its
forward NFE climbing until the solves hit their cap), and JR holding the NFE low at a small cost in
the task metric: for an MDEQ on CIFAR-10, 93.6% at 17 forward NFE without JR against 93.1% at 6
with it. This trains the preset with γ = 0 and with the preset's γ, seed by seed (the two settings
of a seed one after the other, so that load from other programs hits both alike), and prints per
run and per setting:

* the mean training forward NFE over the first and over the last 20 training steps after the
  warm-up, and their ratio (the growth: > 1 when the solves got harder as the model trained).
  Each training step solves one batch, so this is the steadiest view of the solver's effort;
* at the last evaluation: the test forward NFE (mean over the test batches; a batch's count is
  that of its slowest sample, so it is noisy), the share of the first ``eval_jacobian_samples``
  test samples whose solve converged, and the largest ρ(J) at z* among them (> 1: the map expands
  there, and a plain fixed-point iteration diverges);
* the task metric at the last evaluation: the accuracy for a classifier (higher is better), the
  bits per token for a language model (lower is better), chosen by which of the two the test
  records carry;
* the wall time of ``fit`` until the first evaluation that reached the *common metric*: the worst
  of the runs' best values, which every run reaches; and the wall time of the whole run.

The ratios JR / no JR are computed here, from these runs. Wall times depend on the machine's
load; the ratio of interleaved runs less so.
"""
from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from deqlite.train import Trainer, load_preset

PRESET = "stdlib_chars_jr"
WINDOW = 20                 # training steps averaged at the start and at the end of a run
QUICK_STEPS = 40            # training steps after the warm-up in --quick
QUICK_TEST = {"stdlib_chars_jr": 1024, "digits_mdeq_jr": 120}   # limit_test in --quick


def quick_changes(preset: str) -> dict:
    """Config changes for --quick: 40 steps after the warm-up, an evaluation every 20 and at the
    end, ρ(J) on at most 16 samples and, for the presets named in QUICK_TEST, a smaller test set
    (other presets keep theirs: ``limit_test`` counts digits for one dataset and characters for
    another, so no single number fits all)."""
    config = load_preset(preset)
    changes = dict(max_steps=config["pretrain_steps"] + QUICK_STEPS, eval_every=WINDOW,
                   eval_jacobian_samples=min(config.get("eval_jacobian_samples") or 16, 16))
    if preset in QUICK_TEST:
        changes["limit_test"] = QUICK_TEST[preset]
    return changes


def settings(preset: str) -> dict:
    """{label: config changes}: the preset without JR and as it is (with JR)."""
    gamma = load_preset(preset)["jac_reg_weight"]
    return {"no JR": dict(jac_reg_weight=0.0), f"JR (γ = {gamma:g})": {}}


def metric_of(record: dict) -> tuple[str, bool]:
    """(the test record's task metric, whether higher is better): accuracy for a classifier,
    bits per token for a language model."""
    if record.get("acc") is not None:
        return "acc", True
    if record.get("bits_per_token") is not None:
        return "bits_per_token", False
    raise ValueError(f"a test record with neither 'acc' nor 'bits_per_token': {sorted(record)}")


def train(preset: str, changes: dict) -> dict:
    """One run: the forward NFE of its training steps after the warm-up, its test records after
    the warm-up and their wall times since fit() began."""
    config = {**load_preset(preset), **changes}
    trainer = Trainer(config)
    start = time.time()
    trainer.fit(progress=False)
    steps = [r for r in trainer.history if r.get("split") == "train" and not r["pretrain"]]
    evals = [r for r in trainer.history
             if r.get("split") == "test" and r["step"] >= config["pretrain_steps"]]
    if len(steps) < 2 * WINDOW:
        raise ValueError(f"{len(steps)} training steps after the warm-up: at least {2 * WINDOW} "
                         f"are needed to compare the first {WINDOW} with the last {WINDOW}")
    if not evals:
        raise ValueError("no evaluation after the warm-up: nothing to report")
    nfe = [r["fwd_nfe"] for r in steps]
    if any(n is None for n in nfe):
        raise ValueError("a training step without a forward NFE: is the model a DEQ?")
    return dict(train_nfe=nfe, evals=evals, seconds=[r["time"] - start for r in evals],
                total=time.time() - start)


def time_to(run: dict, target: float, metric: str, higher: bool) -> float:
    """Wall seconds until the run's first evaluation whose metric reached the target."""
    return next(s for r, s in zip(run["evals"], run["seconds"])
                if (r[metric] >= target if higher else r[metric] <= target))


def summarize(runs: dict, seeds: list, labels: list) -> dict:
    """Per run and mean per setting: training NFE at the start and the end and their ratio, the
    last evaluation's NFE, converged share, max ρ(J) and metric, the time to the common metric."""
    metric, higher = metric_of(next(iter(runs.values()))["evals"][-1])
    best = max if higher else min
    target = (min if higher else max)(best(r[metric] for r in run["evals"]) for run in runs.values())
    rows = {}
    for (label, seed), run in runs.items():
        last, nfe = run["evals"][-1], run["train_nfe"]
        first20, last20 = statistics.mean(nfe[:WINDOW]), statistics.mean(nfe[-WINDOW:])
        rows[label, seed] = dict(first20=first20, last20=last20, growth=last20 / first20,
                                 nfe=last["fwd_nfe"], converged=last["converged"],
                                 rho_max=last["spectral_radius_max"], metric=last[metric],
                                 to_target=time_to(run, target, metric, higher), total=run["total"])
    means = {label: {k: statistics.mean(rows[label, s][k] for s in seeds) for k in rows[label, seeds[0]]}
             for label in labels}
    return dict(metric=metric, higher=higher, target=target, rows=rows, means=means)


def report(summary: dict, seeds: list, labels: list) -> None:
    """The table (Markdown) and the ratios JR / no JR."""
    acc = summary["metric"] == "acc"
    name, metric_fmt = ("accuracy", "{:.1%}") if acc else ("bits/char", "{:.3f}")
    keys = ("first20", "last20", "growth", "nfe", "converged", "rho_max", "metric", "to_target", "total")
    head = (f"train NFE, first {WINDOW}", f"last {WINDOW}", "growth", "final test NFE", "converged",
            "final max ρ(J)", name, f"s to common {name}", "s in all")
    target = metric_fmt.format(summary["target"])
    print(f"\ncommon {name} (the worst best value of all runs; "
          f"{'higher' if summary['higher'] else 'lower'} is better): {target}\n")
    print("| setting | seed | " + " | ".join(head) + " |")
    print("| --- " * (len(head) + 2) + "|")
    fmt = dict(first20="{:.1f}", last20="{:.1f}", growth="{:.2f}×", nfe="{:.1f}", converged="{:.0%}",
               rho_max="{:.2f}", metric=metric_fmt, to_target="{:.1f}", total="{:.1f}")
    for label in labels:
        for seed in seeds + ["mean"]:
            row = summary["rows"][label, seed] if seed != "mean" else summary["means"][label]
            print(f"| {label} | {seed} | " + " | ".join(fmt[k].format(row[k]) for k in keys) + " |")
    base, jr = (summary["means"][label] for label in labels)
    change = (f"accuracy {100 * (jr['metric'] - base['metric']):+.1f} points" if acc
              else f"bits/char {jr['metric'] - base['metric']:+.3f}")
    print(f"\nJR / no JR (means over {len(seeds)} seeds): last-{WINDOW} train NFE "
          f"{jr['last20'] / base['last20']:.2f}×, final test NFE {jr['nfe'] / base['nfe']:.2f}×, "
          f"time to {target} {jr['to_target'] / base['to_target']:.2f}×, {change}, "
          f"converged {base['converged']:.0%} → {jr['converged']:.0%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (0, 1, ...)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps after the warm-up, fewer test data: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--preset", default=PRESET, help="a preset with jac_reg_weight > 0")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        gamma = load_preset(args.preset).get("jac_reg_weight", 0.0)   # absent: the default, 0
    except (KeyError, ValueError) as e:
        parser.error(f"preset {args.preset!r}: {e}")
    if not gamma > 0 or not math.isfinite(gamma):
        parser.error(f"preset {args.preset!r} has jac_reg_weight {gamma}: nothing to compare")
    torch.set_num_threads(args.threads)
    seeds, arms = list(range(args.seeds)), settings(args.preset)
    labels = list(arms)
    quick = quick_changes(args.preset) if args.quick else {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); preset {args.preset}"
          + (f" (quick: {quick})" if args.quick else ""))
    runs = {}
    with tqdm(total=len(seeds) * len(labels), unit="run") as bar:
        for seed in seeds:
            for label, changes in arms.items():
                bar.set_description(f"{label}, seed {seed}")
                runs[label, seed] = train(args.preset, {**changes, "seed": seed, **quick})
                bar.update(1)
    report(summarize(runs, seeds, labels), seeds, labels)
    print("\ncommand: " + shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
