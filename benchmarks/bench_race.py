"""Time to accuracy: a DEQ trained with Jacobian regularization against the explicit network of
notebook 04, each trained until it first reaches a target test accuracy on MNIST-5k.

    .venv/bin/python benchmarks/bench_race.py                  # 3 seeds, target 97%: ~2-3 min
    .venv/bin/python benchmarks/bench_race.py --quick          # 1 seed, target 85%, 300 test digits
    .venv/bin/python benchmarks/bench_race.py --seeds 5 --target 0.975 --eval-every 2
    .venv/bin/python benchmarks/bench_race.py --deq-set model_options.deq.tol=1e-3   # a lever
    .venv/bin/python benchmarks/bench_race.py --deq-set jac_reg_prob=0.25            # JR on 1/4

Bai, Koltun and Kolter (ICML 2021) report that a DEQ trained with Jacobian regularization (JR)
runs at about the speed of an explicit network. The racers, both trained by deqlite's ``Trainer``
(its ``train_step`` and ``evaluate``, called here one at a time so that each part can be timed):

* DEQ+JR: the ``mnist_jr`` preset (``--preset``; ``mnist`` is the unregularized DEQ that notebook
  04 trains), a conv stem, an MLP-cell DEQ (Anderson forward, IFT adjoint) and a linear head,
  with γ · ‖J_f(z*)‖²_F / d (one Hutchinson probe) added to the loss; ``--deq-set KEY=VALUE``
  changes it as ``python -m deqlite.train --set`` does;
* explicit: what notebook 04 (section 6) compares the DEQ with: ``explicit_classifier``, the same
  stem and head around two untied tanh layers with the cell's parameter count (+ one bias), with
  the DEQ config's data, batches, optimizer, lr schedule and epochs (no warm-up, no JR).

Each run trains for at most the config's epochs (the cosine schedule spans them, as in the
preset) and stops at the first evaluation on the held-out split (1,000 digits, every
``--eval-every`` steps) that reaches ``--target``. Per model and seed it reports:

* steps and epochs to the target, and the wall time of the training steps up to it (the
  time of ``train_step``: forward, backward, update, with nothing else; the evaluations are timed
  apart and also reported added in, "train+eval s");
* f evaluations to the target, summed over the steps. DEQ: forward-solve NFE + 1 (IFT's
  application of f at z* with a graph) + the adjoint solve's NFE (each a vector-Jacobian product
  through f) + JR's 1 application of f and 1 product per probe on the steps it is applied;
  applications of f recorded by autograd are not counted again for their backprop. Explicit: 1 per
  step, its second layer (a 128 → 128 tanh layer like f; its first layer corresponds to the DEQ's
  injection, which the DEQ's count leaves out too);
* the ratio DEQ+JR / explicit of the training wall time to the target, median over the seeds;
  and, less sensitive to bursts of load from other programs, of the steps to the target times
  the median time of a step.
  A run that ends without reaching the target shows its whole time as a bound (">9.9 s") and
  gives a bound for its seed's ratio, which sorts as +∞ (or 0) in the median.

Then the DEQ's time per step (mean over its steps to the target) is broken into: the forward
solve (``deq.forward_stats.wall_time``), the adjoint solve (``deq.backward_stats.wall_time``,
which runs inside ``backward()``), JR (its forward part, a timer around the DEQ's Jacobian-loss
computation during the race; and all of it, forward and backward, measured at the end of the
run (the weights it stopped with) as the difference of the fastest forward + backward with
and without the term, interleaved on the same batches) and the rest (stem, head, loss, the
backprop through the one application of f and the stem, the optimizer). The race's columns are
means over the steps (load from other programs included), the paired JR column a minimum, so
the two JR columns need not add up. Wall times depend on the machine's load: the two runs of a
seed run one after the other, so load from other programs hits both alike.
"""
from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time

import torch

from deqlite.train import Trainer, load_preset
from deqlite.train.config import TrainConfig


PRESETS = ("mnist_jr", "mnist")
QUICK = dict(target=0.85, seeds=1, limit_test=300, repeats=4)
PAIRED_BATCHES = 4           # training batches of the paired JR measurement
RACERS = ("DEQ+JR", "explicit")


def configs(preset: str, overrides: list, epochs, quick: bool) -> dict:
    """{racer: config}: the DEQ preset with the overrides, and notebook 04's explicit network
    built from it (model and its options replaced, every training setting kept)."""
    deq = load_preset(preset, overrides)
    deq.update(eval_jacobian_samples=0, log_path=None, checkpoint_path=None)
    if epochs is not None:
        deq["epochs"] = epochs
    if quick:
        deq["limit_test"] = QUICK["limit_test"]
    explicit = dict(deq, model="explicit_classifier", pretrain_steps=0, jac_reg_weight=0.0,
                    model_options={k: v for k, v in deq["model_options"].items()
                                   if k in ("channels", "hidden")})
    return {"DEQ+JR": deq, "explicit": explicit}


class JRTimer:
    """Times the DEQ's Jacobian-loss computation (the forward part of JR) in every call."""

    def __init__(self, deq):
        if not callable(getattr(deq, "_jacobian_loss_at", None)):
            raise RuntimeError("deqlite.DEQ has no _jacobian_loss_at: update JRTimer")
        self.inner, self.seconds = deq._jacobian_loss_at, 0.0
        deq._jacobian_loss_at = self

    def __call__(self, z, f):
        start = time.perf_counter()
        try:
            return self.inner(z, f)
        finally:
            self.seconds += time.perf_counter() - start


def f_evals(trainer: Trainer, record: dict) -> int:
    """f evaluations of one training step (module docstring)."""
    if trainer.deq is None:
        return 1
    if record["pretrain"]:
        return record["fwd_nfe"]                            # the unrolled warm-up
    own = 0 if trainer.deq.backward_rule == "phantom" else 1   # phantom's k are its bwd NFE
    jr = 1 + trainer.config.jac_reg_probes if record["jac_loss"] is not None else 0
    return record["fwd_nfe"] + (record["bwd_nfe"] or 0) + own + jr


def race(config: dict, target: float, eval_every: int) -> dict:
    """Train until the first evaluation at or above `target` (or the config's last step): the
    step and times of that evaluation and the per-step timings and counts up to it."""
    trainer = Trainer(config)
    deq, jr = trainer.deq, JRTimer(trainer.deq) if trainer.deq is not None else None
    steps, evals, hit = [], [], None
    while hit is None and trainer.step < trainer.total_steps:
        jr_before = jr.seconds if jr else 0.0
        start = time.perf_counter()
        record = trainer.train_step()
        seconds = time.perf_counter() - start
        fwd, bwd = (deq.forward_stats, deq.backward_stats) if deq is not None else (None, None)
        steps.append(dict(seconds=seconds, evals=f_evals(trainer, record),
                          fwd_s=fwd.wall_time if fwd is not None else 0.0,
                          bwd_s=bwd.wall_time if bwd is not None else 0.0,
                          jr_s=(jr.seconds - jr_before) if jr else 0.0,
                          fwd_nfe=record["fwd_nfe"] or 0, bwd_nfe=record["bwd_nfe"] or 0,
                          regularized=record["jac_loss"] is not None))
        if trainer.step % eval_every == 0 or trainer.step == trainer.total_steps:
            start = time.perf_counter()
            result = trainer.evaluate()
            evals.append(dict(step=trainer.step, acc=result["acc"],
                              seconds=time.perf_counter() - start))
            if result["acc"] >= target:
                hit = evals[-1]
    return dict(trainer=trainer, steps=steps, evals=evals, hit=hit,
                last_acc=evals[-1]["acc"] if evals else math.nan)


def paired_jr_seconds(trainer: Trainer, repeats: int) -> float:
    """JR's whole cost per step (forward and backward): on each of the run's first training
    batches, with the weights it stopped with, forward + backward with the term and without it,
    `repeats` times each, interleaved; the fastest time with minus the fastest without (the
    minimum: the least disturbed by other programs), averaged over the batches. The weights are
    not updated; the gradients are cleared after."""
    c, deq, model = trainer.config, trainer.deq, trainer.model
    gamma = trainer.jac_weight(trainer.step)
    model.train()

    def step(x, y, probes):
        start = time.perf_counter()
        with deq.options(jac_probes=probes):
            loss, _ = trainer.task.loss(trainer.task.forward(trainer.module, x, y), y)
            if probes:
                loss = loss + gamma * deq.jac_loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start

    gaps = []
    for k in range(PAIRED_BATCHES):
        _, x, y = trainer.batches(k)
        x, y = trainer.task.inputs(x), y.to(trainer.device)
        step(x, y, c.jac_reg_probes), step(x, y, 0)              # warm-up, untimed
        times = [(step(x, y, c.jac_reg_probes), step(x, y, 0)) for _ in range(repeats)]
        gaps.append(min(t for t, _ in times) - min(t for _, t in times))
    model.zero_grad(set_to_none=True)
    return statistics.mean(gaps)


def summarize(run: dict, steps_per_epoch: int, regularized: bool, repeats: int) -> dict:
    """One row: counts and times up to the target (or to the end, when it was not reached)."""
    hit, steps = run["hit"], run["steps"]
    n = hit["step"] if hit else len(steps)
    done = steps[:n]
    train_s = sum(s["seconds"] for s in done)
    eval_s = sum(e["seconds"] for e in run["evals"] if e["step"] <= n)
    mean = lambda key: statistics.mean(s[key] for s in done)   # noqa: E731
    jr_all = paired_jr_seconds(run["trainer"], repeats) if regularized and run["trainer"].deq \
        is not None else 0.0
    jr_share = statistics.mean(s["regularized"] for s in done)
    return dict(reached=hit is not None, steps=n, epochs=n / steps_per_epoch,
                train_s=train_s, total_s=train_s + eval_s,
                ms_step=1e3 * train_s / n, evals=sum(s["evals"] for s in done),
                ms_median=1e3 * statistics.median(s["seconds"] for s in done),
                fwd_nfe=mean("fwd_nfe"), bwd_nfe=mean("bwd_nfe"),
                acc=hit["acc"] if hit else run["last_acc"],
                fwd_ms=1e3 * mean("fwd_s"), bwd_ms=1e3 * mean("bwd_s"), jr_ms=1e3 * mean("jr_s"),
                jr_all_ms=1e3 * jr_all * jr_share)


def ratio_line(rows: dict, seeds: list, key: str, censored: bool = True) -> str:
    """'a× (per seed: ...)': DEQ+JR / explicit of `key`, median over the seeds. With `censored`, a
    seed where one racer did not reach the target within its run gives a bound (">r": the DEQ
    took longer than all of its run, "<r" the other way round), sorted as +∞ (or 0) in the
    median."""
    texts, values = [], []
    for seed in seeds:
        deq, explicit = rows["DEQ+JR", seed], rows["explicit", seed]
        r = deq[key] / explicit[key]
        if not censored or (deq["reached"] and explicit["reached"]):
            texts.append(f"{r:.2f}"), values.append(r)
        elif explicit["reached"] or deq["reached"]:
            texts.append(f"{'>' if explicit['reached'] else '<'}{r:.2f}")
            values.append(math.inf if explicit["reached"] else 0.0)
    if not values:
        return "n/a (no racer reached the target)"
    median = statistics.median(values)
    shown = f"{median:.2f}×" if 0 < median < math.inf else "beyond the runs (a bound)"
    return f"{shown} (per seed: {', '.join(texts)})"


def report(rows: dict, seeds: list, target: float, eval_every: int) -> None:
    """The race table, the ratios, and the DEQ's per-step breakdown (Markdown)."""
    pct = f"{100 * target:g}%"
    print(f"\n## Race to {pct} test accuracy (evaluated every {eval_every} steps)\n")
    head = ("model", "seed", "reached", "steps", "epochs", "train s", "train+eval s", "ms/step",
            "median ms/step",
            "f evals", "f evals/step", "fwd NFE/step", "bwd NFE/step", "test acc at stop")
    print("| " + " | ".join(head) + " |\n" + "| --- " * len(head) + "|")
    for racer in RACERS:
        for seed in seeds:
            r = rows[racer, seed]
            bound = "" if r["reached"] else ">"
            print(f"| {racer} | {seed} | {'yes' if r['reached'] else 'no'} | {r['steps']} | "
                  f"{r['epochs']:.2f} | {bound}{r['train_s']:.2f} | {bound}{r['total_s']:.2f} | "
                  f"{r['ms_step']:.1f} | {r['ms_median']:.1f} | {r['evals']:,} | "
                  f"{r['evals'] / r['steps']:.1f} | "
                  f"{r['fwd_nfe']:.1f} | {r['bwd_nfe']:.1f} | {r['acc']:.1%} |")
    print(f"\nDEQ+JR / explicit, median over {len(seeds)} seed(s) (a run that did not reach {pct} "
          f"gives a bound, > or <):")
    print(f"* wall time of the training steps to {pct}: {ratio_line(rows, seeds, 'train_s')}")
    for key, name in (("total_s", "with the evaluations added"), ("steps", "steps to target"),
                      ("evals", "f evaluations to target")):
        print(f"* {name}: {ratio_line(rows, seeds, key)}")
    print(f"* time per step: {ratio_line(rows, seeds, 'ms_step', censored=False)}; median step "
          f"{ratio_line(rows, seeds, 'ms_median', censored=False)}")
    for r in rows.values():
        r["steady_s"] = r["steps"] * r["ms_median"]
    print(f"* steps × median step time (less sensitive to bursts of load): "
          f"{ratio_line(rows, seeds, 'steady_s')}")
    print(f"\n## DEQ+JR: time per training step up to {pct} (ms, mean over its steps)\n")
    head = ("seed", "step", "forward solve", "adjoint solve", "JR forward part (race)",
            "JR all (paired, fastest)", "rest", "explicit step")
    print("| " + " | ".join(head) + " |\n" + "| --- " * len(head) + "|")
    parts = []
    for seed in seeds + ["mean"]:
        if seed == "mean":
            d = {k: statistics.mean(p[k] for p in parts) for k in parts[0]}
        else:
            r = rows["DEQ+JR", seed]
            d = dict(step=r["ms_step"], fwd=r["fwd_ms"], bwd=r["bwd_ms"], jr=r["jr_ms"],
                     jr_all=r["jr_all_ms"], explicit=rows["explicit", seed]["ms_step"])
            d["rest"] = d["step"] - d["fwd"] - d["bwd"] - d["jr_all"]
            parts.append(d)
        print(f"| {seed} | {d['step']:.2f} | {d['fwd']:.2f} | {d['bwd']:.2f} | {d['jr']:.2f} | "
              f"{d['jr_all']:.2f} | {d['rest']:.2f} | {d['explicit']:.2f} |")
    m = parts and {k: statistics.mean(p[k] for p in parts) for k in parts[0]}
    shares = ", ".join(f"{name} {100 * m[k] / m['step']:.0f}%" for k, name in
                       (("fwd", "forward solve"), ("bwd", "adjoint solve"), ("jr_all", "JR"),
                        ("rest", "rest")))
    print(f"\nshares of the DEQ+JR step: {shares}; the DEQ+JR step minus the explicit step: "
          f"{m['step'] - m['explicit']:.2f} ms")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 0, 1, ... (default 3; quick 1)")
    parser.add_argument("--target", type=float, default=None,
                        help="test accuracy to reach, in (0, 1] (default 0.97; quick 0.85)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N steps (5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--preset", choices=PRESETS, default="mnist_jr",
                        help="the DEQ's preset (mnist: notebook 04's, without JR; same labels)")
    parser.add_argument("--deq-set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the DEQ's config (repeatable), e.g. "
                             "model_options.deq.tol=1e-3")
    parser.add_argument("--epochs", type=int, default=None,
                        help="at most this many epochs, the schedule's length (default: the "
                             "preset's)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timings per batch and setting of the paired JR measurement "
                             "(default 16; quick 4)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed, target 85%%, 300 test digits, 4 pairs")
    args = parser.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else QUICK["seeds"] if args.quick else 3
    args.target = args.target if args.target is not None else \
        QUICK["target"] if args.quick else 0.97
    args.repeats = args.repeats if args.repeats is not None else \
        QUICK["repeats"] if args.quick else 16
    for name in ("seeds", "eval_every", "threads", "repeats", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 < args.target <= 1:
        parser.error(f"--target is a test accuracy in (0, 1], got {args.target}")
    try:
        args.configs = configs(args.preset, args.deq_set, args.epochs, args.quick)
        for config in args.configs.values():
            TrainConfig.from_dict(config)
    except (KeyError, ValueError, TypeError) as e:
        parser.error(f"--deq-set {args.deq_set}: {e}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    deq_config = args.configs["DEQ+JR"]
    regularized = deq_config.get("jac_reg_weight", 0) > 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); DEQ+JR: preset "
          f"{args.preset}" + (f" with {', '.join(args.deq_set)}" if args.deq_set else "")
          + f" (γ = {deq_config.get('jac_reg_weight', 0):g}); explicit: explicit_classifier, the "
          f"same training; target {100 * args.target:g}% every {args.eval_every} steps"
          + (" (quick)" if args.quick else ""))
    rows, counted = {}, {}
    for seed in seeds:
        for racer in RACERS:
            run = race({**args.configs[racer], "seed": seed}, args.target, args.eval_every)
            trainer = run["trainer"]
            counted[racer] = (sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                              len(trainer.test_set))
            rows[racer, seed] = summarize(run, trainer.steps_per_epoch,
                                          regularized and racer == "DEQ+JR", args.repeats)
            r = rows[racer, seed]
            print(f"{racer}, seed {seed}: {'reached' if r['reached'] else 'did not reach'} "
                  f"{100 * args.target:g}% at step {r['steps']} ({r['train_s']:.2f} s in steps)",
                  flush=True)
    print(f"\nparameters: DEQ+JR {counted['DEQ+JR'][0]:,}, explicit {counted['explicit'][0]:,}; "
          f"held-out digits: {counted['DEQ+JR'][1]:,}")
    report(rows, seeds, args.target, args.eval_every)
    print("\ncommand: " + shlex.join([sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
