"""Benchmark of the language models: CPU speed of the WikiText-103 DEQ-Transformer, the
activation memory of a DEQ against an explicit Transformer, and the DEQ paper's memory table.

    .venv/bin/python benchmarks/bench_lm.py                  # sections 1-3 (3 alone: ~3 minutes)
    .venv/bin/python benchmarks/bench_lm.py --quick          # WT103 model at d_ff 4800, seconds
    .venv/bin/python benchmarks/bench_lm.py --batch 2 --repeats 3 --threads 0
    .venv/bin/python benchmarks/bench_lm.py --memory-table    # section 3 alone: ~3 minutes
    .venv/bin/python benchmarks/bench_lm.py --memory-table --table-times   # + a step of each

1. Speed. The ``wt103_deq_transformer`` preset's model (width 700, FFN 48,000, adaptive softmax
   over WikiText-103's 267,735 words, 96.4M parameters) on windows of 150 tokens drawn from a
   Zipf distribution over the vocabulary (as word frequencies are): one training step in
   equilibrium mode (Anderson forward solve, Broyden adjoint, Adam step) and one warm-up step
   (the cell unrolled twice), each the ``Trainer``'s own ``train_step`` on a synthetic stream.
   Baseline, measured in the same process: one application of f (no graph). The NFE column
   says how many iterations the solves took (at most the preset's caps, 30 forward and 35
   adjoint, which a trained model uses).
2. Memory. At the ``stdlib_char_lm`` preset's size (width 64, batch 32 × 64 characters), the bytes
   autograd saves for the backward pass of one loss (``deqlite.memory.saved_tensor_bytes``): the
   DEQ with the implicit (IFT) backward at 5 / 15 / 30 solver iterations, the same DEQ
   backpropagating through its iterations (``backward="unrolled"``), and the explicit
   ``transformer_lm`` with 1 / 4 / 15 / 30 layers, with the time of a training step of each (the
   ``Trainer``'s step).
   Baseline: the DEQ (IFT) at 15 iterations.
3. The DEQ paper's memory comparison (Bai, Kolter, Koltun, NeurIPS 2019, Table 3), at the
   WikiText-103 widths with the real vocabulary (267,735 words), on CPU: the bytes autograd saves
   for the backward pass of one training loss on segments of 150 tokens (the Transformers' read
   a memory of the 150 before, made by a first segment), split into the model's body (the DEQ's
   solve, or the explicit layers) and the rest (embedding, adaptive softmax), the parameters
   themselves left out (they are in memory anyway). The body's bytes are affine in the batch,
   a + b·B (a: what does not grow with the batch, e.g. the weight-normalized weights
   W = g·V/‖V‖ the block computes), so two batches give the bytes at the paper's benchmark batch
   of 15 (its Table 2 footnote: length 150, batch 15, word embeddings excluded) as a + 15 b:
   batches 2 and 4 for the Transformers (batch 1 lies a few MiB off their line; a direct count at
   batch 15 matched the line within 0.1 %), 1 and 2 for the TrellisNets (1, 2, 3 lie on one line).
   Rows: the ``wt103_deq_transformer`` preset (IFT backward) against the explicit Transformer-XL
   "medium" the paper compares with (16 layers, width 410, 10 heads of 41, d_inner 2100:
   kimiyoung/transformer-xl ``pytorch/run_wt103_base.sh``, with that code's defaults: adaptive
   softmax with the same cutoffs and div_val 1, tied, post-LN, dropout 0.1, N(0, 0.02)) and the
   same widths at 18 layers (the depth of the Table's 9.0 GB row, whose widths the paper does not
   give); the ``wt103_deq_trellisnet`` preset against the explicit ``trellisnet_lm`` of the same
   widths at the paper's 70 layers (rows left out where the kit has no TrellisNet). The DEQs'
   forward solves are capped at ``MEMORY_SOLVE_CAP`` iterations while counting: under the IFT
   backward the solve keeps no graph, so its length changes the time, not the bytes (section 2;
   checked here at batch 1: the same bytes at the preset's cap of 30). Each row runs in a fresh
   process. ``--table-times`` adds one ``Trainer.train_step`` of each at batch 1 (the DEQs at
   their presets' solver settings, one untimed step first): about ten minutes on one CPU thread.

Times are medians of ``--repeats`` runs after one untimed run, on ``--threads`` CPU threads
(default 1: on a machine shared with other jobs a multi-threaded op waits for a descheduled
thread at every barrier).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

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


# --- 3. the DEQ paper's memory table ------------------------------------------------------------

MEMORY_SOLVE_CAP = 3            # forward iterations of the DEQs while their bytes are counted
PAPER_BATCH = 15                # the DEQ paper's memory benchmark: length 150, batch 15 (Table 2)
PAPER_LENGTH = 150
TRELLIS_DEPTH = 70              # the DEQ paper's Table 3: "70-layer TrellisNet"
TXL_MEDIUM = dict(              # kimiyoung/transformer-xl pytorch/run_wt103_base.sh + train.py defaults
    d_model=410, n_heads=10, d_ff=2100, n_layers=16, max_len=150, dropout=0.1, dropatt=0.0,
    norm="post", positions="relative", mem_len=150, tie_weights=True,
    cutoffs=[20000, 40000, 200000], div_value=1.0, init_std=0.02)


def memory_models() -> list:
    """The table's rows: (label, model name, model options, preset config[, batches])."""
    deq = load_preset("wt103_deq_transformer")
    rows = [("DEQ-Transformer (wt103_deq_transformer), IFT", deq["model"],
             dict(deq["model_options"]), deq),
            ("Transformer-XL medium, 16 layers (d 410, d_inner 2100)", "transformer_lm",
             dict(TXL_MEDIUM), deq),
            ("Transformer-XL medium widths, 18 layers", "transformer_lm",
             dict(TXL_MEDIUM, n_layers=18), deq)]
    rows += trellis_models()
    return rows


def trellis_models() -> list:
    """The DEQ-TrellisNet rows: the ``wt103_deq_trellisnet`` preset (IFT) and the explicit
    ``trellisnet_lm`` of the same widths at the DEQ paper's depth (its Table 3: "70-layer
    TrellisNet"), on segments of 150 (the paper's benchmark length; the preset trains on 100)
    and without a memory (deqlite's TrellisNet models have none), at batch 1 and 2 (a 70-layer
    TrellisNet keeps ~1 GiB per sequence)."""
    try:
        config = load_preset("wt103_deq_trellisnet")
    except Exception:                                   # not in this checkout
        return []
    config = dict(config, seq_len=PAPER_LENGTH)
    options = dict(config["model_options"], max_len=PAPER_LENGTH)
    explicit = {k: v for k, v in options.items() if k != "deq"}
    return [("DEQ-TrellisNet (wt103_deq_trellisnet), IFT", config["model"], options, config,
             (1, 2)),
            (f"TrellisNet, {TRELLIS_DEPTH} layers (same widths)", "trellisnet_lm",
             dict(explicit, n_layers=TRELLIS_DEPTH), config, (1, 2))]


def body_of(model) -> torch.nn.Module:
    """The part of the model between the embedding and the output layer: the DEQ's cell, or
    the explicit model's layers."""
    for name in ("cell", "layers", "conv"):
        if hasattr(model, name):
            return getattr(model, name)
    raise AttributeError(f"{type(model).__name__}: no cell, layers or conv")


def saved_by_part(model, tokens: torch.Tensor, targets: torch.Tensor, memory=None,
                  cache_weights: bool = False) -> dict:
    """Bytes autograd saves for the backward pass of ``model.loss`` (distinct storages, as
    ``deqlite.memory.saved_tensor_bytes`` counts them), by part: ``weights`` (parameters
    themselves), ``body`` (saved while the model's ``_body`` ran: the solve or the layers, with
    the weight-normalized weights they compute) and ``rest`` (embedding, output layer).
    ``cache_weights``: compute each weight-normalized weight once for the whole loss
    (``torch.nn.utils.parametrize.cached``), as locuslab's TrellisNet does for its weight-tied
    layers (``TrellisNetLM`` now does so itself; before, it recomputed, and autograd kept, its
    8,000 × 2,500 × 2 weight once per layer: 160 MB each, 11 GB at 70 layers)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, part = {}, ["rest"]
    body = model._body

    def in_body(*args, **kwargs):
        part[0] = "body"
        try:
            return body(*args, **kwargs)
        finally:
            part[0] = "rest"

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen[ptr] = (storage.nbytes(), "weights" if ptr in params else part[0])
        return t

    model._body = in_body                                  # this instance only
    cached = torch.nn.utils.parametrize.cached() if cache_weights else nullcontext()
    try:
        with cached, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if memory is None:
                model.loss(tokens, targets)
            else:
                model.loss(tokens, targets, memory=memory)
    finally:
        del model._body
    out = dict(weights=0, body=0, rest=0)
    for nbytes, where in seen.values():
        out[where] += nbytes
    return out


def zipf_windows(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, 2·length + 1) Zipf-distributed ids: two consecutive segments and their targets."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, batch * (2 * length + 1), replacement=True,
                             generator=torch.Generator().manual_seed(seed)).view(batch, -1)


def memory_row(label: str, name: str, options: dict, config: dict, batches=(2, 4),
               times: bool = False, threads: int = 1) -> dict:
    """One row of the table: the model's parameters, its saved bytes by part at each batch, the
    line a + b·B through the body's, and (``times``) one ``Trainer.train_step`` at batch 1."""
    from deqlite.models import build_model
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(name, vocab_size=WT103_VOCAB, **options).train()
    params = count_parameters(model)
    body_params = sum(p.numel() for p in body_of(model).parameters())
    length = config["seq_len"]
    deq = getattr(model, "deq", None)
    saved = {}
    with deq.options(max_iter=MEMORY_SOLVE_CAP) if deq is not None else nullcontext():
        for batch in batches:
            ids = zipf_windows(WT103_VOCAB, batch, length, seed=batch)
            first, second = ids[:, :length + 1], ids[:, length:]
            memory = None
            if getattr(model, "mem_len", 0):                # the memory of the segment before
                with torch.no_grad():
                    model.loss(first[:, :-1], first[:, 1:])
                memory = model.next_memory
            saved[batch] = saved_by_part(model, second[:, :-1], second[:, 1:], memory,
                                         cache_weights=deq is None)
    t_memory = time.perf_counter() - start
    deq_model = deq is not None
    del model, deq
    (b1, s1), (b2, s2) = sorted(saved.items())[:2]
    slope = (s2["body"] - s1["body"]) / (b2 - b1)
    intercept = s1["body"] - slope * b1
    t_step = nfe = None
    if times:
        stream = zipf_stream(WT103_VOCAB, length * 4 + 1)
        trainer = trainer_on(config, stream, model=name, model_options=options, batch_size=1,
                             pretrain_steps=0, jac_reg_weight=0.0)
        cached = nullcontext if deq_model else torch.nn.utils.parametrize.cached

        record = {}

        def step():
            with cached():                              # as in the count (saved_by_part)
                record.update(trainer.train_step())
        t_step = median_time(step, 1)
        if deq_model:
            nfe = (record.get("fwd_nfe"), record.get("bwd_nfe"))
    return dict(label=label, params=params, body_params=body_params, saved=saved,
                batches=(b1, b2), body_slope=slope, body_intercept=intercept,
                body_paper=intercept + slope * PAPER_BATCH, rest_per_seq=s2["rest"] / b2,
                t_memory=t_memory, t_step=t_step, nfe=nfe)


def bench_memory_table(times: bool = False, threads: int = 1) -> list:
    """The table's rows, each counted in a fresh process, so that one row's memory (up to ~5 GiB,
    the 70-layer TrellisNet at batch 2) is given back before the next model is built."""
    rows = []
    context = multiprocessing.get_context("spawn")
    for row in memory_models():
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows.append(pool.submit(memory_row, *row, times=times, threads=threads).result())
    return rows


def print_memory_table(rows: list) -> None:
    mib = 2.0 ** 20
    print(f"\n## The DEQ paper's memory comparison at WikiText-103 size (vocabulary {WT103_VOCAB:,}, "
          f"segments of {PAPER_LENGTH}, the Transformers' with a memory of the {PAPER_LENGTH} before): "
          f"MiB saved for backward of one training loss, "
          f"parameters excluded; body = solve or layers, counted at two batches B; batch "
          f"{PAPER_BATCH} = the line a + b·B through them; ratio to the DEQ above it\n")
    head = (f"| model | parameters | body parameters | body at B = ... (MiB) | body per sequence b "
            f"| body at batch {PAPER_BATCH} | ratio at {PAPER_BATCH} | rest per sequence | "
            f"training step, batch 1 (s) |")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    base = None
    for row in rows:
        if row["label"].startswith("DEQ"):
            base = row
        step = "-" if row["t_step"] is None else f"{row['t_step']:.1f}"
        if row["t_step"] is not None and row["nfe"] is not None:
            step += f" (NFE {row['nfe'][0]} / {row['nfe'][1]})"
        at = " / ".join(f"{row['saved'][b]['body'] / mib:.1f}" for b in row["batches"])
        print(f"| {row['label']} | {row['params']:,} | {row['body_params']:,} | {at} "
              f"({' / '.join(map(str, row['batches']))}) | {row['body_slope'] / mib:.1f} | "
              f"{row['body_paper'] / mib:.0f} | {row['body_paper'] / base['body_paper']:.2f} | "
              f"{row['rest_per_seq'] / mib:.1f} | {step} |")
    print(f"\n(counting the bytes took {sum(r['t_memory'] for r in rows):.0f} s; the DEQs' forward "
          f"solves capped at {MEMORY_SOLVE_CAP} iterations while counting)")


def speed_and_small_memory(args) -> None:
    """Sections 1 and 2 (module docstring)."""
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="WT103 model with d_ff 4800 instead of 48000 (a smoke run)")
    parser.add_argument("--batch", type=int, default=2, help="windows of 150 tokens (WT103 model)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--memory-table", action="store_true",
                        help="only section 3: the DEQ paper's memory comparison at WT103 size")
    parser.add_argument("--no-memory-table", action="store_true", help="skip section 3")
    parser.add_argument("--table-times", action="store_true",
                        help="section 3 also times one training step of each model (minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, float32")
    if not args.memory_table:
        speed_and_small_memory(args)
    if not args.no_memory_table:
        print_memory_table(bench_memory_table(args.table_times, args.threads))


if __name__ == "__main__":
    main()
