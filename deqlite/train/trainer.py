"""One training loop for every task: optimizer and schedule, progress bar, metrics, a JSONL log,
atomic checkpoints and exact resume; on one CPU, one GPU, or many GPUs and machines.

The loop knows nothing of the task (``deqlite.train.tasks``: images or text answer what it needs;
``begin_step`` and ``begin_evaluation`` tell it what comes, e.g. so that a text task carries its
Transformer-XL memory on) and little of the DEQ (``deqlite.train.deq_hooks``: the lr schedule and
its warm-up, the DEQ's warm-up, the step's forward cap, the Jacobian regularizer's schedule and
the solver's numbers). A step reads straight: the batch of step k, the step's seed, the DEQ's
knobs for this step (warm-up depth, Hutchinson probes, forward cap), forward, loss
(+ γ_k · ‖J‖²_F / d when regularized), backward, clip, optimizer and schedule, one record.

Records: every training step logs its loss and the task's quality (accuracy; or bits per token
and perplexity), ``lr``, ``grad_norm``, throughput, for a DEQ ``fwd_cap`` (the step's cap: the
solver's ``max_iter``, a draw around it with ``max_iter_jitter``; the depth in the warm-up), the
forward NFE (solving z* = f(z*, x)), backward NFE (solving g = Jᵀ g + ∂ℓ/∂z*), the final relative
residual, ``nonfinite`` (samples the solves lost to NaN/inf, under any ``on_fail``),
``jac_weight`` (γ_k) and ``jac_loss`` (when applied). Evaluations (every ``eval_every`` steps,
or at the end of each epoch; in the warm-up unrolled ``pretrain_eval_depth`` times) log the
held-out loss and quality, mean forward NFE, ``nonfinite``, and ρ(J) and ‖J‖²_F / d at z* on the
first ``eval_jacobian_samples`` held-out examples. With ``tensorboard`` set, rank 0 writes every
number of every record as a TensorBoard scalar too (``deqlite.train.tensorboard_log``).

At scale: bf16/fp16 autocast, channels-last, gradient clipping, streamed datasets and
``torchrun`` (``DistributedDataParallel``): what each does is in ``deqlite.train.config``.

Determinism and resume: the model is initialised from ``seed``; the examples of step k and their
random augmentation are a function of (seed, k) (``deqlite.data.batches``), and the step's own
random draws (dropout masks, Hutchinson probes) come from torch's generator seeded by
(seed, k, rank); the forward cap and whether to regularize, from (seed, k). A checkpoint holds the
model, optimizer, schedule, gradient scaler, step, an evaluation still due and the task's own
state (``task.state_dict()``, gathered from every process: a text task's memory), so a run
resumed from it -- at any step, in-memory or streamed data, with any ``num_workers``, after a
Ctrl-C anywhere (during the optimizer's update it waits for the update to finish; during an
evaluation the resumed run evaluates first) -- ends exactly where the uninterrupted run ends,
given the same number of processes (on a GPU, up to the nondeterminism of some CUDA kernels).
With another number of processes it goes on, but not bit for bit. A text run resumes exactly on
the same token stream: for ``stdlib_chars``, under the same Python version.

Nothing is lost, nothing silent: a fresh run never touches an existing run's log, checkpoint or
TensorBoard events (``overwrite=True`` to replace them); the log is only appended to; checkpoints
carry a checksum (``deqlite.train.checkpoint``); a NaN/inf loss or gradient stops the run with
``TrainingDiverged`` before the update, and NaN weights are never checkpointed. The command line
is ``python -m deqlite.train`` (``deqlite.train.__main__``).
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

from .._validate import lookup
from ..models import MODELS, build_model
from . import deq_hooks, tensorboard_log
from .checkpoint import (deferred_interrupt, files_in_use_message, load_checkpoint,
                         run_files_in_use, save_checkpoint)
from .config import AMP, OPTIMIZERS, RESUMABLE, TrainConfig
from .distributed import Place, all_reduce, init_distributed, resolve_device
from .log import append_done, append_record, append_resume
from .tasks import task_for


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient of a training step is NaN/inf: the step is not taken."""


class Trainer:
    """Holds a model, its task (data) and optimizer, and trains it with ``fit()``.

    ``fit()`` can be interrupted (Ctrl-C / the notebook's stop button) and called again: it goes on
    from the step it reached, after saving a checkpoint if ``checkpoint_path`` is set.
    Under torchrun, build one Trainer in every process (``python -m deqlite.train`` does).
    ``data``: the (train, held-out) datasets to train on instead of loading ``config.dataset``
    (which still says what kind of task it is), e.g. synthetic ones for a benchmark.

    The run's files are its own: a fresh run whose ``log_path`` or ``checkpoint_path`` exists, or
    whose ``tensorboard`` folder holds event files, stops at ``fit()`` (nothing is touched) unless
    ``overwrite=True``, which deletes them first. ``Trainer.resume(checkpoint)`` goes on instead.
    """

    def __init__(self, config: TrainConfig | dict, *, data: Optional[tuple] = None,
                 overwrite: bool = False):
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
        # the lr factor of step s (deq_hooks.lr_factor: warm-up, then cosine or constant), over the
        # run's current total steps (a resumed run that trains further stretches the schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: deq_hooks.lr_factor(self.config, s, self.total_steps))
        self.step = 0
        self.history: list[dict] = []
        self.overwrite, self._files_claimed = overwrite, False
        self.pending_eval = False          # an evaluation due at self.step that has not run yet
        self._updating = False             # inside the optimizer's update
        self.checkpoint_step: Optional[int] = None     # the step of the last checkpoint written
        self._resumed_at: Optional[int] = None         # the checkpoint's step, for the log's mark
        self.tensorboard = tensorboard_log.TensorBoardLog(c.tensorboard, self.place.is_main)

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

    def _autocast(self):
        dtype = AMP[self.config.amp]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

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
        self.task.begin_step(self.step)        # e.g. the memory of a text task's segments
        x, y = self.task.inputs(x), y.to(self.device, non_blocking=True)
        torch.manual_seed(deq_hooks.step_seed(c, self.step, self.place.rank))
        warm_up = self.step < c.pretrain_steps
        depth, gamma = deq_hooks.warm_up_depth(c, self.step), self.jac_weight(self.step)
        regularize = self.deq is not None and deq_hooks.jac_reg_now(c, self.step, gamma)
        probes = c.jac_reg_probes if regularize else 0
        # the step's forward cap: a draw around the solver's max_iter (None: that one itself)
        drawn = None if self.deq is None else deq_hooks.forward_max_iter(
            c, self.step, self.deq.forward_solver.max_iter, regularized=regularize)
        cap = None if self.deq is None else depth if warm_up else \
            drawn or self.deq.forward_solver.max_iter
        start = time.perf_counter()
        self.model.train()
        out = self._forward(x, y, depth, probes, drawn)
        loss, acc = self.task.loss(out, y)
        jac_loss = self.deq.jac_loss if probes else None
        total = loss if jac_loss is None else loss + gamma * jac_loss
        grad_norm, lr = self._update(total)
        solver = deq_hooks.solver_metrics(self.deq, depth)
        mean_loss, acc, mean_jac, lost = self._all_reduce(
            [loss.item(), acc, jac_loss.item() if jac_loss is not None else None,
             solver["nonfinite"]], "sum")
        fwd_nfe, bwd_nfe, residual = self._all_reduce(
            [solver["fwd_nfe"], solver["bwd_nfe"], solver["residual"]], "max")
        fwd_nfe, bwd_nfe = (None if n is None else int(n) for n in (fwd_nfe, bwd_nfe))
        w, elapsed = self.place.world_size, time.perf_counter() - start
        return dict(split="train", step=self.step, epoch=epoch, loss=mean_loss / w,
                    **self.task.quality(mean_loss / w, acc / w if acc is not None else None),
                    lr=lr, pretrain=warm_up, **self.task.speed(y, w, elapsed),
                    jac_weight=gamma if c.jac_reg_weight or c.pretrain_jac_reg_weight
                    or c.jac_reg_increment else None,
                    jac_loss=mean_jac / w if mean_jac is not None else None,
                    grad_norm=grad_norm, fwd_cap=cap, fwd_nfe=fwd_nfe, bwd_nfe=bwd_nfe,
                    residual=residual, nonfinite=None if lost is None else int(lost))

    def _forward(self, x, y, depth: int, probes: int, max_iter: Optional[int] = None):
        """The model on a training batch (the cell unrolled `depth` times, or solved with at most
        `max_iter` forward iterations; None: the solver's own cap). Finite data that the trained
        model turns into NaN/inf means the training diverged (not that the data is bad): said so."""
        try:
            with self._deq_options(pretrain_steps=depth, jac_probes=probes, max_iter=max_iter), \
                    self._autocast():
                return self.task.forward(self.module if self.ddp is None else self.ddp, x, y)
        except ValueError as e:
            if "NaN" not in str(e) or self.step == 0 or not torch.isfinite(x).all():
                raise
            largest = max(p.detach().abs().max().item() for p in self.model.parameters())
            raise TrainingDiverged(self._diverged(
                f"the model turns a finite batch into NaN/inf after {self.step} step(s), its "
                f"largest |weight| is {largest:.3g} (the DEQ says: {e})")) from e

    def _update(self, total: torch.Tensor) -> tuple[float, float]:
        """Backward, the gradient's global norm (clipped to ``grad_clip``), the optimizer's step;
        returns it and the step's learning rate."""
        self._check_finite("loss", total.item())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()          # DDP averages the gradients over processes here
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        self._check_finite("gradient norm", grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self._updating = True                       # until the step counter has moved with it
        try:
            self.scaler.step(self.optimizer)
        except RuntimeError as e:                   # e.g. Adam's lr · m̂ beyond float32's range
            if "overflow" not in str(e):
                raise
            raise TrainingDiverged(self._diverged(f"the optimizer's update overflows ({e})",
                                                  updated="may be partly updated")) from None
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self._updating = False
        return grad_norm, lr

    def _grad_norm(self) -> float:
        """The gradients' global norm, after clipping it to ``grad_clip`` when that is set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()
        norms = [torch.linalg.vector_norm(p.grad) for p in params]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    def _check_finite(self, what: str, value: float) -> None:
        """Stop before the update on a NaN/inf loss or gradient (fp16's scaler skips those)."""
        if not (math.isfinite(value) or self.scaler.is_enabled()):
            stats = self.deq.forward_stats if self.deq is not None else None
            lost = f"; the DEQ's solve lost {stats.num_nonfinite} of {stats.converged.numel()} " \
                   f"samples to NaN/inf" if stats is not None and stats.num_nonfinite else ""
            raise TrainingDiverged(self._diverged(f"the {what} is {value}{lost}"))

    def _diverged(self, what: str, updated: str = "were not updated") -> str:
        c = self.config
        kept = f"; the last checkpoint ({c.checkpoint_path}, step {self.checkpoint_step}) is " \
               f"kept" if self.checkpoint_step is not None else ""
        return (f"training diverged at step {self.step + 1}: {what} (lr "
                f"{self.scheduler.get_last_lr()[0]:g}, grad_clip {c.grad_clip}). The weights "
                f"{updated}{kept}. Lower lr, set grad_clip (--set grad_clip=1), or regularize the "
                f"Jacobian (jac_reg_weight).")

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
        self.task.begin_evaluation()            # e.g. a text task's memory starts empty
        self.model.eval()
        depth = deq_hooks.warm_up_depth(c, self.step, evaluating=True)
        loss = correct = count = nfe = batches = lost = 0.0
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
                batches, lost = batches + 1, lost + (m["nonfinite"] or 0)
        loss, correct, count, nfe, batches, lost = self._all_reduce(
            [loss, correct, count, nfe, batches, lost], "sum")
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
                    nonfinite=int(lost) if self.deq is not None else None, **jacobian)

    def _record(self, record: dict, callback) -> None:
        """Keep it (every process), log it (rank 0: JSONL, TensorBoard), pass it to `callback`."""
        record["time"] = time.time()
        self.history.append(record)
        if self.config.log_path and self.place.is_main:
            append_record(self.config.log_path, record)
        self.tensorboard.write(record)
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

    def _claim_files(self) -> None:
        """A fresh run's log, checkpoint, event files must be free, or ``overwrite=True`` (rank 0)."""
        c, main = self.config, self.place.is_main
        taken = run_files_in_use(c.log_path, c.checkpoint_path, c.tensorboard) if main else []
        if taken and not self.overwrite:
            raise FileExistsError(files_in_use_message(taken, cli=False))
        for path in taken:               # (of a TensorBoard folder only its event files)
            Path(path).unlink()
        self._files_claimed = True

    def _evaluation_due(self) -> bool:
        every = self.config.eval_every or self.steps_per_epoch
        return self.step % every == 0 or self.step == self.total_steps

    def _fit(self, callback, progress) -> list[dict]:
        c, main = self.config, self.place.is_main
        if not self._files_claimed:
            self._claim_files()
        if self._resumed_at is not None and c.log_path and main:
            append_resume(c.log_path, self._resumed_at)
        self._resumed_at = None
        self.tensorboard.open(self.step)      # rank 0; events after self.step are superseded
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and main),
                   desc=f"{c.model} on {c.dataset}", unit="step")
        try:
            while self.pending_eval or self.step < self.total_steps:
                if not self.pending_eval:
                    with deferred_interrupt(f"Stopping after step {self.step + 1} (Ctrl-C again "
                                            f"to stop at once)."):
                        record = self.train_step()
                        self.pending_eval = self._evaluation_due()   # saved with an interrupt
                        self._record(record, callback)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", **self.task.progress(record),
                                    nfe=record["fwd_nfe"], refresh=False)
                if self.pending_eval:
                    evaluation = self.evaluate()
                    self.pending_eval = False
                    self._record(evaluation, callback)
                every = c.checkpoint_every or self.steps_per_epoch
                if c.checkpoint_path and (self.step % every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            saved = ""
            if self._updating:                      # a second Ctrl-C cut the update in half
                saved = (f"; the update of step {self.step + 1} was cut off, so no checkpoint is "
                         f"saved: resume from the last one, {c.checkpoint_path}")
            elif c.checkpoint_path:
                try:
                    self.save_checkpoint()
                    saved = f"; checkpoint saved to {c.checkpoint_path}"
                except TrainingDiverged as e:
                    saved = f"; {e}"
            if main:
                print(f"Interrupted at step {self.step}/{self.total_steps}{saved}. Call fit() "
                      f"again to continue.")
            raise
        finally:
            bar.close()
            self.tensorboard.close()      # what was written is kept, also on an error or Ctrl-C
        if c.log_path and main:
            append_done(c.log_path, self.step)
        return self.history

    def save_checkpoint(self, path: Optional[str] = None) -> None:
        """Write the checkpoint atomically with a checksum (rank 0 only: every process holds the
        same state); NaN/inf weights are refused (the previous checkpoint stays)."""
        if not (path := path or self.config.checkpoint_path):
            raise ValueError("no checkpoint path: set config.checkpoint_path or pass path=...")
        task_state = self.task.state_dict()              # every process: it may gather
        if not self.place.is_main:
            return
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"not saving {path} at step {self.step}: the weights "
                                   f"{', '.join(bad[:4])} are NaN/inf (training diverged).")
        save_checkpoint(dict(config=dataclasses.asdict(self.config), step=self.step,
                             model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                             scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                             rng=torch.get_rng_state(), pending_eval=self.pending_eval,
                             world_size=self.place.world_size, history=self.history,
                             task=task_state), path)
        self.checkpoint_step = self.step

    @classmethod
    def resume(cls, path: str, *, data: Optional[tuple] = None, **changes) -> "Trainer":
        """A trainer restored from the checkpoint at `path`, ready to ``fit()`` on from where it
        stopped. The run keeps its settings; `changes` may set only those in
        ``config.RESUMABLE``: ``epochs`` or ``max_steps`` to train further (the schedule stretches
        to the new end), and where the files and data are, how they load, the device. The log
        gets a ``resume`` record when ``fit()`` starts; the records an interrupted attempt wrote
        after the checkpoint are superseded by it (``read_log``), never deleted."""
        state = load_checkpoint(path)
        fixed = sorted(set(changes) - set(RESUMABLE))
        if fixed:
            raise ValueError(f"a resumed run keeps its settings: {', '.join(fixed)} cannot change "
                             f"(only {', '.join(RESUMABLE)} can). Start a new run for other "
                             f"settings.")
        config = TrainConfig.from_dict({**state["config"], **changes})
        trainer = cls(config, data=data)
        if trainer.total_steps < state["step"]:
            raise ValueError(f"{path} is at step {state['step']}; with epochs={config.epochs}, "
                             f"max_steps={config.max_steps} the run would end at step "
                             f"{trainer.total_steps}, before it. A resumed run can only go on.")
        trainer.model.load_state_dict(state["model"])
        trainer.task.load_state_dict(state.get("task"))  # e.g. a text task's memory at that step
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        trainer.step, trainer.history = state["step"], state["history"]
        trainer.pending_eval = state.get("pending_eval", False)
        trainer.checkpoint_step, trainer._files_claimed = state["step"], True
        saved_world = state.get("world_size", 1)
        if saved_world != trainer.place.world_size:
            warnings.warn(f"{path} was written by a run with {saved_world} process(es), resumed with "
                          f"{trainer.place.world_size}: the run goes on, but not bit for bit as it "
                          f"would have.", stacklevel=2)
        trainer._resumed_at = trainer.step            # fit() marks it in the log
        return trainer
