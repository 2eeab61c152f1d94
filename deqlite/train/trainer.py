"""One training loop for every task: optimizer and schedule, progress bar, metrics, a JSONL log,
atomic checkpoints and exact resume; on one CPU, one GPU, or many GPUs and machines.

The loop knows nothing of the task (``deqlite.train.tasks``: images or text answer what it needs)
and little of the DEQ (``deqlite.train.deq_hooks``: the warm-up, the Jacobian regularizer's
schedule and the solver's numbers). A step reads straight: the batch of step k, the step's
seed, the DEQ's knobs for this step, forward, loss (+ γ_t · ‖J‖²_F / d when regularized),
backward, clip, optimizer and schedule, one record.

Records: every training step logs its loss and the task's quality (accuracy; or bits per token
and perplexity), ``lr``, throughput, for a DEQ the forward NFE (solving z* = f(z*, x)), backward
NFE (solving the adjoint g = Jᵀ g + ∂ℓ/∂z*), the final relative residual, and ``jac_weight`` (γ_t)
and ``jac_loss`` (the estimate, when applied). Evaluations (every ``eval_every`` steps, or at the
end of each epoch) log the held-out loss and quality, the mean forward NFE, and ρ(J) and
‖J‖²_F / d at z* on the first ``eval_jacobian_samples`` held-out examples.

At scale (the vision recipes):
* ``amp="bf16"`` / ``"fp16"``: the model's forward runs under ``torch.autocast`` (fp16 with a
  gradient scaler); the loss is taken in float32, the weights stay float32. The solver keeps the
  state's dtype: on CUDA, autocast runs GroupNorm in float32, so cells that end in it (MDEQ's)
  keep float32 states; a cell whose output is rounded to bf16 (on CPU) cannot get its relative
  residual much below ~2e-3, so give its DEQ a tol of that order.
* ``channels_last``: conv weights and input images in NHWC memory layout (faster convs on GPUs).
* ``grad_clip``: clip the gradient's global norm (the MDEQ recipes do); ``grad_norm`` is logged.
* Datasets read from disk (ImageNet) stream through a ``DataLoader`` with ``num_workers`` worker
  processes (pinned memory on CUDA); in-memory ones are indexed directly.
* Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains on its part of
  each global batch -- ``batch_size`` is the *global* batch, each of W processes gets
  batch_size / W -- inside ``DistributedDataParallel``, which averages the gradients: the W
  processes take the step one process would take on the whole batch (``deqlite.train.distributed``).
  Logged numbers are combined over the processes (mean loss and accuracy, largest NFE and
  residual); evaluation is split between them and summed (ρ(J) on rank 0). Only rank 0 writes the
  log and checkpoints and shows the progress bar.

Determinism and resume: the model is initialised from ``seed``; the examples of step k and their
random augmentation are a function of (seed, k) (``deqlite.data.batches``), and the step's own
random draws (dropout masks, Hutchinson probes) come from torch's generator seeded by
(seed, k, rank). A checkpoint holds the model, optimizer, schedule, gradient scaler and step, so
a run resumed from it -- at any step, in-memory or streamed data, with any ``num_workers`` -- ends
exactly where the uninterrupted run ends, given the same number of processes (on a GPU, up to the
nondeterminism of some CUDA kernels). With another number of processes it goes on, but not bit
for bit. A text run resumes exactly on the same token stream: for ``stdlib_chars``, under the
same Python version. The command line is ``python -m deqlite.train`` (``deqlite.train.__main__``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._files import atomic_save
from .._validate import lookup
from ..models import MODELS, build_model
from . import deq_hooks
from .config import AMP, OPTIMIZERS, TrainConfig
from .distributed import Place, all_reduce, init_distributed, resolve_device
from .log import append_done, append_record, truncate_log
from .tasks import task_for


class Trainer:
    """Holds a model, its task (data) and optimizer, and trains it with ``fit()``.

    ``fit()`` can be interrupted (Ctrl-C / the notebook's stop button) and called again: it goes on
    from the step it reached, after saving a checkpoint if ``checkpoint_path`` is set.
    Under torchrun, build one Trainer in every process (``python -m deqlite.train`` does).
    ``data``: the (train, held-out) datasets to train on instead of loading ``config.dataset``
    (which still says what kind of task it is), e.g. synthetic ones for a benchmark.
    """

    def __init__(self, config: TrainConfig | dict, *, data: Optional[tuple] = None):
        self.config = c = TrainConfig.coerce(config)
        self.place = Place.from_env()
        self.device = resolve_device(c.device, self.place)
        init_distributed(self.place, self.device)
        torch.manual_seed(c.seed)
        self.task = task_for(c)(c, self.place, self.device, data=data)
        self.batches = self.task.train_batches()
        self.model = self._build_model()
        self.deq = deq_hooks.model_deq(self.model)         # None for an explicit model
        self.module = self.task.module(self.model)         # what a step calls (and DDP wraps)
        self.ddp = None if self.place.world_size == 1 else DistributedDataParallel(
            self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = lookup(OPTIMIZERS, c.optimizer, "optimizer")(
            self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, **c.optimizer_options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = min(c.max_steps or math.inf, c.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self._decay(s))
        self.step = 0
        self.history: list[dict] = []

    @property
    def train_set(self):
        return self.task.train_set

    @property
    def test_set(self):
        """The held-out split evaluated during training ("test"; for text "valid")."""
        return self.task.test_set

    def _build_model(self) -> torch.nn.Module:
        """The model, told the data's shape (the options of it that it takes; the config's
        ``model_options`` win), on the device, in channels-last layout if asked."""
        c = self.config
        options = self.task.model_options(lookup(MODELS, c.model, "model"))
        model = build_model(c.model, **options).to(self.device)
        return model.to(memory_format=torch.channels_last) if c.channels_last else model

    def _decay(self, step: int) -> float:
        """The learning rate's factor at `step`: cosine from 1 to lr_min / lr, or constant."""
        c = self.config
        if c.schedule != "cosine":
            return 1.0
        floor = c.lr_min / c.lr
        return floor + (1 - floor) * 0.5 * (
            1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def _autocast(self):
        dtype = AMP[self.config.amp]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type,
                                                                              dtype=dtype)

    def _deq_options(self, **knobs):
        """The DEQ's knobs for one step (nothing for an explicit model)."""
        return contextlib.nullcontext() if self.deq is None else self.deq.options(**knobs)

    def _all_reduce(self, values: list, op: str) -> list:
        return all_reduce(values, op, self.place, self.device)

    def jac_weight(self, step: int) -> float:
        """γ_t at `step` (``deq_hooks.jac_weight``)."""
        return deq_hooks.jac_weight(self.config, step, self.steps_per_epoch)

    def train_step(self) -> dict:
        """One optimizer step on the next (global) batch; returns its metrics record, combined
        over the processes."""
        c = self.config
        epoch, x, y = self.batches(self.step)
        x, y = self.task.inputs(x), y.to(self.device, non_blocking=True)
        torch.manual_seed(deq_hooks.step_seed(c, self.step, self.place.rank))
        warm_up = self.step < c.pretrain_steps
        depth, gamma = deq_hooks.warm_up_depth(c, self.step), self.jac_weight(self.step)
        regularize = self.deq is not None and deq_hooks.jac_reg_now(c, self.step, gamma)
        probes = c.jac_reg_probes if regularize else 0
        start = time.perf_counter()
        self.model.train()
        with self._deq_options(pretrain_steps=depth, jac_probes=probes), self._autocast():
            out = self.task.forward(self.module if self.ddp is None else self.ddp, x, y)
        loss, acc = self.task.loss(out, y)
        jac_loss = self.deq.jac_loss if probes else None
        total = loss if jac_loss is None else loss + gamma * jac_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()          # DDP averages the gradients over processes here
        grad_norm = None
        if c.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).item()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        solver = deq_hooks.solver_metrics(self.deq, depth)
        mean_loss, acc, mean_jac = self._all_reduce(
            [loss.item(), acc, jac_loss.item() if jac_loss is not None else None], "sum")
        fwd_nfe, bwd_nfe, residual = self._all_reduce(
            [solver["fwd_nfe"], solver["bwd_nfe"], solver["residual"]], "max")
        fwd_nfe, bwd_nfe = (None if n is None else int(n) for n in (fwd_nfe, bwd_nfe))
        w, elapsed = self.place.world_size, time.perf_counter() - start
        return dict(split="train", step=self.step, epoch=epoch, loss=mean_loss / w,
                    **self.task.quality(mean_loss / w, acc / w if acc is not None else None),
                    lr=lr, pretrain=warm_up,
                    **self.task.speed(y, w, elapsed),
                    jac_weight=gamma if c.jac_reg_weight or c.pretrain_jac_reg_weight else None,
                    jac_loss=mean_jac / w if mean_jac is not None else None,
                    grad_norm=grad_norm, fwd_nfe=fwd_nfe, bwd_nfe=bwd_nfe,
                    residual=residual)

    @torch.no_grad()
    def evaluate(self, batch_size: Optional[int] = None, *, split: Optional[str] = None) -> dict:
        """Loss and quality on the held-out split (images: "test"; text: "valid", every token
        scored once, the record saying ``eval_split="valid"``), the mean forward NFE and worst
        residual for a DEQ, and ρ(J), ‖J‖²_F / d. With several processes each evaluates its share
        and the sums are combined. ``split`` scores another split of the dataset instead (e.g.
        text's "test" at the end; ``limit_test`` applies)."""
        c = self.config
        own = split in (None, self.task.held_out)
        dataset = self.test_set if own else self.task.load(split, c.limit_test)
        self.model.eval()
        depth = deq_hooks.warm_up_depth(c, self.step)
        loss = correct = count = nfe = batches = 0.0
        residual: Optional[float] = -math.inf
        start = time.perf_counter()
        with self._deq_options(pretrain_steps=depth):
            for x, y in self.task.eval_batches(dataset, batch_size or c.eval_batch_size):
                x, y = self.task.inputs(x), y.to(self.device, non_blocking=True)
                with self._autocast():
                    out = self.task.forward(self.module, x, y)
                batch_loss, batch_correct = self.task.eval_sums(out, y)
                loss, correct, count = loss + batch_loss, correct + batch_correct, count + y.numel()
                m = deq_hooks.solver_metrics(self.deq, depth)
                nfe = nfe + m["fwd_nfe"] if m["fwd_nfe"] is not None and nfe is not None else None
                residual = None if m["residual"] is None or residual is None \
                    else max(residual, m["residual"])
                batches += 1
        loss, correct, count, nfe, batches = self._all_reduce([loss, correct, count, nfe, batches], "sum")
        (residual,) = self._all_reduce([residual if residual != -math.inf else None], "max")
        seconds = time.perf_counter() - start
        n = c.eval_jacobian_samples
        with self._deq_options(pretrain_steps=depth):
            jacobian = deq_hooks.jacobian_metrics(self.module, self.task.probe_inputs(n)) \
                if self.deq is not None and n and self.place.is_main else {}
        return dict(split="test", step=self.step, epoch=(self.step - 1) // self.steps_per_epoch,
                    loss=loss / count, **self.task.quality(loss / count, correct / count),
                    **self.task.eval_extra(split, count, seconds),
                    fwd_nfe=nfe / batches if nfe is not None else None, residual=residual,
                    **jacobian)

    def _record(self, record: dict, callback) -> None:
        """Keep the record (every process), append it to the log (rank 0), pass it to `callback`."""
        record["time"] = time.time()
        self.history.append(record)
        if self.config.log_path and self.place.is_main:
            append_record(self.config.log_path, record)
        if callback is not None:
            callback(record)

    def fit(self, callback: Optional[Callable[[dict], None]] = None, *, progress: bool = True) -> list[dict]:
        """Train until ``total_steps``; `callback(record)` sees every train and test record (a live
        dashboard's ``log``), in every process. Returns the history of records.

        Each step reseeds torch's generator from (seed, step, rank); ``fit`` restores the caller's
        random state when it returns, so a notebook's own random draws are not disturbed."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._fit(callback, progress)

    def _fit(self, callback, progress) -> list[dict]:
        c, main = self.config, self.place.is_main
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and main),
                   desc=f"{c.model} on {c.dataset}", unit="step")
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                self._record(record, callback)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", **self.task.progress(record),
                                nfe=record["fwd_nfe"], refresh=False)
                if self.step % (c.eval_every or self.steps_per_epoch) == 0 \
                        or self.step == self.total_steps:
                    self._record(self.evaluate(), callback)
                every = c.checkpoint_every or self.steps_per_epoch
                if c.checkpoint_path and (self.step % every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if c.checkpoint_path:
                self.save_checkpoint()
            if main:
                print(f"Interrupted at step {self.step}/{self.total_steps}"
                      + (f"; checkpoint saved to {c.checkpoint_path}" if c.checkpoint_path else "")
                      + ". Call fit() again to continue.")
            raise
        finally:
            bar.close()
        if c.log_path and main:
            append_done(c.log_path, self.step)
        return self.history

    def save_checkpoint(self, path: Optional[str] = None) -> None:
        """Write the checkpoint (rank 0 only: every process holds the same state)."""
        path = path or self.config.checkpoint_path
        if not path:
            raise ValueError("no checkpoint path: set config.checkpoint_path or pass path=...")
        if not self.place.is_main:
            return
        atomic_save(dict(config=dataclasses.asdict(self.config), step=self.step,
                         model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                         rng=torch.get_rng_state(),
                         world_size=self.place.world_size, history=self.history), path)

    @classmethod
    def resume(cls, path: str, **overrides) -> "Trainer":
        """A trainer restored from a checkpoint, ready to ``fit()`` on from where it stopped. The
        JSONL log is cut back to that step, so records after the checkpoint are not duplicated."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainer = cls(TrainConfig.from_dict({**state["config"], **overrides}))
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        trainer.step, trainer.history = state["step"], state["history"]
        saved_world = state.get("world_size", 1)
        if saved_world != trainer.place.world_size:
            warnings.warn(f"{path} was written by a run with {saved_world} process(es), resumed with "
                          f"{trainer.place.world_size}: the run goes on, but not bit for bit as it "
                          f"would have.", stacklevel=2)
        log = trainer.config.log_path
        if log and Path(log).exists() and trainer.place.is_main:
            truncate_log(log, trainer.step)
        return trainer
