"""Benchmark of the language models: CPU speed of the WikiText-103 DEQ-Transformer, and the
activation memory of a DEQ against an explicit Transformer.

    .venv/bin/python benchmarks/bench_lm.py                  # full width WT103 model: ~1-2 minutes
    .venv/bin/python benchmarks/bench_lm.py --quick          # WT103 model at d_ff 4800, seconds
    .venv/bin/python benchmarks/bench_lm.py --batch 2 --repeats 3 --threads 0

1. Speed. The ``wt103_deq_transformer`` preset's model (width 700, FFN 48,000, adaptive softmax
   over WikiText-103's 267,735 words, 94.9M parameters) on windows of 150 tokens drawn from a
   Zipf distribution over the vocabulary (as word frequencies are): one training step in
   equilibrium mode (Anderson forward solve, Broyden adjoint, Adam step) and one warm-up step
   (the cell unrolled twice), each the ``Trainer``'s own ``train_step`` on a synthetic stream.
   Baseline, measured in the same process: one application of f (no graph). At initialization the solves reach the tolerance in a few iterations; a trained model
   uses up to the preset's caps (30 forward, 35 adjoint), so its steps cost up to ~5× more.
2. Memory. At the ``stdlib_char_lm`` preset's size (width 64, batch 32 × 64 characters), the bytes
   autograd saves for the backward pass of one loss (``deqlite.memory.saved_tensor_bytes``): the
   DEQ with the implicit (IFT) backward at 5 / 15 / 30 solver iterations, the same DEQ
   backpropagating through its iterations (``backward="unrolled"``), and the explicit
   ``transformer_lm`` with 1 / 4 / 15 / 30 layers, with the time of a training step of each (the
   ``Trainer``'s step).
   Baseline: the DEQ (IFT) at 15 iterations.

Times are medians of ``--repeats`` runs after one untimed run, on ``--threads`` CPU threads
(default 1: on a machine shared with other jobs a multi-threaded op waits for a descheduled
thread at every barrier).
"""
from __future__ import annotations

import argparse
import time

import torch

from _timing import median_time  # noqa: E402  (benchmarks/_timing.py)
from deqlite.data import TokenStream
from deqlite.memory import saved_tensor_bytes
from deqlite.models import count_parameters
from deqlite.train import Trainer, load_preset

WT103_VOCAB = 267735


def zipf_stream(vocab: int, length: int, seed: int = 0) -> TokenStream:
    """A token stream with p(w) ∝ 1 / (w + 1): frequent words first, as WikiText-103's vocabulary."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, length, replacement=True,
                            generator=torch.Generator().manual_seed(seed))
    return TokenStream(ids, tuple(map(str, range(vocab))), "word",
                       torch.bincount(ids, minlength=vocab), "synthetic", "train")


def trainer_on(config: dict, stream: TokenStream, **overrides) -> Trainer:
    """A Trainer with the preset's settings on a synthetic stream: what the benchmark times is the
    step the Trainer takes (``train_step``), not a rewrite of it."""
    config = dict(config, **overrides, device="cpu", log_path=None, checkpoint_path=None,
                  eval_jacobian_samples=0, max_steps=None, epochs=1)
    return Trainer(config, data=(stream, stream))


def bench_speed(batch: int, repeats: int, quick: bool) -> dict:
    config = load_preset("wt103_deq_transformer")
    options = dict(config["model_options"])
    if quick:
        options["d_ff"] = 4800
    stream = zipf_stream(WT103_VOCAB, batch * config["seq_len"] * (repeats + 3) + 1)
    start = time.perf_counter()
    trainer = trainer_on(config, stream, model_options=options, batch_size=batch,
                         pretrain_steps=0)
    t_build = time.perf_counter() - start
    model = trainer.model.train()
    _, x, _ = trainer.batches(0)
    with torch.no_grad():                                  # baseline: f at a typical state
        m = model.deq.fixed_point_map(model.embed_tokens(x))
        z = m.f(m.f(m.z0))
        t_f = median_time(lambda: m.f(z), max(3, repeats))
    t_deq = median_time(trainer.train_step, repeats)
    record = trainer.train_step()
    params, nfe = count_parameters(model), (record["fwd_nfe"], record["bwd_nfe"])
    del trainer, model                                   # free the first model before the second
    warm_up = trainer_on(config, stream, model_options=options, batch_size=batch,
                         pretrain_steps=10 ** 9)             # every step a warm-up step
    t_warm = median_time(warm_up.train_step, repeats)
    return dict(params=params, d_ff=options["d_ff"], t_build=t_build, t_f=t_f, t_deq=t_deq,
                t_warm=t_warm, nfe=nfe, tokens=x.numel(), depth=config["pretrain_depth"],
                batch=batch, seq_len=config["seq_len"])


def bench_memory(repeats: int) -> list:
    config = load_preset("stdlib_char_lm")
    options = dict(config["model_options"])
    deq_options = options.pop("deq")
    vocab, batch, length = 97, config["batch_size"], config["seq_len"]
    stream = TokenStream(torch.randint(0, vocab, (batch * length * (repeats + 3) + 1,),
                                       generator=torch.Generator().manual_seed(0)),
                         tuple(map(chr, range(32, 32 + vocab))), "char", torch.ones(vocab), "", "")
    variants = [(f"DEQ, IFT, {n} iterations", "deq_transformer_lm",
                 dict(deq=dict(deq_options, tol=0, max_iter=n, backward_max_iter=n)))
                for n in (5, 15, 30)]
    variants.append(("DEQ, unrolled backprop, 15 iterations", "deq_transformer_lm",
                     dict(deq=dict(deq_options, tol=0, max_iter=15, backward="unrolled"))))
    variants += [(f"explicit, {n} layer{'s' * (n > 1)}", "transformer_lm", dict(n_layers=n))
                 for n in (1, 4, 15, 30)]
    rows = []
    for label, name, extra in variants:
        trainer = trainer_on(config, stream, model=name, model_options=dict(options, **extra),
                             pretrain_steps=0, jac_reg_weight=0.0)
        _, x, y = trainer.batches(0)
        _, saved = saved_tensor_bytes(trainer.model.train().loss, x, y)
        t_step = median_time(trainer.train_step, repeats)
        rows.append(dict(label=label, params=count_parameters(trainer.model), saved=saved,
                         t_step=t_step, tokens=x.numel()))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="WT103 model with d_ff 4800 instead of 48000 (a smoke run)")
    parser.add_argument("--batch", type=int, default=2, help="windows of 150 tokens (WT103 model)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, float32")

    r = bench_speed(args.batch, args.repeats, args.quick)
    width = "REDUCED width (--quick): d_ff 4800" if args.quick else "full width: d_ff 48000"
    print(f"\n## wt103_deq_transformer, {width}: one training step on CPU (medians of "
          f"{args.repeats}; baseline: one application of f, no graph)\n")
    print(f"{r['params']:,} parameters, built in {r['t_build']:.1f} s; batch {r['batch']} × "
          f"{r['seq_len']} tokens = {r['tokens']} tokens per step\n")
    print("| step | time (s) | tokens/s | cost in f | fwd/bwd NFE |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| f alone | {r['t_f']:.3f} | {r['tokens'] / r['t_f']:.0f} | 1 | - |")
    print(f"| equilibrium (IFT) | {r['t_deq']:.2f} | {r['tokens'] / r['t_deq']:.1f} | "
          f"{r['t_deq'] / r['t_f']:.0f} | {r['nfe'][0]}/{r['nfe'][1]} |")
    print(f"| warm-up (depth {r['depth']}) | {r['t_warm']:.2f} | {r['tokens'] / r['t_warm']:.1f} | "
          f"{r['t_warm'] / r['t_f']:.0f} | - |")

    rows = bench_memory(args.memory_repeats)
    base = next(row for row in rows if row["label"] == "DEQ, IFT, 15 iterations")
    print(f"\n## Activation memory at the stdlib_char_lm size (width 64, batch 32 × 64): bytes "
          f"saved for backward, training step time (median of {args.memory_repeats}); "
          f"baseline: DEQ, IFT, 15 iterations\n")
    print("| model | parameters | saved for backward (MB) | memory ratio | step (ms) | tokens/s | "
          "time ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['label']} | {row['params']:,} | {row['saved'] / 2**20:.1f} | "
              f"{row['saved'] / base['saved']:.2f} | {row['t_step'] * 1e3:.0f} | "
              f"{row['tokens'] / row['t_step']:.0f} | {row['t_step'] / base['t_step']:.2f} |")


if __name__ == "__main__":
    main()
