"""Benchmark: adversarial training of the digit DEQ classifier with JIIO against PGD-k.

    .venv/bin/python benchmarks/bench_adversarial.py             # 2 seeds, ~5 CPU-minutes each
    .venv/bin/python benchmarks/bench_adversarial.py --seeds 3   # more seeds
    .venv/bin/python benchmarks/bench_adversarial.py --quick     # tiny sizes, about a minute (CI)

Per seed (it sets the classifier's initialization, the batch order and the random starts):

1. Standard training: the ``mnist`` preset (MNIST-5k, conv stem + MLP-cell DEQ), 2 epochs, the
   first the unrolled warm-up, as notebook 08 section 4 trains it (``--quick``: the small variant
   on 640 digits).
2. Adversarial fine-tuning of copies of it, ``--steps`` Madry steps each at ε = 1.5 (L2, pixels in
   [0, 1]): JIIO-n (n damped JIIO iterations from the clean image, step 1.0 on x, the last
   iterate; 2n evaluations) and PGD-k with k chosen two ways from a calibration on the trained
   classifier (PGD-1 and JIIO-n on two training batches): **matched in evaluations**, k =
   round(2n / evaluations of one PGD step), a PGD step costing a forward and an adjoint solve
   (fwd NFE + 1 + bwd NFE + 1); and **matched in seconds**, k = round(JIIO's seconds / a PGD
   step's), since JIIO runs the conv stem forward and backward at every iteration and a PGD step
   only once. Plus standard fine-tuning for the same steps (clean batches) as the reference.
3. Every model, and the starting classifier, on the first ``--test`` test digits: clean accuracy
   and robust accuracy under a strong PGD at the same ε (``--pgd-steps`` steps at step lengths
   ε/4 and ε/10, each from the clean image and from one random start; a digit is robust if no
   iterate of any run is misclassified).

Printed: per method, mean ± standard deviation over seeds of clean and robust accuracy, attack
evaluations per step, the fine-tuning's total evaluations (attack + training step) and seconds,
and its seconds relative to PGD-k matched in evaluations (same process, one thread, methods run
one after the other within each seed).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from deqlite.train import Trainer, load_preset
from deqlite.train.adversarial import Attack, adversarial_training, robust_accuracy

EPS, JIIO_STEP = 1.5, 1.0


def pretrained(seed: int, quick: bool) -> Trainer:
    config = load_preset("mnist")
    config.update(dict(limit_train=640, limit_test=200, epochs=2, pretrain_steps=4) if quick
                  else dict(epochs=2), seed=seed, log_path=None)
    if quick:
        config["model_options"].update(channels=8, hidden=64)
    trainer = Trainer(config)
    trainer.fit(progress=False)
    return trainer


def calibrate(model, trainer, n: int) -> dict:
    """k for PGD matched to JIIO-n in evaluations and in seconds, from two training batches."""
    pgd_evals = pgd_seconds = jiio_seconds = 0.0
    for step in range(2):
        _, x, y = trainer.batches(step)
        one = Attack("pgd", EPS, 1)(model, x, y)
        pgd_evals, pgd_seconds = pgd_evals + one.evaluations, pgd_seconds + one.seconds
        jiio_seconds += Attack("jiio", EPS, n, JIIO_STEP)(model, x, y).seconds
    return dict(evals=max(1, round(2 * n * 2 / pgd_evals)),
                seconds=max(1, round(jiio_seconds / pgd_seconds)),
                evals_per_pgd_step=pgd_evals / 2)


def one_seed(seed: int, args) -> dict:
    trainer = pretrained(seed, args.quick)
    base = trainer.model.eval()
    k = calibrate(base, trainer, args.jiio_iters)
    attacks = {"standard fine-tuning": None,
               f"JIIO-{args.jiio_iters}": Attack("jiio", EPS, args.jiio_iters, JIIO_STEP),
               "PGD-k, evaluations matched": Attack("pgd", EPS, k["evals"]),
               "PGD-k, seconds matched": Attack("pgd", EPS, k["seconds"])}
    x, y = (t[:args.test] for t in trainer.test_set.tensors)
    strong = dict(eps=EPS, steps=args.pgd_steps, step_sizes=(EPS / 4, EPS / 10), restarts=1,
                  seed=seed)
    rows = {"no fine-tuning": dict(robust_accuracy(base, x, y, **strong), evals=0, seconds=0.0,
                                   attack_evals=0)}
    for name, attack in attacks.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        history = adversarial_training(model, trainer.train_set, attack, steps=args.steps,
                                       batch_size=64, lr=args.lr, seed=seed, progress=False)
        seconds = time.perf_counter() - start
        rows[name] = dict(
            robust_accuracy(model, x, y, **strong), seconds=seconds,
            evals=sum(r["attack_evals"] + r["train_evals"] for r in history),
            attack_evals=sum(r["attack_evals"] for r in history) / len(history))
        print(f"  seed {seed} {name}: clean {rows[name]['clean']:.3f}, robust "
              f"{rows[name]['robust']:.3f}, {seconds:.0f} s", file=sys.stderr)
    return dict(rows=rows, k=k)


def mean_sd(values: list) -> str:
    m = statistics.mean(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"


def table(results: list) -> None:
    names = list(results[0]["rows"])
    baseline = "PGD-k, evaluations matched"
    print(f"\n{'method':<34} {'clean acc':>15} {'robust acc':>15} {'attack ev/step':>14} "
          f"{'train evals':>12} {'train s':>8} {'s / PGD(ev)':>11}")
    print("-" * 115)
    for name in names:
        rows = [r["rows"][name] for r in results if name in r["rows"]]
        if not rows:
            continue
        ratio = statistics.mean(r["rows"][name]["seconds"] / r["rows"][baseline]["seconds"]
                                for r in results if name in r["rows"]) if rows[0]["seconds"] else 0
        if name.startswith("PGD-k"):
            key = "evals" if "evaluations" in name else "seconds"
            name = name.replace("k", "/".join(str(r["k"][key]) for r in results), 1)
        print(f"{name:<34} {mean_sd([r['clean'] for r in rows]):>15} "
              f"{mean_sd([r['robust'] for r in rows]):>15} "
              f"{statistics.mean(r['attack_evals'] for r in rows):>14.1f} "
              f"{statistics.mean(r['evals'] for r in rows):>12.0f} "
              f"{statistics.mean(r['seconds'] for r in rows):>8.1f} "
              f"{f'{ratio:.2f}' if ratio else '-':>11}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None,
                   help="fine-tuning steps (default 60; quick 8)")
    p.add_argument("--jiio-iters", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--test", type=int, default=None, help="test digits (default 256; quick 64)")
    p.add_argument("--pgd-steps", type=int, default=None,
                   help="strong PGD steps (default 50; quick 10)")
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 60)
    args.test = args.test or (64 if args.quick else 256)
    args.pgd_steps = args.pgd_steps or (10 if args.quick else 50)
    torch.set_num_threads(1)
    results = []
    for seed in range(args.seeds):
        results.append(one_seed(seed, args))
    ks = [r["k"] for r in results]
    print(f"ε = {EPS}; a PGD step cost {statistics.mean(k['evals_per_pgd_step'] for k in ks):.1f} "
          f"evaluations on the trained classifier, JIIO-{args.jiio_iters} costs "
          f"{2 * args.jiio_iters}; k matched in evaluations: {[k['evals'] for k in ks]}, "
          f"in seconds: {[k['seconds'] for k in ks]} (per seed)")
    print(f"robust accuracy: PGD-{args.pgd_steps}, step lengths ε/4 and ε/10, each from the "
          f"clean image and one random start, on {args.test} test digits; {args.steps} "
          f"fine-tuning steps of 64 digits, Adam lr {args.lr}")
    table(results)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: .venv/bin/python benchmarks/bench_adversarial.py {command}")


if __name__ == "__main__":
    main()
