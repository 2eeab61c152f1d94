"""Benchmark of joint inference and input optimization (JIIO) against nested optimization.

    .venv/bin/python benchmarks/bench_jiio.py            # decoder trained 4 epochs, 32 test digits
    .venv/bin/python benchmarks/bench_jiio.py --quick    # small and short, a few seconds

1. Train a ``DEQDecoder`` on MNIST-5k with JIIO in the loop (latents from 0 per batch, the decoder
   stepped through ``jiio.attach``, its ‖W‖₂ kept ≤ 0.9 so that every code has one equilibrium);
   report the test reconstruction error with JIIO-inferred latents.
2. Inverse problems on test digits with that decoder: inpainting (a 10×10 square hidden) and
   denoising (Gaussian noise, σ = 0.3). Reference: the optimum L-BFGS reaches through exact solves.
   For JIIO (Anderson, damped) and the nested baseline (Adam and SGD, each at several learning
   rates; JIIO gets 800 iterations, nested 400 steps, each of which costs tens of evaluations),
   the evaluations (f evaluations + VJPs) and the wall time until the batch's objective
   (true objective of the recorded iterate, ``objective_at``; not counted) is within 5% and 1% of
   the optimum. Ratios: best nested / best JIIO, all runs in this process.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from deqlite.data import mnist5k
from deqlite.jiio import attach, jiio, nested, objective_at
from deqlite.models import DEQDecoder

DEQ_OPTIONS = dict(tol=1e-4, max_iter=60, on_fail="ignore")


def train_decoder(images, epochs, batch, latent, hidden, seed=0):
    torch.manual_seed(seed)
    decoder = DEQDecoder(latent=latent, hidden=hidden, image_size=images.shape[-1],
                         deq=DEQ_OPTIONS)
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(batch):
            y = images[idx]
            loss = decoder.objective(y, prior=1e-2)
            result = jiio(decoder.deq, torch.zeros(len(y), latent), loss, step_size=0.1,
                          max_iter=30, tol=1e-3, grad_tol=1e-2)
            z = attach(decoder.deq, result, scale=1 / len(y))
            opt.zero_grad()
            loss(z, result.x).mean().backward()
            opt.step()
            with torch.no_grad():   # keep ‖W‖₂ ≤ 0.9: one equilibrium per code (as notebook 08)
                norm = torch.linalg.matrix_norm(decoder.cell.W.weight, ord=2)
                decoder.cell.W.weight.mul_(min(1.0, 0.9 / norm.item()))
    return decoder


def reach(stats, deq, loss, optimum, within):
    """(evaluations, seconds) at the first snapshot whose objective is within `within` of optimum."""
    for snap in stats.snapshots:
        if objective_at(deq, snap.x, loss).sum() <= (1 + within) * optimum:
            return snap.evaluations, snap.seconds
    return math.inf, math.inf


def compare(name, decoder, loss, x0, budget, record_every):
    deq = decoder.deq
    x_ref = nested(deq, x0, loss, lr=1.0, steps=150, optimizer="lbfgs").x
    optimum = objective_at(deq, x_ref, loss).sum().item()
    runs = {}
    for solver, steps in (("anderson", (0.03, 0.1, 0.3)), ("damped", (0.03, 0.1, 0.3))):
        for step in steps:
            result = jiio(deq, x0, loss, step_size=step, solver=solver, max_iter=budget,
                          tol=1e-6, grad_tol=1e-6, record_every=record_every)
            runs[f"jiio/{solver} α={step}"] = result.stats
    for optimizer, rates in (("adam", (0.03, 0.1, 0.3)), ("sgd", (0.03, 0.1, 0.3))):
        for lr in rates:
            result = nested(deq, x0, loss, lr=lr, steps=budget // 2, optimizer=optimizer,
                            record_every=max(1, record_every // 4))
            runs[f"nested/{optimizer} lr={lr}"] = result.stats
    print(f"\n{name}: L-BFGS optimum {optimum:.4f} (batch total)")
    print(f"{'method':<26}{'evals→5%':>10}{'s→5%':>8}{'evals→1%':>10}{'s→1%':>8}")
    best = {}
    for label, stats in runs.items():
        r5, r1 = reach(stats, deq, loss, optimum, 0.05), reach(stats, deq, loss, optimum, 0.01)
        print(f"{label:<26}{r5[0]:>10}{r5[1]:>8.2f}{r1[0]:>10}{r1[1]:>8.2f}")
        family = label.split("/")[0]
        for key, value in (("e5", r5[0]), ("s5", r5[1]), ("e1", r1[0]), ("s1", r1[1])):
            best[family, key] = min(best.get((family, key), math.inf), value)
    for key, what in (("e5", "evaluations to 5%"), ("e1", "evaluations to 1%"),
                      ("s5", "wall time to 5%"), ("s1", "wall time to 1%")):
        j, n = best["jiio", key], best["nested", key]
        ratio = n / j if math.isfinite(j) and j > 0 else math.nan
        print(f"  best nested / best JIIO, {what}: {n:g} / {j:g} = {ratio:.1f}×")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=32, help="test digits per problem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train = mnist5k("train").tensors[0]
    test = mnist5k("test").tensors[0]
    epochs, n_train, budget = (1, 512, 200) if args.quick else (args.epochs, len(train), 800)
    n_test = 8 if args.quick else args.images
    start = time.perf_counter()
    decoder = train_decoder(train[:n_train], epochs, batch=64, latent=32, hidden=128)
    y = test[:n_test]
    result = jiio(decoder.deq, torch.zeros(n_test, 32), decoder.objective(y, prior=1e-2),
                  step_size=0.1, max_iter=100, tol=1e-4, grad_tol=1e-3)
    with torch.no_grad():
        mse = ((decoder(result.x) - y) ** 2).mean().item()
    print(f"decoder: {epochs} epoch(s) on {n_train} digits in {time.perf_counter() - start:.1f} s; "
          f"test reconstruction MSE per pixel {mse:.4f} (pixel variance {y.var().item():.4f})")
    mask = torch.ones_like(y)
    mask[..., 9:19, 9:19] = 0
    x0 = torch.zeros(n_test, 32)
    compare("inpainting (10×10 hidden)", decoder, decoder.objective(y, mask=mask, prior=1e-2), x0,
            budget, record_every=5)
    noisy = y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    compare("denoising (σ = 0.3)", decoder, decoder.objective(noisy, prior=1e-2), x0, budget,
            record_every=5)


if __name__ == "__main__":
    main()
