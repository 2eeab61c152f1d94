"""Peak training memory of the gradient rules as the depth (solver iterations) grows.

    .venv/bin/python benchmarks/bench_memory.py            # tanh and conv cells, depth 5-80: ~5 minutes
    .venv/bin/python benchmarks/bench_memory.py --quick    # tanh cell, depth 5-20: ~1 minute

A training step (forward solve, loss, backward) of a DEQ whose forward solve runs exactly n
iterations (tol = 0, max_iter = n; IFT's adjoint solve too), for n = 5, 10, 20, 40, 80, with each
gradient rule: IFT (forward-iteration and Anderson solves), backprop through the unrolled solver
(forward iteration and Anderson), and the shortcuts JFB, phantom (k 5) and Neumann (k 5). Two cells:

* ``tanh``: ``MLPCell`` width 256, batch 64 (the cell of ``bench_solvers.py``), ‖W‖₂ = 0.9;
* ``conv``: ``ConvCell`` (MDEQ's residual block, GroupNorm, weight norm), 16 channels at 32×32,
  batch 16 (CIFAR-10-sized feature maps).

Two numbers per step, each in a fresh process (so no allocator cache from an earlier run hides
an allocation):

* saved: the bytes autograd keeps for the backward pass (``deqlite.memory.saved_tensor_bytes``),
  exact and deterministic;
* peak: the rise of the process' peak resident memory during the step above its resident memory
  just before it (Linux: ``/proc/self/clear_refs`` resets the high-water mark VmHWM), which also
  counts the solvers' work buffers and the backward pass' temporaries. On a CUDA machine
  (``--device cuda``) it is ``torch.cuda.max_memory_allocated`` instead (``peak_cuda_bytes``).
  Before it, a tiny step (one sample, depth 2) starts autograd's threads and loads the kernels,
  one-time costs (tens of MB) that are not training memory.

Baseline: IFT with forward iteration at the same depth. One CPU thread. (Time per step is
``bench_solvers.py``'s subject; the allocator settings used here, below, slow steps down.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

RULES = [  # label, DEQ keyword arguments
    ("ift, forward_iteration", dict(backward="ift", solver="forward_iteration")),
    ("ift, anderson", dict(backward="ift", solver="anderson")),
    ("unrolled, forward_iteration", dict(backward="unrolled", solver="forward_iteration")),
    ("unrolled, anderson", dict(backward="unrolled", solver="anderson")),
    ("jfb", dict(backward="jfb", solver="anderson")),
    ("phantom (k 5, tau 0.5)", dict(backward="phantom", solver="anderson",
                                    backward_options={"k": 5, "tau": 0.5})),
    ("neumann (k 5)", dict(backward="neumann", solver="anderson", backward_options={"k": 5})),
]


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def build(spec: dict):
    """``(deq, x, step)`` for one configuration; ``step()`` runs a training step and returns the
    bytes autograd saved for its backward pass."""
    from deqlite import DEQ, MLPCell
    from deqlite.cells import ConvCell
    from deqlite.memory import saved_tensor_bytes
    torch.manual_seed(0)
    if spec["cell"] == "tanh":
        cell, x = MLPCell(256, 256, weight_scale=0.9), torch.randn(64, 256)
    else:
        cell, x = ConvCell(3, 16), torch.randn(16, 3, 32, 32)
    cell, x = cell.to(spec["device"]), x.to(spec["device"])
    n = spec["depth"]
    deq = DEQ(cell, tol=0.0, max_iter=n, backward_tol=0.0, backward_max_iter=n, **spec["options"])

    def step():
        deq.zero_grad(set_to_none=True)
        z, saved = saved_tensor_bytes(deq, x)
        (z ** 2).mean().backward()
        return saved
    return deq, x, step


def child(spec: dict) -> dict:
    """Saved and peak bytes of one training step, in this (fresh) process."""
    from deqlite.memory import peak_cuda_bytes
    torch.set_num_threads(1)
    deq, x, step = build(spec)
    warm = build(dict(spec, depth=2))[0]
    (warm(x[:1]) ** 2).mean().backward()        # one tiny step: kernels, autograd's threads
    if spec["device"] == "cuda":
        saved, peak = peak_cuda_bytes(step)
    else:
        Path("/proc/self/clear_refs").write_text("5")      # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        saved = step()
        peak = (_status_kb("VmHWM") - before) * 1024
    return dict(saved=saved, peak=peak)


def run_child(spec: dict) -> dict:
    # a fixed mmap threshold: every large tensor gets its own mapping, returned to the system
    # when freed, so resident memory follows the live tensors (glibc's default raises the
    # threshold after frees and keeps freed memory in its heap)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(cell: str, depths: list, device: str) -> None:
    results = {label: [run_child(dict(cell=cell, depth=n, options=options, device=device))
                       for n in depths] for label, options in RULES}
    base = results[RULES[0][0]]
    mb = 2 ** 20
    what = ("MLPCell width 256, batch 64" if cell == "tanh"
            else "ConvCell 16 channels, 32×32, batch 16")
    print(f"\n### {cell} cell ({what}): peak memory of one training step (MB), "
          f"saved for backward in brackets; ratio of the peak to IFT's at depth {depths[-1]}\n")
    print("| rule | " + " | ".join(f"depth {n}" for n in depths) + f" | peak vs IFT at {depths[-1]} |")
    print("| --- " * (len(depths) + 2) + "|")
    for label, rows in results.items():
        cells = " | ".join(f"{r['peak'] / mb:.1f} ({r['saved'] / mb:.1f})" for r in rows)
        print(f"| {label} | {cells} | {rows[-1]['peak'] / base[-1]['peak']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tanh cell only, depths 5, 10, 20")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("the CPU peak needs Linux's /proc/self/clear_refs; on a GPU use --device cuda.")
    kind = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS rise (VmHWM)"
    print(f"torch {torch.__version__}, device {args.device}, float32, 1 thread; peak = {kind}")
    depths = [5, 10, 20] if args.quick else [5, 10, 20, 40, 80]
    for cell in ["tanh"] if args.quick else ["tanh", "conv"]:
        table(cell, depths, args.device)


if __name__ == "__main__":
    main()
