"""Benchmark of Jacobian regularization and the Jacobian diagnostics.

    .venv/bin/python benchmarks/bench_jacobian.py            # the MNIST preset's model, batch 64
    .venv/bin/python benchmarks/bench_jacobian.py --quick    # small sizes, a few seconds

1. Time JR adds to a training step (forward + backward + optimizer step) of the ``mnist`` preset's
   DEQClassifier at fixed solver effort (tol = 0: every solve runs exactly max_iter steps, so the
   only difference is the regularizer), for M = 1, 2, 4 Hutchinson probes; ratio to the same step
   without JR, measured in the same process, steps interleaved.
2. Estimator accuracy and cost on the same model at z*: Hutchinson with M probes vs the exact
   ‖J‖²_F / d, and Arnoldi's spectral radius at n_iter = 10, 20, 40 vs ``torch.linalg.eigvals``
   of the exact Jacobian, beside the plain power method's |Rayleigh quotient|.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from deqlite.deq import equilibrium
from deqlite.jacobian import (exact_jacobian, hutchinson_frobenius, spectral_radius)
from deqlite.models import build_model
from deqlite.train import load_preset


def make_model(hidden, max_iter):
    options = dict(load_preset("mnist")["model_options"], hidden=hidden)
    options["deq"] = dict(options["deq"], tol=0.0, max_iter=max_iter, backward_tol=0.0,
                          backward_max_iter=max_iter)
    torch.manual_seed(0)
    return build_model("deq_classifier", in_channels=1, image_size=28, **options)


def bench_step_time(hidden, batch, max_iter, repeats):
    model = make_model(hidden, max_iter)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step(probes):
        start = time.perf_counter()
        with model.deq.options(jac_probes=probes):
            loss = F.cross_entropy(model(x), y)
        if probes:
            loss = loss + 1.0 * model.deq.jac_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    settings = [0, 1, 2, 4]
    for p in settings:                       # warm-up
        step(p)
    times = {p: [] for p in settings}
    for _ in range(repeats):                 # interleaved, so drifts in machine load hit all alike
        for p in settings:
            times[p].append(step(p))
    base = statistics.median(times[0])
    print(f"\n## Time per training step with JR (mnist preset model, hidden {hidden}, batch {batch}, "
          f"forward and adjoint solves fixed at {max_iter} Anderson steps)\n")
    print("| probes M | median step (ms) | ratio to no JR |")
    print("| --- | --- | --- |")
    for p in settings:
        t = statistics.median(times[p])
        print(f"| {p or 'no JR'} | {t * 1e3:.1f} | {t / base:.2f} |")


def power_method(J, n_iter):
    v = torch.randn(J.shape[-1], dtype=J.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(n_iter):
        v = J @ v
        v = v / v.norm()
    return (v @ J @ v).abs()


def bench_estimators(hidden, batch):
    model = make_model(hidden, 60).double()
    model.deq.forward_solver = dataclasses.replace(model.deq.forward_solver, tol=1e-8)
    torch.manual_seed(1)
    with torch.no_grad():                    # a model one would diagnose: W grown past 1
        model.cell.W.weight.mul_(1.6 / torch.linalg.matrix_norm(model.cell.W.weight, ord=2))
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    _, f, z = equilibrium(model, x)
    start = time.perf_counter()
    J = exact_jacobian(f, z)
    exact_rho = torch.linalg.eigvals(J).abs().max(dim=1).values
    t_exact = time.perf_counter() - start
    exact_fro = J.square().sum((1, 2)) / J.shape[-1]
    print(f"\n## Estimators at z* (mnist preset model in float64, hidden {hidden}, batch {batch}, "
          f"‖W‖₂ = 1.6); exact Jacobian + eigvals: {t_exact * 1e3:.0f} ms\n")
    print("| estimate | max rel. error over the batch | time (ms) |")
    print("| --- | --- | --- |")
    z_in = z.detach().requires_grad_()
    f_z = f(z_in)
    for kind in ("gaussian", "rademacher"):
        for m in (1, 4, 16):
            g = torch.Generator().manual_seed(m)
            start = time.perf_counter()
            est = hutchinson_frobenius(f_z, z_in, n_probes=m, kind=kind, generator=g)
            t = time.perf_counter() - start
            err = ((est - exact_fro).abs() / exact_fro).max().item()
            print(f"| ‖J‖²_F/d, Hutchinson {kind} M={m} | {err:.1%} | {t * 1e3:.1f} |")
    for n_iter in (10, 20, 40):
        start = time.perf_counter()
        rho = spectral_radius(f, z, n_iter=n_iter, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter() - start
        err = ((rho - exact_rho).abs() / exact_rho).max().item()
        print(f"| ρ(J), Arnoldi n_iter={n_iter} | {err:.1%} | {t * 1e3:.1f} |")
    for n_iter in (40, 200):
        start = time.perf_counter()
        rho = torch.stack([power_method(J[i], n_iter) for i in range(batch)])
        t = time.perf_counter() - start
        err = ((rho - exact_rho).abs() / exact_rho).max().item()
        signed = ((rho - exact_rho) / exact_rho).mean().item()
        print(f"| ρ(J), power method n_iter={n_iter} (on the exact J) | {err:.1%} "
              f"(mean {signed:+.1%}) | {t * 1e3:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    hidden, batch = (32, 16) if args.quick else (128, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    bench_step_time(hidden, batch, max_iter=5 if args.quick else 15,
                    repeats=3 if args.quick else args.repeats)
    bench_estimators(hidden, 8 if args.quick else 32)


if __name__ == "__main__":
    main()
