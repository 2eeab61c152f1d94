"""One script for every device-dependent code path of the kit, on one GPU in under 10 minutes.

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.md     # on a GPU machine (~5-10 min)
    python benchmarks/gpu_check.py --device cpu --quick              # what CI runs (<30 s, 1 thread)
    python benchmarks/gpu_check.py --only presets --batch 8          # one section, another batch

No code path of deqlite had run on a GPU when this was written. Everything here runs offline on
synthetic data generated in memory (no dataset, no download), so a GPU machine without network
only needs the working tree and its Python environment. Three sections:

1. ``device``: the device-dependent checks, written here (the test suite has no switch that sets
   its device: its trainer tests use ``device="auto"``, and its autocast tests hard-code "cpu"):
   bf16 and fp16 autocast training steps (fp16 with its gradient scaler; the weights stay float32,
   the forward really is in the low precision); an MDEQ's solve under bf16 autocast (the trainer's
   docstring says that on CUDA GroupNorm keeps its states float32); channels-last against NCHW
   (same first loss, convolutions stay NHWC); the IFT gradient on the device, in float64 and
   float32, against a float64 CPU reference; the solvers' convergence test every 1, 4 or 16
   evaluations (``check_every``: time and NFE, for its default); ``deqlite.memory.
   peak_cuda_bytes`` of the IFT backward against unrolled backprop (CUDA only); the ``DataLoader`` path (pinned memory on
   CUDA, ``non_blocking`` copies) against the in-memory path; a 2-process
   ``DistributedDataParallel`` run against one process on the global batch (NCCL with 2+ GPUs;
   on one GPU the two processes share it over Gloo, as NCCL refuses two ranks on one device, and
   NCCL itself is checked by a 1-process all-reduce; on CPU: Gloo); and, without ``--quick``, the
   suite's own trainer tests that run with ``device="auto"`` (so on the GPU when there is one),
   through pytest, with ``CUDA_VISIBLE_DEVICES=""`` for ``--device cpu``.
2. ``presets``: every preset in ``deqlite.train.configs.PRESETS`` (read when the script runs, so
   presets added later are covered; each gets a row, a preset that cannot build or step is a
   FAIL), at full size, on synthetic data of its dataset's shape (images: channels, size and
   classes; text: a Zipf token stream over the vocabulary's size, 267,735 words for WikiText-103),
   at the preset's per-GPU batch (its ``batch_size`` divided by the GPUs its docstring says the
   recipe used, e.g. "batch 128 (4 GPUs × 32)"; ``--batch`` overrides): one warm step, then
   ``--steps`` timed ``Trainer.train_step`` calls each in four variants: the DEQ (IFT backward;
   Jacobian regularization, if the preset has it, on every step) and its unrolled counterpart
   (the same model trained as in the warm-up: the cell applied ``deq.max_iter`` times, the
   forward solve's cap, and backpropagated through, no JR), each in float32 and under bf16
   autocast. Reported: images/s or tokens/s, peak CUDA memory (absolute, and above the weights
   and optimizer state: ``peak_cuda_bytes``), the DEQ's forward/backward NFE.
3. ``notebooks``: every notebook in fast mode (``DEQLITE_FAST=1``), copied into a temporary
   folder and executed there with nbclient (never over the committed notebooks; ``--jobs`` at a
   time), each one's time and pass/fail, and whether its first cell chose the device asked for.

``--quick`` shrinks the three: the cheaper device checks (DDP with two forked processes on CPU),
every preset's model shrunk by one rule (every integer option, nested ones included, capped at 8,
options named ``*heads``/``*groups`` at 2, the adaptive softmax's ``cutoffs`` rescaled into a
vocabulary of 64; images of at most 2^(downsample + branches - 1) pixels a side, at least 8; windows
of 8 tokens; batch 2) and one step per variant (a shrunk variant whose step diverges, NaN loss or
gradient, says so in its cell and passes: --quick checks that the code path runs; at full size a
divergence fails), and for the notebooks only a check that each one's device branch
(``device = "cuda" if torch.cuda.is_available() else "cpu"``) is there. The pytest run of the
suite's tests is skipped in --quick (its row says so).
What needs CUDA gets an explicit "skipped: needs CUDA" row on a CPU. Each section is timed; the
tables are markdown (``--out FILE`` writes them, with the machine, to a report). The exit status
is 1 when any check fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, TensorDataset

from bench_lm import WT103_VOCAB, zipf_stream  # noqa: E402  (benchmarks/bench_lm.py)
from deqlite import DEQ, MLPCell, solve
from deqlite.data import is_text
from deqlite.data.images import imagenet_transform
from deqlite.memory import peak_cuda_bytes
from deqlite.models import count_parameters
from deqlite.train import Trainer, TrainingDiverged, load_preset
from deqlite.train.configs import PRESETS
from deqlite.train.distributed import shutdown_distributed

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SECTIONS = ("device", "presets", "notebooks")

# The synthetic data's shape for each dataset, as deqlite.data loads it: (channels, size, classes)
# of the images (ImageNet: the crop of imagenet_transform), the vocabulary's size of the text
# (WikiText-103: benchmarks/bench_lm.py; WikiText-2: 33,278 words; stdlib_chars: 97 characters
# under Python 3.11, see the stdlib_char_lm preset). A preset's own n_classes / vocab_size wins.
# A dataset missing here fails its preset's row: add it.
IMAGE_SHAPES = {"mnist5k": (1, 28, 10), "mnist": (1, 28, 10), "digits": (1, 8, 10),
                "cifar10": (3, 32, 10),
                "imagenet": (3, inspect.signature(imagenet_transform).parameters["crop"].default,
                             1000)}
TEXT_VOCAB = {"wikitext103": WT103_VOCAB, "wikitext2": 33278, "stdlib_chars": 97}
SMALL, SMALL_VOCAB, SMALL_BATCH = 8, 64, 2            # --quick's shrink rule (module docstring)
DEVICE_BRANCH = re.compile(r"""device\s*=\s*["']cuda["']\s+if\s+torch\.cuda\.is_available\(\)""")
# The suite's tests that train with device="auto" (the GPU when there is one): run in section 1.
AUTO_DEVICE_TESTS = [
    "tests/train/test_distributed.py::test_mixed_precision_trains_on_cpu",
    "tests/train/test_distributed.py::test_channels_last_keeps_the_convolutions_in_nhwc",
    "tests/train/test_trainer.py::test_vision_options_train_and_resume_exactly",
    "tests/train/test_trainer.py::test_language_model_options_and_errors",
]


class Skip(Exception):
    """A check that does not apply here; its row says why."""


class Report:
    """The rows of every section, their times, and the markdown tables."""

    def __init__(self):
        self.rows: list[dict] = []
        self.tables: dict[str, list[str]] = {}
        self.section_seconds: dict[str, float] = {}

    def check(self, section: str, name: str, fn, *, cuda_only: bool = False) -> None:
        """Run one check: ``fn()`` returns a detail string; an exception fails it, ``Skip`` skips it."""
        start = time.perf_counter()
        try:
            if cuda_only and DEVICE.type != "cuda":
                raise Skip("needs CUDA")
            status, detail = "ok", fn() or ""
        except Skip as e:
            status, detail = f"skipped: {e}", ""
        except Exception as e:                               # noqa: BLE001 -- a row, not a crash
            status, detail = "FAIL", _one_line(e)
            traceback.print_exc(file=sys.stderr)
        self.add(section, name, status, time.perf_counter() - start, detail)

    def add(self, section: str, name: str, status: str, seconds: float, detail: str) -> None:
        self.rows.append(dict(section=section, name=name, status=status, seconds=seconds,
                              detail=detail))
        print(f"[{section}] {name}: {status} ({seconds:.1f} s) {detail}", flush=True)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "FAIL"]

    def markdown(self, header: str) -> str:
        out = [header, "", "| section | checks | ok | failed | skipped | time (s) |",
               "| --- | --- | --- | --- | --- | --- |"]
        sections = [s for s in SECTIONS
                    if s in self.section_seconds or any(r["section"] == s for r in self.rows)]
        for s in sections:
            rows = [r for r in self.rows if r["section"] == s]
            seconds = self.section_seconds.get(s, sum(r["seconds"] for r in rows))
            ok = sum(r["status"] == "ok" for r in rows)
            bad = sum(r["status"] == "FAIL" for r in rows)
            out.append(f"| {s} | {len(rows)} | {ok} | {bad} | {len(rows) - ok - bad} | "
                       f"{seconds:.1f} |")
        for s in sections:
            out += ["", f"## {s}", "", "| check | status | time (s) | detail |",
                    "| --- | --- | --- | --- |"]
            out += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {_cell(r['detail'])} |"
                    for r in self.rows if r["section"] == s]
            if s in self.tables:
                out += [""] + self.tables[s]
        return "\n".join(out) + "\n"


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


DEVICE = torch.device("cpu")     # set in main()
QUICK = False


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _free():
    if DEVICE.type == "cuda":           # (on a CPU gc.collect costs ~0.5 s a call: torch's heap)
        gc.collect()
        torch.cuda.empty_cache()


# --- 1. device-dependent checks ------------------------------------------------------------------

def images(n: int, channels: int, size: int, classes: int, seed: int = 0) -> TensorDataset:
    """n random images in [0, 1] and labels; the last class appears (the task counts classes as the
    largest label + 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[0] = classes - 1
    return TensorDataset(torch.rand(n, channels, size, size, generator=g), y)


TINY_DEQ = dict(solver="anderson", tol=1e-4, max_iter=30, on_fail="ignore")


def tiny_config(**overrides) -> dict:
    """A tiny DEQ classifier (conv stem, MLP cell) on 1×8×8 images, on the checked device."""
    return dict(dict(dataset="digits", model="deq_classifier", batch_size=16, epochs=1,
                     model_options=dict(channels=4, hidden=16, deq=TINY_DEQ),
                     eval_jacobian_samples=0, device=str(DEVICE)), **overrides)


def tiny_mdeq_config(**overrides) -> dict:
    return tiny_config(model="mdeq_classifier", **dict(dict(model_options=dict(
        channels=[8, 8], head_channels=[2, 2], final_channels=16, groups=4, expansion=2,
        downsample=0, deq=TINY_DEQ)), **overrides))


def check_amp(amp: str) -> str:
    data = images(32, 1, 8, 10)
    trainer = Trainer(tiny_config(amp=amp), data=(data, data))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.train_step()
    assert math.isfinite(record["loss"]), f"loss {record['loss']}"
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "weights left float32"
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.model.parameters())), \
        "no weight changed"
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    x = trainer.task.inputs(data.tensors[0][:4])
    with torch.no_grad(), trainer._autocast():
        out = trainer.model(x)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert out.dtype == want, f"logits under autocast are {out.dtype}, not {want}"
    return (f"loss {record['loss']:.3f}, NFE {record['fwd_nfe']}/{record['bwd_nfe']}, "
            f"logits {str(out.dtype).replace('torch.', '')}, scaler "
            f"{'on' if trainer.scaler.is_enabled() else 'off'}")


def check_mdeq_bf16() -> str:
    data = images(32, 3, 8, 10)
    trainer = Trainer(tiny_mdeq_config(amp="bf16"), data=(data, data))
    record = trainer.train_step()
    assert math.isfinite(record["loss"]), f"loss {record['loss']}"
    stats = trainer.deq.forward_stats
    dtype = str(stats.dtype).replace("torch.", "")
    detail = (f"solve in {dtype}, residual {record['residual']:.1e} after {record['fwd_nfe']} "
              f"iterations (tol {TINY_DEQ['tol']:g})")
    if DEVICE.type == "cuda":        # the trainer's docstring: GroupNorm keeps MDEQ's states fp32
        assert stats.dtype == torch.float32, f"the MDEQ's solve ran in {dtype}: {detail}"
    return detail


def check_channels_last() -> str:
    data = images(32, 3, 8, 10)
    losses = []
    for nhwc in (False, True):
        trainer = Trainer(tiny_mdeq_config(channels_last=nhwc), data=(data, data))
        losses.append(trainer.train_step()["loss"])
        convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    # a weight-normed conv recomputes its weight g·v/‖v‖ at every call: that weight comes out NCHW
    # (a note, not a failure: the convolution converts it, at some cost on a GPU)
    plain = [m for m in convs if not hasattr(m, "parametrizations")]
    flat = [m for m in plain if not m.weight.is_contiguous(memory_format=torch.channels_last)]
    assert not flat, f"{len(flat)} of {len(plain)} plain convolutions left channels-last"
    normed = [m for m in convs if hasattr(m, "parametrizations")
              and not m.weight.is_contiguous(memory_format=torch.channels_last)]
    rel = abs(losses[1] - losses[0]) / abs(losses[0])
    # on CUDA the two layouts run different conv kernels (TF32 by default in cuDNN): a loose bound
    assert rel < (1e-2 if DEVICE.type == "cuda" else 1e-4), f"first loss NCHW {losses[0]:.6f}, NHWC {losses[1]:.6f}"
    note = f"; note: {len(normed)} weight-normed convs compute an NCHW weight" if normed else ""
    return (f"{len(plain)} plain convs NHWC; first loss {losses[0]:.5f} vs {losses[1]:.5f} "
            f"(rel. {rel:.1e}){note}")


def _ift_grads(cell: MLPCell, x: torch.Tensor, tol: float) -> torch.Tensor:
    deq = DEQ(cell, solver="anderson", tol=tol, max_iter=300, backward_tol=tol,
              backward_max_iter=300, on_fail="raise")
    x = x.detach().requires_grad_(True)
    z = deq(x)
    loss = (z ** 2).sum() * z.sum() + z[:, 0].sin().sum()
    grads = torch.autograd.grad(loss, [x, *cell.parameters()])
    return torch.cat([g.flatten() for g in grads]).detach().cpu().double()


def check_ift_gradient() -> str:
    torch.manual_seed(0)
    cell = MLPCell(6, 32, weight_scale=0.8).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    reference = _ift_grads(cell, x, 1e-12)                            # CPU, float64
    errors = {}
    for dtype, tol, bound in ((torch.float64, 1e-12, 1e-9), (torch.float32, 1e-6, 1e-4)):
        g = _ift_grads(copy.deepcopy(cell).to(DEVICE, dtype), x.to(DEVICE, dtype), tol)
        errors[dtype] = ((g - reference).norm() / reference.norm()).item()
        assert errors[dtype] < bound, f"{dtype} on {DEVICE}: rel. error {errors[dtype]:.1e}"
    return (f"rel. error vs CPU float64: float64 {errors[torch.float64]:.1e}, float32 "
            f"{errors[torch.float32]:.1e}")


def check_stopping_test() -> str:
    """Anderson to rel. 1e-4 on the device with the convergence test every 1, 4 and 16
    evaluations (``check_every``): median time and NFE. On a GPU each test is a host sync that
    stalls the queue of kernels; the row says which period was fastest, for the default."""
    width, batch, repeats = (64, 8, 3) if QUICK else (2048, 512, 9)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(width, width, generator=g)
    W = (0.95 * W / torch.linalg.matrix_norm(W, ord=2)).to(DEVICE)
    u = torch.randn(batch, width, generator=g).to(DEVICE)
    z0 = torch.zeros(batch, width, device=DEVICE)
    rows = {}
    with torch.no_grad():
        for every in (1, 4, 16):
            def run(every=every):
                return solve(lambda z: torch.tanh(z @ W.T + u), z0, solver="anderson", tol=1e-4,
                             max_iter=300, m=6, check_every=every)[1]
            stats, times = run(), []
            for _ in range(repeats):
                _sync()
                start = time.perf_counter()
                run()
                _sync()
                times.append(time.perf_counter() - start)
            assert stats.all_converged, f"check_every {every}: {stats}"
            rows[every] = (statistics.median(times), stats.nfe)
    fastest = min(rows, key=lambda k: rows[k][0])
    return (f"width {width}, batch {batch}: " + ", ".join(
        f"check_every {k}: {t * 1e3:.2f} ms, {nfe} NFE" for k, (t, nfe) in rows.items())
        + f"; fastest: {fastest}")


def check_peak_cuda_bytes() -> str:
    torch.manual_seed(0)
    peaks = {}
    for backward in ("ift", "unrolled"):
        cell = MLPCell(256, 512, weight_scale=0.9).to(DEVICE)
        deq = DEQ(cell, solver="forward_iteration", tol=0, max_iter=30, backward=backward,
                  on_fail="ignore")
        x = torch.randn(512, 256, device=DEVICE)

        def step():
            deq(x).square().mean().backward()
        step()
        _, peaks[backward] = peak_cuda_bytes(step, device=DEVICE)
    assert 0 < peaks["ift"] < peaks["unrolled"], f"peaks {peaks}"
    return (f"30 iterations, width 512, batch 512: IFT {peaks['ift'] / 2**20:.1f} MB, unrolled "
            f"{peaks['unrolled'] / 2**20:.1f} MB ({peaks['unrolled'] / peaks['ift']:.1f}×)")


class NotInMemory(Dataset):
    """A TensorDataset in disguise: the trainer reads it through a DataLoader (as ImageNet's
    folders), with pinned memory on CUDA."""

    def __init__(self, data: TensorDataset):
        self.data = data
        self.classes = list(range(int(data.tensors[1].max()) + 1))     # as an ImageFolder has

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def check_loader() -> str:
    data = images(64, 3, 8, 10)
    workers = 0 if QUICK else 2
    direct = Trainer(tiny_mdeq_config(), data=(data, data))
    loaded = Trainer(tiny_mdeq_config(num_workers=workers), data=(NotInMemory(data), data))
    _, x, _ = loaded.batches(0)
    pinned = x.is_pinned()
    if DEVICE.type == "cuda":
        assert pinned, "the DataLoader's batch is not in pinned memory"
    losses = [t.train_step()["loss"] for t in (direct, loaded) for _ in range(2)]
    rel = 1e-4 if DEVICE.type == "cuda" else 1e-6            # (CUDA kernels: not bit for bit)
    assert losses[:2] == approx(losses[2:], rel), f"in memory {losses[:2]}, loader {losses[2:]}"
    return (f"{workers} worker(s), batch pinned: {pinned}; losses of 2 steps equal to the in-memory "
            f"path's ({losses[1]:.5f})")


def approx(values, rel=1e-5):
    class Approx(list):
        def __eq__(self, other):
            return len(other) == len(self) and all(
                abs(a - b) <= rel * max(abs(a), abs(b), 1e-12) for a, b in zip(self, other))
    return Approx(values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_config(device: str) -> dict:
    return tiny_config(device=device, batch_size=16, optimizer="sgd", lr=0.5, model_options=dict(
        channels=4, hidden=16, deq=dict(solver="anderson", tol=1e-6, max_iter=100, backward_tol=1e-6,
                                        backward_max_iter=100, on_fail="ignore")))


def _ddp_worker(rank: int, world: int, port: int, backend: str, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if backend == "gloo" and device.startswith("cuda"):       # two ranks on one GPU: deqlite would
        dist.init_process_group("gloo", rank=rank, world_size=world)   # pick NCCL, which refuses
    try:
        data = images(32, 1, 8, 10)
        trainer = Trainer(_ddp_config(device), data=(data, data))
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        torch.save(dict(model={k: v.cpu() for k, v in trainer.model.state_dict().items()},
                        losses=losses, backend=dist.get_backend(), world=trainer.place.world_size,
                        device=str(trainer.device)), Path(out) / f"rank{rank}.pt")
        shutdown_distributed(wait=True)
    except BaseException:
        shutdown_distributed(wait=False)
        raise


def check_ddp() -> str:
    gpus = torch.cuda.device_count() if DEVICE.type == "cuda" else 0
    backend, device = ("nccl", "cuda") if gpus >= 2 else ("gloo", "cuda:0") if gpus == 1 \
        else ("gloo", "cpu")
    if not dist.is_available() or not (dist.is_nccl_available() if backend == "nccl"
                                       else dist.is_gloo_available()):
        raise RuntimeError(f"torch.distributed with {backend} is not available")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_ddp_worker, args=(2, _free_port(), backend, device, out), nprocs=2,
                           start_method="fork" if DEVICE.type == "cpu" else "spawn")
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["world"] == 2 and r["backend"] == backend for r in ranks), ranks[0]["backend"]
    for name, p in ranks[0]["model"].items():
        assert torch.equal(p, ranks[1]["model"][name]), f"{name} differs between the ranks"
    data = images(32, 1, 8, 10)
    single = Trainer(_ddp_config(device), data=(data, data))
    losses = [single.train_step()["loss"] for _ in range(2)]
    worst = max((p.cpu() - ranks[0]["model"][k]).abs().max().item()
                for k, p in single.model.state_dict().items())
    assert worst < (1e-3 if gpus else 1e-5), f"DDP vs one process: max |Δθ| {worst:.1e}"   # TF32 convs
    assert ranks[0]["losses"] == approx(losses, rel=1e-3 if gpus else 1e-5), \
        (ranks[0]["losses"], losses)
    return (f"2 processes, {backend} on {ranks[0]['device']} / {ranks[1]['device']}: identical "
            f"weights; vs one process on the global batch max |Δθ| {worst:.1e}")


def _nccl_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    t = torch.full((4,), 3.0, device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    Path(out, "nccl").write_text(str(t.sum().item()))
    dist.destroy_process_group()


def check_nccl() -> str:
    if torch.cuda.device_count() >= 2:
        raise Skip("2+ GPUs: the DDP check runs on NCCL")
    if not dist.is_nccl_available():
        raise RuntimeError("torch.distributed has no NCCL backend")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_nccl_worker, args=(_free_port(), out), nprocs=1, start_method="spawn")
        total = float(Path(out, "nccl").read_text())
    assert total == 12.0, total
    return "1-process NCCL group: all_reduce on cuda:0 ok"


def check_auto_device_tests() -> str:
    if QUICK:
        raise Skip("--quick (pytest's start-up alone is ~10 s)")
    env = dict(os.environ, DEQLITE_FAST="1", OMP_NUM_THREADS="1")
    if DEVICE.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *AUTO_DEVICE_TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    last = (run.stdout.strip().splitlines() or [""])[-1]
    if run.returncode:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-2000:])
        raise RuntimeError(f"pytest exit {run.returncode}: {last}")
    return f"{len(AUTO_DEVICE_TESTS)} tests with device=\"auto\" (→ {DEVICE.type}): {last}"


def section_device(report: Report) -> None:
    s = "device"
    report.check(s, "bf16 autocast training step", lambda: check_amp("bf16"))
    report.check(s, "fp16 autocast + gradient scaler step", lambda: check_amp("fp16"))
    report.check(s, "MDEQ solve under bf16 autocast (fp32 states on CUDA)", check_mdeq_bf16)
    report.check(s, "channels-last vs NCHW (MDEQ)", check_channels_last)
    report.check(s, f"IFT gradient on {DEVICE.type} vs CPU float64", check_ift_gradient)
    report.check(s, "solver convergence test every 1/4/16 evaluations", check_stopping_test)
    report.check(s, "peak_cuda_bytes: IFT vs unrolled backward", check_peak_cuda_bytes,
                 cuda_only=True)
    report.check(s, "DataLoader path: pinned memory, non_blocking copies", check_loader)
    report.check(s, "DDP: 2 processes vs 1 on the global batch", check_ddp)
    report.check(s, "NCCL all_reduce", check_nccl, cuda_only=True)
    report.check(s, "suite's device=\"auto\" trainer tests (pytest)", check_auto_device_tests)


# --- 2. every preset -----------------------------------------------------------------------------

def per_gpu_batch(name: str, config: dict) -> tuple[int, str]:
    """The preset's batch on one GPU: its batch_size over the GPUs its docstring says the recipe
    used ("batch 128 (4 GPUs × 32)"), else its batch_size."""
    doc = importlib.import_module(f"deqlite.train.configs.{name}").__doc__ or ""
    m = re.search(r"batch\s+(\d+)\s+\((\d+)\s+GPUs", doc)
    if m and int(m[1]) == config["batch_size"] and int(m[2]) > 1:
        return config["batch_size"] // int(m[2]), f"{m[1]} over {m[2]} GPUs"
    return config["batch_size"], "the preset's"


def _shrink(key: str, value):
    """--quick's rule: every integer (nested ones too) capped at SMALL, *heads/*groups at 2."""
    cap = 2 if key.endswith(("heads", "groups")) else SMALL
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(value, cap) if value > 0 else value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in value):
        return [min(v, cap) if v > 0 else v for v in value]
    if isinstance(value, dict):
        return {k: _shrink(k, v) for k, v in value.items()}
    return value


def _rescale_cutoffs(cutoffs: list, vocab: int, small: int) -> list:
    out = []
    for c in cutoffs:
        out.append(min(small - len(cutoffs) + len(out), max(round(c * small / vocab),
                                                            (out[-1] + 1) if out else 1)))
    return out


def preset_setup(name: str, batch_override) -> dict:
    """The preset's config on synthetic data of its shape (shrunk with --quick)."""
    config = load_preset(name)
    options = config.setdefault("model_options", {})
    dataset = config["dataset"]
    text = is_text(dataset)
    batch, batch_source = per_gpu_batch(name, config)
    if batch_override:
        batch, batch_source = batch_override, "--batch"
    if QUICK:
        batch, batch_source = SMALL_BATCH, "--quick"
        options = _shrink("", options)
    steps = 1 if QUICK else ARGS.steps
    n_batches = steps + (0 if QUICK else 1)
    if text:
        if "vocab_size" in options:
            vocab = options["vocab_size"]
        elif dataset in TEXT_VOCAB:
            vocab = TEXT_VOCAB[dataset]
        else:
            raise KeyError(f"no vocabulary size for text dataset {dataset!r}: add it to TEXT_VOCAB "
                           f"in benchmarks/gpu_check.py")
        seq_len = config.get("seq_len", 128)
        if QUICK:
            full_vocab, vocab, seq_len = vocab, min(vocab, SMALL_VOCAB), min(seq_len, SMALL)
            if options.get("cutoffs"):
                options["cutoffs"] = _rescale_cutoffs(load_preset(name)["model_options"]["cutoffs"],
                                                      full_vocab, vocab)
            if "vocab_size" in options:
                options["vocab_size"] = vocab
            config["seq_len"] = seq_len
        stream = zipf_stream(vocab, batch * seq_len * (n_batches + 1) + 1)
        data, shape = (stream, stream), f"{vocab:,} tokens × {seq_len}"
        unit, per_step = "tok/s", batch * seq_len
    else:
        if dataset not in IMAGE_SHAPES and not {"in_channels", "image_size", "n_classes"} <= set(options):
            raise KeyError(f"no image shape for dataset {dataset!r}: add it to IMAGE_SHAPES in "
                           f"benchmarks/gpu_check.py")
        channels, size, classes = IMAGE_SHAPES.get(dataset, (None, None, None))
        channels = options.get("in_channels", channels)
        size = options.get("image_size", size)
        classes = options.get("n_classes", classes)
        if QUICK:
            branches = len(options["channels"]) if isinstance(options.get("channels"), list) else 1
            size = min(size, max(SMALL, 2 ** (options.get("downsample", 0) + branches - 1)))
            if "image_size" in options:
                options["image_size"] = size
        ds = images(batch * n_batches, channels, size, classes)
        data, shape = (ds, ds), f"{channels}×{size}×{size}, {classes} classes"
        unit, per_step = "img/s", batch
    config.update(model_options=options, batch_size=batch, device=str(DEVICE), log_path=None,
                  checkpoint_path=None, eval_jacobian_samples=0, max_steps=None, epochs=1,
                  num_workers=0)
    return dict(config=config, data=data, shape=shape, batch=batch, batch_source=batch_source,
                unit=unit, per_step=per_step, steps=steps, text=text)


def run_variant(setup: dict, *, unrolled: bool, amp: str) -> dict:
    config = copy.deepcopy(setup["config"])
    config["amp"] = amp
    max_iter = config["model_options"].get("deq", {}).get("max_iter", 50)   # DEQ's default cap
    if unrolled:
        config.update(pretrain_steps=10 ** 9, pretrain_depth=max_iter, jac_reg_weight=0.0,
                      pretrain_jac_reg_weight=0.0)
    else:
        config.update(pretrain_steps=0, jac_reg_prob=1.0, jac_reg_ramp_steps=0,
                      jac_reg_stop_epoch=None)
    trainer = Trainer(config, data=setup["data"])
    if unrolled and trainer.deq is None:
        raise Skip("an explicit model")
    if not QUICK:
        trainer.train_step()                                 # warm-up: allocator, kernels
    records = []

    def steps():
        for _ in range(setup["steps"]):
            records.append(trainer.train_step())

    start = time.perf_counter()
    try:
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEVICE)
            _, above = peak_cuda_bytes(steps, device=DEVICE)
            peak = torch.cuda.max_memory_allocated(DEVICE)
        else:
            steps()
            above = peak = None
    except TrainingDiverged as e:
        if not QUICK:
            raise
        # --quick checks that the code path runs: a shrunk model (width 8) may blow up where the
        # real one does not; its cell says so, the full-size run fails on it
        m = re.search(r"the [a-z ]+ is \S+", str(e))
        return f"ran; diverged at width {SMALL} ({m[0] if m else 'TrainingDiverged'})"
    _sync()
    seconds = time.perf_counter() - start
    bad = [r["loss"] for r in records if not math.isfinite(r["loss"])]
    if bad:
        raise FloatingPointError(f"loss {bad[0]}")
    out = dict(rate=setup["per_step"] * setup["steps"] / seconds, peak=peak, above=above,
               nfe=(records[-1]["fwd_nfe"], records[-1]["bwd_nfe"]),
               params=count_parameters(trainer.model), depth=max_iter,
               jr=bool(config.get("jac_reg_weight")) and not unrolled)
    del trainer, records
    _free()
    return out


VARIANTS = [("DEQ fp32", False, "none"), ("DEQ bf16", False, "bf16"),
            ("unrolled fp32", True, "none"), ("unrolled bf16", True, "bf16")]


def _fmt(result, unit: str) -> str:
    if isinstance(result, str):
        return result
    text = f"{result['rate']:,.0f} {unit}" if result["rate"] >= 10 else f"{result['rate']:.2f} {unit}"
    if result["peak"] is not None:
        text += f", {result['peak'] / 2**30:.2f} GB ({result['above'] / 2**30:.2f} above weights)"
    if result["nfe"][1] is not None:                       # (unrolled: no solve, no NFE)
        text += f", NFE {result['nfe'][0]}/{result['nfe'][1]}"
    return text


def section_presets(report: Report) -> None:
    head = ["preset", "data (synthetic)", "batch", "parameters"] + [v[0] for v in VARIANTS]
    table = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in PRESETS:
        if ARGS.presets and name not in ARGS.presets:
            continue
        start = time.perf_counter()
        cells, status, problems = [], "ok", []
        try:
            setup = preset_setup(name, ARGS.batch)
        except Exception as e:                                # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            report.add("presets", name, "FAIL", time.perf_counter() - start,
                       f"setup: {_one_line(e)}")
            table.append(f"| {name} | FAIL: {_cell(_one_line(e))} |" + " |" * (len(head) - 2))
            continue
        params, depth, jr = None, None, False
        for label, unrolled, amp in VARIANTS:
            try:
                r = run_variant(setup, unrolled=unrolled, amp=amp)
                if isinstance(r, str):                      # --quick: diverged, said so
                    cells.append(r)
                    continue
                params, depth, jr = params or r["params"], r["depth"], jr or r["jr"]
                cells.append(_fmt(r, setup["unit"]))
            except Skip as e:
                cells.append(f"skipped: {e}")
            except Exception as e:                            # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                status = "FAIL"
                problems.append(f"{label}: {_one_line(e)}")
                cells.append("FAIL: " + _one_line(e)[:120])
                _free()
        extra = "; JR on every step" if jr else ""
        detail = "; ".join(problems) or (f"{setup['shape']}, batch {setup['batch']}, unrolled "
                                         f"depth {depth}{extra} (numbers: the table below)")
        report.add("presets", name, status, time.perf_counter() - start, detail)
        row = [name, setup["shape"], f"{setup['batch']} ({setup['batch_source']})",
               f"{params:,}" if params else "-", *cells]
        table.append("| " + " | ".join(_cell(c) for c in row) + " |")
    note = ("DEQ: IFT backward, pretrain_steps=0, Jacobian regularization on every step where the "
            "preset has it; unrolled: every step a warm-up step, the cell applied deq.max_iter "
            "times (the forward solve's cap) and backpropagated through, no JR. "
            + ("--quick: models shrunk (module docstring), one step, CPU timings are not "
               "comparable." if QUICK else
               f"One warm step, then the median-free mean over {ARGS.steps} timed steps; memory: "
               f"torch.cuda.max_memory_allocated over them, and peak_cuda_bytes (above the "
               f"weights and optimizer state)."))
    report.tables["presets"] = [note, ""] + table


# --- 3. notebooks --------------------------------------------------------------------------------

def notebook_paths() -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in paths if not ARGS.notebooks or p.name[:2] in ARGS.notebooks]


def check_device_branch(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]              # json: nbformat takes ~2 s to import
    for i, cell in enumerate(cells):
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and DEVICE_BRANCH.search(source):
            return f"device branch in cell {i}"
    raise AssertionError("no `device = \"cuda\" if torch.cuda.is_available() else \"cpu\"` cell")


def run_notebook(path: Path, folder: Path, timeout: int) -> str:
    import nbformat
    from nbclient import NotebookClient
    work = folder / path.stem
    work.mkdir()
    target = work / path.name
    shutil.copy(path, target)
    nb = nbformat.read(target, as_version=4)
    client = NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, target)
    said = next((o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if "device=" in o.get("text", "")), "")
    m = re.search(r"device=(\w+)", said)
    chose = m[1] if m else None
    if chose is not None and chose != DEVICE.type:
        raise AssertionError(f"the notebook chose device={chose}, not {DEVICE.type}")
    kept = f"; executed copy kept in {target}" if ARGS.keep_notebooks else ""
    return f"device={chose or '(not printed)'}{kept}"


def section_notebooks(report: Report) -> None:
    s = "notebooks"
    paths = notebook_paths()
    if not paths:
        report.add(s, "notebooks/", "FAIL", 0.0, "no notebooks found")
        return
    if QUICK:
        for path in paths:
            report.check(s, f"{path.name}: device branch", lambda p=path: check_device_branch(p))
        return
    saved = {k: os.environ.get(k) for k in ("DEQLITE_FAST", "CUDA_VISIBLE_DEVICES")}
    os.environ["DEQLITE_FAST"] = "1"                 # the kernels inherit the environment
    if DEVICE.type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""      # the notebooks' device branch then says cpu
    folder = Path(ARGS.keep_notebooks or tempfile.mkdtemp(prefix="deqlite-gpu-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        def timed(path):
            start = time.perf_counter()
            try:
                return path, "ok", run_notebook(path, folder, ARGS.cell_timeout), \
                    time.perf_counter() - start
            except Exception as e:                    # noqa: BLE001
                return path, "FAIL", _one_line(e), time.perf_counter() - start
        with concurrent.futures.ThreadPoolExecutor(ARGS.jobs) as pool:
            for path, status, detail, seconds in pool.map(timed, paths):
                report.add(s, path.name, status, seconds, detail)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
        if not ARGS.keep_notebooks:
            shutil.rmtree(folder, ignore_errors=True)


# --- main ----------------------------------------------------------------------------------------

def machine() -> str:
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        where = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} GPU(s)"
    else:
        where = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device "
            f"{DEVICE} ({where}), Python {platform.python_version()}")


ARGS = argparse.Namespace(steps=3, batch=None, jobs=1, cell_timeout=600, keep_notebooks=None,
                          presets=None, notebooks=None)


def main(argv=None) -> int:
    global DEVICE, QUICK, ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="shrunk checks, one step per shrunk preset, notebooks' device branch "
                             "only (what CI runs with --device cpu)")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable)")
    parser.add_argument("--out", type=Path, help="write the markdown report to this file")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per preset variant")
    parser.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                        help="only these presets (default: every one in PRESETS)")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NN",
                        help="only these notebooks, by number, e.g. 03 10 (default: all)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch for every preset (default: the preset's per-GPU batch)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks executed at once (default: 4 on cuda, 1 on cpu)")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per notebook cell")
    parser.add_argument("--keep-notebooks", type=Path, default=None,
                        help="execute the notebook copies in this folder and keep them")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ARGS = args = parser.parse_args(argv)
    unknown = sorted(set(args.presets or ()) - set(PRESETS))
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; the presets: {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (torch.cuda.is_available() is False); run with "
              "--device cpu for the CPU checks.", file=sys.stderr)
        return 2
    DEVICE = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    QUICK = args.quick
    args.jobs = args.jobs or (4 if DEVICE.type == "cuda" else 1)
    header = (f"# gpu_check: {'--quick ' if QUICK else ''}--device {args.device}\n\n"
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(header, flush=True)
    report = Report()
    total = time.perf_counter()
    for name, fn in (("device", section_device), ("presets", section_presets),
                     ("notebooks", section_notebooks)):
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        fn(report)
        report.section_seconds[name] = time.perf_counter() - start
    text = report.markdown(header + f"; total {time.perf_counter() - total:.1f} s")
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if report.failed:
        print(f"{len(report.failed)} check(s) failed: "
              + ", ".join(f"{r['section']}/{r['name']}" for r in report.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
