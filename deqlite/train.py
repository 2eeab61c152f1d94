"""One training loop for every task: data, optimizer and schedule, progress bar, metrics, a JSONL
log, atomic checkpoints and exact resume; on one CPU, one GPU, or many GPUs and machines.

Each step minimises the cross-entropy of the model on a batch (a language model: its own loss).
For a DEQ model the loop also records the solver's effort: forward NFE (solving z* = f(z*, x)),
backward NFE (solving the adjoint g = Jᵀ g + ∂ℓ/∂z*) and the final relative residual. A warm-up
of ``pretrain_steps`` steps trains the cell unrolled ``pretrain_depth`` times (as the DEQ papers
do) before the equilibrium solve.

Jacobian regularization (Bai, Koltun, Kolter 2021): with ``jac_reg_weight = γ > 0`` the loss of a
step becomes  cross-entropy + γ_t · ‖J_f(z*)‖²_F / d  (Hutchinson, ``jac_reg_probes`` probes),
applied on each step with probability ``jac_reg_prob``, with γ_t rising linearly from 0 to γ over
the first ``jac_reg_ramp_steps`` steps (0: γ from the start); ``pretrain_jac_reg_weight`` sets
another γ for the warm-up and ``jac_reg_stop_epoch`` switches it off late in training (both as
in the MDEQ recipes). Train records log ``jac_weight``
(γ_t) and ``jac_loss`` (the estimate, when applied); test records log the Jacobian's spectral
radius ρ(J) and ‖J‖²_F / d at z* on the first ``eval_jacobian_samples`` test examples.

At scale (the vision recipes):
* ``amp="bf16"`` / ``"fp16"``: the model's forward runs under ``torch.autocast`` (fp16 with a
  gradient scaler); the loss is taken in float32, the weights stay float32. The solver keeps the
  state's dtype: on CUDA, autocast runs GroupNorm in float32, so cells that end in it (MDEQ's)
  keep float32 states; a cell whose output is rounded to bf16 (on CPU) cannot get its relative
  residual much below ~2e-3, so give its DEQ a tol of that order.
* ``channels_last``: conv weights and input images in NHWC memory layout (faster convs on GPUs).
* ``grad_clip``: clip the gradient's global norm (the MDEQ recipes do); ``grad_norm`` is logged.
* ``optimizer_options`` (e.g. SGD's momentum, nesterov), ``lr_min`` (the cosine schedule's floor),
  ``normalize`` ([mean, std] per channel, for in-memory images; ImageNet's transform has its own).
* Datasets read from disk (ImageNet) stream through a ``DataLoader`` with ``num_workers`` worker
  processes (pinned memory on CUDA); the in-memory ones are indexed directly, as before.
* Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains on its part of
  each global batch -- ``batch_size`` is the *global* batch, each of W processes gets
  batch_size / W -- inside ``DistributedDataParallel``, which averages the gradients: the W
  processes take the step one process would take on the whole batch. NCCL on CUDA (one GPU per
  process, ``cuda:$LOCAL_RANK``), Gloo on CPU. Logged numbers are combined over the processes
  (mean loss and accuracy, largest NFE and residual); evaluation is split between them and summed
  (ρ(J) on rank 0). Only rank 0 writes the log and checkpoints and shows the progress bar.

Language models (the text datasets of ``deqlite.text``: ``stdlib_chars``, ``wikitext2``,
``wikitext103``) go through the same loop. The training stream is cut into ``batch_size`` rows and
step k takes window k (mod the windows per epoch) of ``seq_len`` tokens of every row
(``deqlite.text.StreamBatches``); the step's loss is ``model.loss(x, y)``, the model's mean
negative log-likelihood per token in nats, with y the tokens after x. The model is built with
``vocab_size`` from the data and ``max_len = seq_len`` (when it takes them and ``model_options``
does not set them). Records carry ``loss`` (nats per token), ``bits_per_token`` (loss / ln 2: for
a character model its bits per character, bpc), ``ppl`` (e^loss) and ``tokens_per_s`` instead of
``acc`` and ``samples_per_s``. Evaluation during training scores the *validation* split ("valid")
cut into ``eval_batch_size`` rows in all (shared by the processes, so the score does not depend
on their number), every token once; its records keep ``split="test"`` (the held-out record of
every task, which dashboards plot) and say ``eval_split="valid"``; score the test split at the
end with ``trainer.evaluate(split="test")``. ``limit_train`` / ``limit_test`` count tokens for
text. NFE, residual, Jacobian regularization, warm-up, AMP, DDP and resume work as for images
(ρ(J) is taken on the first ``eval_jacobian_samples`` validation windows, over the whole
(seq_len × width) state of a window). Image options (``augment``, ``normalize``,
``channels_last``) are errors for text. ``eval_every`` (steps; 0: at the end of every epoch, the
default for every task) evaluates more often than once an epoch, which long text epochs want.

Determinism and resume: the model is initialised from ``seed``; the examples of step k and their
random augmentation are a function of (seed, k) (``deqlite.data.TrainBatches``; a text window is a
function of k alone, ``deqlite.text.StreamBatches``), and the step's own random draws (dropout
masks, Hutchinson probes) come from torch's generator seeded by (seed, k, rank). A checkpoint holds
the model, optimizer, schedule, gradient scaler and step, so a run resumed from it -- at any step,
in-memory or streamed data, with any ``num_workers`` -- ends exactly where the uninterrupted run
ends, given the same number of processes (on a GPU, up to the nondeterminism of some CUDA kernels).
With another number of processes it goes on, but not bit for bit (each process's draws and the
incomplete last batch, dropped with W > 1, differ). A text run resumes exactly on the same token
stream: for ``stdlib_chars``, under the same Python version.

Commands (presets in ``deqlite/configs``; ``--set KEY=VALUE`` overrides any config key):

    python -m deqlite.train --config mnist [--set epochs=3] [--log runs/mnist.jsonl]
    python -m deqlite.train --config cifar10_mdeq_tiny --set amp=bf16 --set channels_last=true
    python -m deqlite.train --config cifar10_mdeq_tiny --resume        # go on from runs/NAME.pt
    # one machine with 4 GPUs, one process each (batch_size stays the global batch):
    torchrun --standalone --nproc-per-node 4 -m deqlite.train --config imagenet_mdeq_small_jr \
        --set amp=bf16 --set channels_last=true --set num_workers=8
    # 2 machines × 4 GPUs: run on both, R = 0 on the machine called HOST and 1 on the other:
    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --master-addr HOST --master-port 29500 \
        -m deqlite.train --config imagenet_mdeq_small_jr --set amp=bf16 --set num_workers=8

Under torchrun spell ``--log`` as ``--log-path`` (torchrun's own parser takes ``--log`` for an
abbreviation of its options). ImageNet: ``export DEQLITE_DATA=/folder/with/imagenet`` first (see
``deqlite.data``). With several machines, put the log and checkpoint on a shared file system.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ._files import atomic_save
from ._validate import check_range, did_you_mean, keyword_options, lookup
from .data import (TrainBatches, eval_batches, first_images, image_shape, load_dataset,
                   num_classes, take)
from .diagnostics import equilibrium
from .distributed import Place, all_reduce, init_distributed, resolve_device, shutdown_distributed
from .jacobian import hutchinson_frobenius, spectral_radius
from .models import MODELS, build_model
from .text import StreamBatches, TokenStream, bits, eval_windows, first_windows, is_text

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "constant")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run needs; presets in ``deqlite/configs`` fill it in."""
    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    download: bool = False
    limit_train: Optional[int] = None      # use only N training examples (text: N tokens)
    limit_test: Optional[int] = None
    seq_len: int = 128                     # text: tokens per training / evaluation window
    augment: bool = False                  # the dataset's standard random augmentation (cifar10, imagenet)
    normalize: Optional[list] = None       # [mean, std] per channel for in-memory images (x − mean) / std
    num_workers: int = 0                   # loader processes for datasets read from disk (imagenet)
    model: str = "deq_classifier"
    model_options: dict = field(default_factory=dict)
    epochs: int = 5
    max_steps: Optional[int] = None        # stop early after this many steps in all
    batch_size: int = 64                   # the global batch, summed over all processes
    eval_batch_size: int = 500             # per process (text: rows in all, shared by the processes)
    optimizer: str = "adam"
    optimizer_options: dict = field(default_factory=dict)   # e.g. {"momentum": 0.9, "nesterov": true}
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    lr_min: float = 0.0                    # the cosine schedule decays the learning rate to this
    grad_clip: Optional[float] = None      # clip the gradient's global norm to this (None: don't)
    amp: str = "none"                      # autocast the forward: "none", "bf16", "fp16" (+ scaler)
    channels_last: bool = False            # model and images in torch.channels_last memory layout
    pretrain_steps: int = 0                # warm-up steps with the cell unrolled ...
    pretrain_depth: int = 6                # ... this many times
    jac_reg_weight: float = 0.0            # γ of the Jacobian regularizer (0: off)
    jac_reg_prob: float = 1.0              # apply it on a step with this probability
    jac_reg_probes: int = 1                # Hutchinson probes per step
    jac_reg_ramp_steps: int = 0            # γ rises linearly from 0 over these steps (0: constant)
    pretrain_jac_reg_weight: Optional[float] = None   # γ during the warm-up (None: as after it)
    jac_reg_stop_epoch: Optional[int] = None           # no regularizer from this epoch on
    eval_jacobian_samples: int = 100       # test examples for ρ(J), ‖J‖²_F/d at evaluation (0: skip)
    seed: int = 0
    device: str = "auto"                   # "auto": cuda when available (cuda:$LOCAL_RANK under torchrun)
    log_path: Optional[str] = None         # JSONL, one record per step / evaluation
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0              # steps; 0: at the end of every epoch
    eval_every: int = 0                    # steps; 0: at the end of every epoch

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config; an unknown key is an error that names the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise KeyError(f"unknown config key {key!r}.{did_you_mean(key, valid)} "
                               f"Valid keys: {', '.join(valid)}.")
        return cls(**values)

    def __post_init__(self):
        lookup(OPTIMIZERS, self.optimizer, "optimizer")
        lookup(SCHEDULES, self.schedule, "schedule")
        lookup(AMP, self.amp, "amp mode")
        for name in ("download", "augment", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "seq_len"):
            check_range(getattr(self, name), name, low=1, integer=True)
        for name in ("pretrain_steps", "pretrain_depth", "checkpoint_every", "seed", "num_workers",
                     "jac_reg_ramp_steps", "eval_jacobian_samples", "eval_every"):
            check_range(getattr(self, name), name, low=0, integer=True)
        check_range(self.lr, "lr", low=0, low_open=True)
        check_range(self.lr_min, "lr_min", low=0, high=self.lr)
        if self.lr_min and self.schedule != "cosine":
            raise ValueError(f"lr_min applies to the cosine schedule; schedule is {self.schedule!r}.")
        _check_optimizer_options(self.optimizer, self.optimizer_options)
        if self.normalize is not None:
            _check_normalize(self.normalize)
        if self.grad_clip is not None:
            check_range(self.grad_clip, "grad_clip", low=0, low_open=True)
        check_range(self.jac_reg_weight, "jac_reg_weight", low=0)
        if self.pretrain_jac_reg_weight is not None:
            check_range(self.pretrain_jac_reg_weight, "pretrain_jac_reg_weight", low=0)
        if self.jac_reg_stop_epoch is not None:
            check_range(self.jac_reg_stop_epoch, "jac_reg_stop_epoch", low=0, integer=True)
        check_range(self.jac_reg_prob, "jac_reg_prob", low=0, high=1)
        check_range(self.jac_reg_probes, "jac_reg_probes", low=1, integer=True)
        if is_text(self.dataset):
            for name in ("augment", "normalize", "channels_last"):
                if getattr(self, name) not in (False, None):
                    raise ValueError(f"{name} applies to images; dataset {self.dataset!r} is text "
                                     f"(token windows of seq_len). Leave {name} unset.")


def _check_optimizer_options(name: str, options: dict) -> None:
    """The options are keyword arguments of the torch optimizer (lr, weight_decay: own keys)."""
    if not isinstance(options, dict):
        raise TypeError(f"optimizer_options must be a dict, got {options!r}.")
    params = inspect.signature(OPTIMIZERS[name]).parameters
    valid = [p for p in params if p not in ("self", "params", "lr", "weight_decay")]
    for key in options:
        if key in ("lr", "weight_decay"):
            raise TypeError(f"set {key!r} as the config's own key, not in optimizer_options.")
        if key not in valid:
            raise TypeError(f"optimizer {name!r} got an unknown option {key!r}."
                            f"{did_you_mean(key, valid)} Valid options: {', '.join(valid)}.")


def _check_normalize(value) -> None:
    """[mean, std]: two lists of numbers, one per channel, every std > 0."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (list, tuple)) and v and len(v) == len(value[0]) for v in value)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for v in value for x in v))
    if not ok or min(value[1]) <= 0:
        raise ValueError(f"normalize must be [mean, std], two lists with one number per channel "
                         f"(std > 0), e.g. [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]]; "
                         f"got {value!r}.")


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log; a half-written last line (a run still writing) is skipped."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class LanguageModelLoss(nn.Module):
    """``model.loss(tokens, targets)`` as a module's forward. DistributedDataParallel averages the
    gradients of what the forward of the module it wraps computes, so a language model trains
    under DDP through this wrapper; ``deqlite.diagnostics.equilibrium`` calls ``module(inputs)``,
    for which ``targets=None`` scores the inputs as their own targets (only the model's
    equilibrium state is wanted then)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.loss(tokens, tokens if targets is None else targets)


def _is_language_model(cls) -> bool:
    return callable(getattr(cls, "loss", None))


class Trainer:
    """Holds a model, its data and optimizer, and trains it with ``fit()``.

    ``fit()`` can be interrupted (Ctrl-C / the notebook's stop button) and called again: it goes on
    from the step it reached, after saving a checkpoint if ``checkpoint_path`` is set.
    Under torchrun, build one Trainer in every process (``python -m deqlite.train`` does).
    """

    def __init__(self, config: TrainConfig | dict):
        self.config = c = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.place = Place.from_env()
        self.device = resolve_device(c.device, self.place)
        init_distributed(self.place, self.device)
        torch.manual_seed(c.seed)
        self.text = is_text(c.dataset)      # a language-modeling task
        self.train_set, n_classes = self._load("train", c.limit_train, c.augment)
        # the held-out split evaluated during training: "test" for images, "valid" for text
        self.test_set, _ = self._load("valid" if self.text else "test", c.limit_test, False)
        if self.text:
            self.batches = StreamBatches(self.train_set.tokens, c.batch_size, c.seq_len,
                                         rank=self.place.rank, world_size=self.place.world_size)
        else:
            self.batches = TrainBatches(self.train_set, c.batch_size, seed=c.seed,
                                        rank=self.place.rank, world_size=self.place.world_size,
                                        num_workers=c.num_workers,
                                        pin_memory=self.device.type == "cuda")
        self.model = self._build_model(n_classes)
        self.lm_loss = LanguageModelLoss(self.model) if self.text else None
        self.mean_std = self._normalization()
        self.ddp = None                     # the DistributedDataParallel wrapper, with several processes
        if self.place.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(
                self.lm_loss if self.text else self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        opt_cls = lookup(OPTIMIZERS, c.optimizer, "optimizer")
        self.optimizer = opt_cls(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                 **c.optimizer_options)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = min(c.max_steps or math.inf, c.epochs * self.steps_per_epoch)
        floor = c.lr_min / c.lr
        decay = (lambda s: floor + (1 - floor) * 0.5 * (
                     1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps))
                 if c.schedule == "cosine" else (lambda s: 1.0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.step = 0
        self.history: list[dict] = []

    def _load(self, split, limit, augment):
        c = self.config
        ds = load_dataset(c.dataset, split, root=c.data_root, download=c.download, augment=augment)
        if isinstance(ds, TokenStream):
            return (ds if limit is None else ds.take(limit)), None
        return (ds if limit is None else take(ds, limit)), num_classes(ds)

    def _build_model(self, n_classes: Optional[int]) -> torch.nn.Module:
        """The model, told the data's shape (the options of it that it takes; a preset's
        ``model_options`` win): images' channels, size and classes, or text's ``vocab_size`` and
        ``max_len = seq_len``; on the device, in channels-last layout if asked."""
        c = self.config
        cls = lookup(MODELS, c.model, "model")
        if self.text != _is_language_model(cls):
            kind = "a language model" if self.text else "an image model"
            fit = [n for n, m in MODELS.items() if _is_language_model(m) == self.text]
            raise ValueError(f"dataset {c.dataset!r} needs {kind}, and model {c.model!r} is not "
                             f"one (language models have loss(tokens, targets)); models that "
                             f"fit: {', '.join(fit)}.")
        if self.text:
            data_shape = dict(vocab_size=self.train_set.vocab_size, max_len=c.seq_len)
        else:
            shape = image_shape(self.train_set)
            data_shape = dict(in_channels=shape[0], image_size=shape[-1], n_classes=n_classes)
        takes = keyword_options(cls.__init__)
        options = {**{k: v for k, v in data_shape.items() if k in takes}, **c.model_options}
        if self.text and "max_len" in takes and options["max_len"] < c.seq_len:
            raise ValueError(f"model_options.max_len = {options['max_len']} is shorter than "
                             f"seq_len = {c.seq_len}: raise max_len or leave it unset (it is "
                             f"seq_len then).")
        model = build_model(c.model, **options).to(self.device)
        return model.to(memory_format=torch.channels_last) if c.channels_last else model

    def _normalization(self):
        """``normalize`` as two (1, C, 1, 1) tensors on the device, or None."""
        c = self.config
        if c.normalize is None:
            return None
        if not isinstance(self.train_set, TensorDataset):
            raise ValueError(f"normalize applies to in-memory datasets; {c.dataset!r} is normalized "
                             f"by its own transform (ImageNet's channel mean and std). Leave it unset.")
        channels = self.train_set.tensors[0].shape[1]
        if len(c.normalize[0]) != channels:
            raise ValueError(f"normalize has {len(c.normalize[0])} numbers per list, but the images "
                             f"of {c.dataset!r} have {channels} channel(s).")
        return tuple(torch.tensor(v, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                     for v in c.normalize)

    @property
    def deq(self):
        """The model's DEQ, or None for an explicit model."""
        return getattr(self.model, "deq", None)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images as the model takes it: on the device, normalized, channels-last
        (a batch of tokens: on the device)."""
        x = x.to(self.device, non_blocking=True)
        if self.text:
            return x
        if self.mean_std is not None:
            x = (x - self.mean_std[0]) / self.mean_std[1]
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        dtype = AMP[self.config.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _all_reduce(self, values: list, op: str) -> list:
        return all_reduce(values, op, self.place, self.device)

    def _solver_metrics(self) -> dict:
        deq = self.deq
        if deq is None or deq.forward_stats is None:
            return dict(fwd_nfe=deq.pretrain_steps if deq is not None else None,
                        bwd_nfe=None, residual=None)
        bwd = deq.backward_stats
        return dict(fwd_nfe=deq.forward_stats.nfe, bwd_nfe=bwd.nfe if bwd is not None else None,
                    residual=deq.forward_stats.final_rel.max().item())

    def _set_warm_up(self) -> bool:
        """Unroll the cell (warm-up) during the first ``pretrain_steps`` steps, solve after."""
        warm_up = self.step < self.config.pretrain_steps
        if self.deq is not None:
            self.deq.pretrain_steps = self.config.pretrain_depth if warm_up else 0
        return warm_up

    def jac_weight(self, step: int) -> float:
        """γ_t: the Jacobian regularizer's weight at `step`: ``pretrain_jac_reg_weight`` during
        the warm-up (if set), 0 from epoch ``jac_reg_stop_epoch`` on (if set), otherwise
        ``jac_reg_weight`` after a linear ramp over the first ``jac_reg_ramp_steps`` steps."""
        c = self.config
        if c.jac_reg_stop_epoch is not None and step // self.steps_per_epoch >= c.jac_reg_stop_epoch:
            return 0.0
        if step < c.pretrain_steps and c.pretrain_jac_reg_weight is not None:
            return c.pretrain_jac_reg_weight
        ramp = min(1.0, (step + 1) / c.jac_reg_ramp_steps) if c.jac_reg_ramp_steps else 1.0
        return c.jac_reg_weight * ramp

    def _step_seed(self) -> int:
        """The seed of torch's generator for this step's random draws (dropout masks, Hutchinson
        probes): a function of (seed, step, rank), so a resumed run draws the same, and the
        processes of a distributed run draw differently (each for its own examples)."""
        c = self.config
        return ((c.seed * 1_000_003 + self.step) * 1_000_003 + self.place.rank) % 2 ** 63

    def _jac_reg_now(self) -> bool:
        """Whether this step adds the regularizer: a draw with probability ``jac_reg_prob`` from a
        generator seeded by (seed, step), so a resumed run (and every process) makes the same draws."""
        c = self.config
        if self.deq is None or self.jac_weight(self.step) == 0:
            return False
        draw = torch.rand(1, generator=torch.Generator().manual_seed(c.seed * 7919 + self.step))
        return draw.item() < c.jac_reg_prob

    def train_step(self) -> dict:
        """One optimizer step on the next (global) batch; returns its metrics record, combined
        over the processes."""
        c = self.config
        epoch, x, y = self.batches(self.step)
        x, y = self._inputs(x), y.to(self.device, non_blocking=True)
        torch.manual_seed(self._step_seed())
        pretrain = self._set_warm_up()
        gamma, regularize = self.jac_weight(self.step), self._jac_reg_now()
        start = time.perf_counter()
        self.model.train()
        if self.deq is not None:
            self.deq.jac_probes = c.jac_reg_probes if regularize else 0
        try:
            with self._autocast():
                if self.text:                        # mean NLL per token, from the model itself
                    loss = (self.lm_loss if self.ddp is None else self.ddp)(x, y)
                else:
                    logits = (self.model if self.ddp is None else self.ddp)(x)
        finally:
            if self.deq is not None:
                self.deq.jac_probes = 0
        loss = loss.float() if self.text else F.cross_entropy(logits.float(), y)
        jac_loss = self.deq.jac_loss if regularize else None
        total = loss + gamma * jac_loss if jac_loss is not None else loss
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
        solver = self._solver_metrics()
        acc = None if self.text else (logits.argmax(1) == y).float().mean().item()
        mean_loss, acc, mean_jac = self._all_reduce(
            [loss.item(), acc, jac_loss.item() if jac_loss is not None else None], "sum")
        fwd_nfe, bwd_nfe, residual = self._all_reduce(
            [solver["fwd_nfe"], solver["bwd_nfe"], solver["residual"]], "max")
        w, elapsed = self.place.world_size, time.perf_counter() - start
        speed = ({"tokens_per_s": y.numel() * w / elapsed} if self.text
                 else {"samples_per_s": len(y) * w / elapsed})
        return dict(split="train", step=self.step, epoch=epoch, loss=mean_loss / w,
                    **self._quality(mean_loss / w, acc / w if acc is not None else None),
                    lr=lr, pretrain=pretrain, **speed,
                    jac_weight=gamma if c.jac_reg_weight or c.pretrain_jac_reg_weight else None,
                    jac_loss=mean_jac / w if mean_jac is not None else None,
                    grad_norm=grad_norm, fwd_nfe=_int(fwd_nfe), bwd_nfe=_int(bwd_nfe),
                    residual=residual)

    def _quality(self, loss: float, acc: Optional[float]) -> dict:
        """The task's own measures: accuracy for images; bits per token and perplexity for text."""
        if not self.text:
            return dict(acc=acc)
        return dict(bits_per_token=bits(loss), ppl=math.exp(min(loss, 700.0)))

    def _eval_batches(self, dataset, batch_size: int):
        c, p = self.config, self.place
        if self.text:
            return eval_windows(dataset.tokens, batch_size, c.seq_len, rank=p.rank,
                                world_size=p.world_size)
        return eval_batches(dataset, batch_size, rank=p.rank, world_size=p.world_size,
                            num_workers=c.num_workers, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def evaluate(self, batch_size: Optional[int] = None, *, split: Optional[str] = None) -> dict:
        """Loss and accuracy on the test split, or, for text, loss, bits per token and perplexity
        on the validation split, every token scored once (record ``split="test"``,
        ``eval_split="valid"``); mean forward NFE and worst residual for a DEQ. With several
        processes each evaluates its share and the sums are combined. ``split`` scores another
        split of the dataset instead (e.g. text's "test" at the end; ``limit_test`` applies)."""
        c = self.config
        default = "valid" if self.text else "test"
        own = split in (None, default)
        dataset = self.test_set if own else self._load(split, c.limit_test, False)[0]
        self.model.eval()
        self._set_warm_up()
        loss = correct = count = nfe = batches = 0.0
        residual: Optional[float] = -math.inf
        start = time.perf_counter()
        for x, y in self._eval_batches(dataset, batch_size or c.eval_batch_size):
            x, y = self._inputs(x), y.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.lm_loss(x, y) if self.text else self.model(x)
            if self.text:                                  # mean NLL per token × tokens
                loss += out.float().item() * y.numel()
            else:
                loss += F.cross_entropy(out.float(), y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
            m = self._solver_metrics()
            nfe = nfe + m["fwd_nfe"] if m["fwd_nfe"] is not None and nfe is not None else None
            residual = None if m["residual"] is None or residual is None else max(residual, m["residual"])
            batches += 1
        loss, correct, count, nfe, batches = self._all_reduce([loss, correct, count, nfe, batches], "sum")
        (residual,) = self._all_reduce([residual if residual != -math.inf else None], "max")
        extra = {} if own and not self.text else dict(eval_split=split or default)
        if self.text:
            extra.update(tokens=int(count), tokens_per_s=count / (time.perf_counter() - start))
        return dict(split="test", step=self.step, epoch=(self.step - 1) // self.steps_per_epoch,
                    loss=loss / count, **self._quality(loss / count, correct / count), **extra,
                    fwd_nfe=nfe / batches if nfe is not None else None, residual=residual,
                    **(self._jacobian_metrics() if self.place.is_main else {}))

    def _jacobian_metrics(self) -> dict:
        """ρ(J) (mean and max) and ‖J‖²_F / d at the DEQ's state on the first test examples (text:
        the first validation windows, a window's whole (seq_len, width) state as one sample), with
        fixed random draws so that successive evaluations are comparable (in float32: no autocast)."""
        n = self.config.eval_jacobian_samples
        if self.deq is None or n == 0:
            return {}
        if self.text:
            x, _ = first_windows(self.test_set.tokens, n, self.config.seq_len)
            _, f, z = equilibrium(self.lm_loss, self._inputs(x))
        else:
            _, f, z = equilibrium(self.model, self._inputs(first_images(self.test_set, n)))
        rho = spectral_radius(f, z, generator=torch.Generator().manual_seed(0))
        z_in = z.detach().requires_grad_()
        with torch.enable_grad():
            fro = hutchinson_frobenius(f(z_in), z_in, n_probes=4, kind="rademacher",
                                       generator=torch.Generator().manual_seed(1))
        return dict(spectral_radius=rho.mean().item(), spectral_radius_max=rho.max().item(),
                    jac_frobenius=fro.mean().item())

    def _record(self, record: dict, callback) -> None:
        """Keep the record (every process), append it to the log (rank 0), pass it to `callback`."""
        record["time"] = time.time()
        self.history.append(record)
        if self.config.log_path and self.place.is_main:
            Path(self.config.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
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
                rec = self.train_step()
                self._record(rec, callback)
                bar.update(1)
                quality = (dict(bpt=f"{rec['bits_per_token']:.3f}") if self.text
                           else dict(acc=f"{rec['acc']:.2f}"))
                bar.set_postfix(loss=f"{rec['loss']:.3f}", **quality, nfe=rec["fwd_nfe"],
                                refresh=False)
                eval_every = c.eval_every or self.steps_per_epoch
                if self.step % eval_every == 0 or self.step == self.total_steps:
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
            with open(c.log_path, "a") as fh:
                fh.write(json.dumps({"event": "done", "step": self.step, "time": time.time()}) + "\n")
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
            kept = [r for r in read_log(log) if r.get("step", 0) <= trainer.step and "event" not in r]
            Path(log).write_text("".join(json.dumps(r) + "\n" for r in kept))
        return trainer


def _int(value: Optional[float]) -> Optional[int]:
    return int(value) if value is not None else None


def _parse_set(items: list[str]) -> dict:
    """``["epochs=3", "model_options.hidden=64"]`` → nested dict; values parsed as JSON if they can be."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return merged


def main(argv=None) -> None:
    from .configs import PRESETS, load_preset
    parser = argparse.ArgumentParser(prog="python -m deqlite.train",
                                     description="Train a preset (under torchrun: on every process).")
    parser.add_argument("--config", required=True, help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set epochs=2 --set model_options.hidden=64")
    parser.add_argument("--log", "--log-path", dest="log",
                        help="JSONL log path (default runs/CONFIG.jsonl); spell it --log-path under "
                             "torchrun, whose own parser takes --log for an abbreviation of its options")
    parser.add_argument("--checkpoint", help="checkpoint path (default runs/CONFIG.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args(argv)
    config = _merge(load_preset(args.config), _parse_set(args.set))
    config.setdefault("log_path", args.log or f"runs/{args.config}.jsonl")
    config.setdefault("checkpoint_path", args.checkpoint or f"runs/{args.config}.pt")
    if args.log:
        config["log_path"] = args.log
    if args.checkpoint:
        config["checkpoint_path"] = args.checkpoint
    main_process = Place.from_env().is_main
    finished = False
    try:
        if args.resume and Path(config["checkpoint_path"]).exists():
            trainer = Trainer.resume(config["checkpoint_path"], log_path=config["log_path"],
                                     checkpoint_path=config["checkpoint_path"])
        else:
            if main_process and config.get("log_path") and Path(config["log_path"]).exists():
                Path(config["log_path"]).unlink()
            trainer = Trainer(config)
        start = time.perf_counter()
        trainer.fit()
        finished = True
    finally:
        shutdown_distributed(wait=finished)
    final = [r for r in trainer.history if r["split"] == "test"][-1]
    if main_process:
        quality = (f"validation loss {final['loss']:.4f} nats/token, {final['bits_per_token']:.4f} "
                   f"bits/token, perplexity {final['ppl']:.2f}" if trainer.text
                   else f"test accuracy {final['acc']:.4f}, test loss {final['loss']:.4f}")
        print(f"{quality}, forward NFE {final['fwd_nfe']}, {time.perf_counter() - start:.1f} s, "
              f"{trainer.place.world_size} process(es) "
              f"(log: {config['log_path']}, checkpoint: {config['checkpoint_path']})")


if __name__ == "__main__":
    main()
