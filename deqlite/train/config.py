"""`TrainConfig`: every setting of a training run, in one flat dataclass, checked when made.

The settings and what they do are the fields below (each with a comment); the groups:

* data: ``dataset`` (a key of ``deqlite.data.DATASETS``), ``data_root``, ``download``,
  ``limit_train``/``limit_test``, ``seq_len`` (text), ``augment``/``normalize`` (images),
  ``num_workers`` (datasets read from disk);
* model: ``model`` (a key of ``deqlite.models.MODELS``) and its ``model_options`` (its ``deq``
  entry holds the ``deqlite.DEQ`` options);
* optimization: ``epochs``/``max_steps``, ``batch_size`` (the *global* batch under torchrun),
  ``optimizer`` and ``optimizer_options``, ``lr``, ``weight_decay``, ``schedule``/``lr_min``
  with a linear rise over ``lr_warmup_steps`` first, ``grad_clip``, ``amp``, ``channels_last``;
* the DEQ: the warm-up (``pretrain_steps`` steps unrolling the cell ``pretrain_depth`` times,
  evaluations then ``pretrain_eval_depth`` times), the random forward cap of a training step
  (``max_iter_jitter``, ``max_iter_jitter_rule``) and Jacobian regularization (``jac_reg_*``,
  with ``jac_reg_increment*`` raising γ in steps, ``pretrain_jac_reg_weight``); the formulas are
  in ``deq_hooks``;
* bookkeeping: ``seed``, ``device``, ``log_path``, ``checkpoint_path``/``checkpoint_every``,
  ``tensorboard`` (a folder for TensorBoard events of the log's numbers, ``tensorboard_log``),
  ``eval_every``, ``eval_jacobian_samples``.

At scale (the vision recipes), what the trainer does with these settings:

* ``amp="bf16"`` / ``"fp16"``: the model's forward runs under ``torch.autocast`` (fp16 with a
  gradient scaler); the loss is taken in float32, the weights stay float32. The solver keeps the
  state's dtype: on CUDA, autocast runs GroupNorm in float32, so cells that end in it (MDEQ's)
  keep float32 states; a state rounded to bf16 (on CPU) stalls at a relative residual ~2e-3.
* ``channels_last``: conv weights and input images in NHWC memory layout (faster convs on GPUs).
* ``grad_clip``: clip the gradient's global norm (the MDEQ recipes do).
* Datasets read from disk (ImageNet) stream through a ``DataLoader`` with ``num_workers`` worker
  processes (pinned memory on CUDA); in-memory ones are indexed directly.
* Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process trains on its part of
  each global batch -- ``batch_size`` is the *global* batch, each of W processes gets
  batch_size / W -- inside ``DistributedDataParallel``, which averages the gradients: the W
  processes take the step one process would take on the whole batch (``deqlite.train.distributed``).
  Logged numbers are combined over the processes (mean loss and accuracy, largest NFE and
  residual); evaluation is split between them and summed (ρ(J) on rank 0). Only rank 0 writes the
  log and checkpoints and shows the progress bar.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._validate import check_keys, check_range, lookup
from ..data import is_text

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "constant")
# the two halves of github.com/locuslab/deq draw the forward cap's jitter and count γ's increments
# differently: DEQ-Sequence (train_transformer.py) and MDEQ-Vision (lib/core/cls_function.py)
RECIPE_RULES = ("sequence", "vision")
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# what a resumed run may change: how far it trains, where its files and data are, how it loads
# and which device it runs on (none changes the steps already taken); anything else is a new run
RESUMABLE = ("epochs", "max_steps", "log_path", "checkpoint_path", "tensorboard", "data_root",
             "download", "num_workers", "device")


@dataclass
class TrainConfig:
    """Everything a run needs, flat (``--set epochs=3``; a notebook's ``config.update(...)``);
    presets in ``deqlite/train/configs`` fill it in. An unknown key or a bad value is an error
    when the config is made. The trailing comment of each field says what it does."""
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
    lr_warmup_steps: int = 0               # lr rises linearly over these first steps, then the schedule
    grad_clip: Optional[float] = None      # clip the gradient's global norm to this (None: don't)
    amp: str = "none"                      # autocast the forward: "none", "bf16", "fp16" (+ scaler)
    channels_last: bool = False            # model and images in torch.channels_last memory layout
    pretrain_steps: int = 0                # warm-up steps with the cell unrolled ...
    pretrain_depth: int = 6                # ... this many times
    pretrain_eval_depth: Optional[int] = None   # evaluations in the warm-up unroll it so often (None: as training)
    max_iter_jitter: int = 0               # J: after the warm-up, a training step's forward cap is ...
    max_iter_jitter_rule: str = "sequence"     # ... max_iter − U{0..J} ("sequence"), or max_iter + U{−J..1} on JR steps ("vision")
    jac_reg_weight: float = 0.0            # γ of the Jacobian regularizer (0: off)
    jac_reg_prob: float = 1.0              # apply it on a step with this probability
    jac_reg_probes: int = 1                # Hutchinson probes per step
    jac_reg_ramp_steps: int = 0            # γ rises linearly from 0 over these steps (0: constant)
    jac_reg_increment: float = 0.0         # after the warm-up γ grows by this ...
    jac_reg_increment_every: int = 0       # ... every this many steps (both or neither)
    jac_reg_increment_rule: str = "sequence"   # at step multiples of N ("sequence") or N, 2N.. after the warm-up ("vision")
    pretrain_jac_reg_weight: Optional[float] = None   # γ during the warm-up (None: as after it)
    jac_reg_stop_epoch: Optional[int] = None           # no regularizer from this epoch on
    eval_jacobian_samples: int = 100       # test examples for ρ(J), ‖J‖²_F/d at evaluation (0: skip)
    seed: int = 0
    device: str = "auto"                   # "auto": cuda when available (cuda:$LOCAL_RANK under torchrun)
    log_path: Optional[str] = None         # JSONL, one record per step / evaluation
    tensorboard: Optional[str] = None      # a folder: the log's numbers also as TensorBoard events (rank 0)
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0              # steps; 0: at the end of every epoch
    eval_every: int = 0                    # steps; 0: at the end of every epoch

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config; an unknown key is an error that names the valid ones."""
        check_keys(values, [f.name for f in dataclasses.fields(cls)], noun="config key",
                   error=KeyError)
        return cls(**values)

    @classmethod
    def coerce(cls, config: "TrainConfig | dict") -> "TrainConfig":
        """The config itself, or one built from a dict with ``from_dict``."""
        return config if isinstance(config, cls) else cls.from_dict(config)

    def __post_init__(self):
        lookup(OPTIMIZERS, self.optimizer, "optimizer")
        lookup(SCHEDULES, self.schedule, "schedule")
        lookup(AMP, self.amp, "amp mode")
        lookup(RECIPE_RULES, self.max_iter_jitter_rule, "max_iter_jitter_rule")
        lookup(RECIPE_RULES, self.jac_reg_increment_rule, "jac_reg_increment_rule")
        for name in ("download", "augment", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "seq_len"):
            check_range(getattr(self, name), name, low=1, integer=True)
        for name in ("limit_train", "limit_test", "max_steps"):      # None: no limit
            if getattr(self, name) is not None:
                check_range(getattr(self, name), name, low=1, integer=True)
        for name in ("model_options", "optimizer_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict of options, e.g. --set {name}.KEY=VALUE; "
                                f"got {getattr(self, name)!r}.")
        _check_device(self.device)
        if self.tensorboard is not None:
            self.tensorboard = _check_folder(self.tensorboard, "tensorboard")
        for name in ("pretrain_steps", "pretrain_depth", "checkpoint_every", "seed", "num_workers",
                     "jac_reg_ramp_steps", "eval_jacobian_samples", "eval_every", "lr_warmup_steps",
                     "max_iter_jitter", "jac_reg_increment_every"):
            check_range(getattr(self, name), name, low=0, integer=True)
        check_range(self.lr, "lr", low=0, low_open=True, high=math.inf)
        if math.isinf(self.lr):
            raise ValueError("lr must be finite, got inf.")
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
        if self.pretrain_eval_depth is not None:
            check_range(self.pretrain_eval_depth, "pretrain_eval_depth", low=1, integer=True)
        check_range(self.jac_reg_increment, "jac_reg_increment", low=0)
        if math.isinf(self.jac_reg_increment):
            raise ValueError("jac_reg_increment must be finite, got inf.")
        if bool(self.jac_reg_increment) != bool(self.jac_reg_increment_every):
            raise ValueError(f"jac_reg_increment and jac_reg_increment_every go together (γ grows "
                             f"by the one every so many steps): set both or neither; got "
                             f"{self.jac_reg_increment!r} and {self.jac_reg_increment_every!r}.")
        check_range(self.jac_reg_probes, "jac_reg_probes", low=1, integer=True)
        if is_text(self.dataset):
            for name in ("augment", "normalize", "channels_last"):
                if getattr(self, name) not in (False, None):
                    raise ValueError(f"{name} applies to images; dataset {self.dataset!r} is text "
                                     f"(token windows of seq_len). Leave {name} unset.")


def _check_device(name) -> None:
    """"auto", or a torch device string: "cpu", "cuda", "cuda:1", "mps"."""
    valid = "\"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"mps\""
    if not isinstance(name, str):
        raise TypeError(f"device must be a string ({valid}); got {name!r}.")
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        hint = " (PyTorch calls a GPU \"cuda\")" if name.lower().startswith("gpu") else ""
        raise ValueError(f"device {name!r} is not a device{hint}: use {valid}.") from None


def _check_folder(value, name: str) -> str:
    """A folder path: a non-empty str or os.PathLike, kept as a str (checkpoints hold the config,
    and load only plain values)."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a folder path (a string, e.g. runs/tb) or None; got "
                        f"{value!r}.")
    if not path:
        raise ValueError(f"{name} must be a folder path, e.g. runs/tb (None: off); got \"\".")
    return path


def _check_optimizer_options(name: str, options: dict) -> None:
    """The options are keyword arguments of the torch optimizer (lr, weight_decay: own keys)."""
    if not isinstance(options, dict):
        raise TypeError(f"optimizer_options must be a dict, got {options!r}.")
    for key in ("lr", "weight_decay"):
        if key in options:
            raise TypeError(f"set {key!r} as the config's own key, not in optimizer_options.")
    params = inspect.signature(OPTIMIZERS[name]).parameters
    check_keys(options, [p for p in params if p not in ("self", "params", "lr", "weight_decay")],
               what=f"optimizer {name!r}")


def _check_normalize(value) -> None:
    """[mean, std]: two lists of numbers, one per channel, every std > 0."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (list, tuple)) and v and len(v) == len(value[0]) for v in value)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for v in value for x in v))
    if not ok or min(value[1]) <= 0:
        raise ValueError(f"normalize must be [mean, std], two lists with one number per channel "
                         f"(std > 0), e.g. [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]]; "
                         f"got {value!r}.")
