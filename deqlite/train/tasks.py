"""Tasks: what the training loop needs to know about the data, so that the loop knows nothing of
it (minGPT's rule; litgpt's ``DataModule`` plays this part there).

A task is built once from the config and answers, for its kind of data:

* the data: ``train_set`` and ``test_set`` (the held-out split evaluated during training),
  ``load(split)``, ``train_batches()`` (the batches of step k, ``deqlite.data.batches``),
  ``eval_batches(dataset, batch_size)``, ``inputs(x)`` (a batch as the model takes it) and
  ``probe_inputs(n)`` (fixed examples for the Jacobian's numbers);
* the model: ``model_options(cls)`` (the data's shape, for the options the model takes) and
  ``module(model)`` (what the loop calls and DDP wraps);
* the numbers: ``forward(module, x, y)`` and ``loss(out, y)`` for a training step,
  ``eval_sums(out, y)`` for an evaluation, ``quality(loss, acc)``, ``speed``, ``progress`` and
  ``summary`` for the records, the progress bar and the command line.

``ImageClassification``: images (N, C, H, W) in [0, 1] and class labels; the loss is the
cross-entropy of the logits, the quality the accuracy.

``LanguageModeling``: token windows x (N, T) and the next tokens y; the loss is the model's own
``loss(x, y)``, the mean negative log-likelihood per token in nats; the quality is bits per token
(loss / ln 2; for characters bits per character) and the perplexity e^loss. The held-out split is
"valid" (records keep ``split="test"``, the held-out record every dashboard plots, and say
``eval_split="valid"``); score "test" at the end with ``trainer.evaluate(split="test")``.

A model with a Transformer-XL memory (``mem_len``, ``deqlite.models.language``) reads each row
of the stream segment after segment: step k's windows continue step k−1's, so the task keeps the
memory the model returned at step k−1 and passes it at step k; it starts empty where a row
starts (window 0 of an epoch) and at every evaluation, which carries its own memory from window
to window. The training memory is part of the checkpoint (``state_dict``: gathered from every
process, so a resumed run, even with another number of processes, goes on with the same memory).
A task's hooks, called by the trainer: ``begin_step(step)``, ``begin_evaluation()``,
``state_dict()`` / ``load_state_dict(state)`` (no-ops for images).
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .._validate import keyword_options
from ..data import is_text, load_dataset
from ..data.batches import StreamBatches, TrainBatches, eval_batches, eval_windows, first_windows
from ..data.images import first_images, image_shape, num_classes, take
from ..data.text import bits
from ..transformer_xl import Memory
from ..models import MODELS, is_language_model
from .config import TrainConfig
from .distributed import Place


class _Task:
    """What both tasks share: the config, where this process stands, and the data, loaded once
    (``data``: the (train, held-out) datasets to use instead, e.g. synthetic ones)."""
    held_out = "test"
    language = False

    def __init__(self, config: TrainConfig, place: Place, device: torch.device, *,
                 data: Optional[tuple] = None):
        self.config, self.place, self.device = config, place, device
        c = config
        self.train_set, self.test_set = data if data is not None else (
            self.load("train", c.limit_train, c.augment), self.load(self.held_out, c.limit_test))

    def model_options(self, cls: type) -> dict:
        """The options to build model class ``cls`` with: the data's shape, for the options it
        takes, then the config's ``model_options`` (which win)."""
        if is_language_model(cls) != self.language:
            kind = "a language model" if self.language else "an image model"
            fit = [n for n, m in MODELS.items() if is_language_model(m) == self.language]
            raise ValueError(f"dataset {self.config.dataset!r} needs {kind}, and model "
                             f"{self.config.model!r} is not one (language models have "
                             f"loss(tokens, targets)); models that fit: {', '.join(fit)}.")
        takes = keyword_options(cls.__init__)
        shape = {k: v for k, v in self.data_shape().items() if k in takes}
        return {**shape, **self.config.model_options}

    def data_shape(self) -> dict:
        raise NotImplementedError

    def module(self, model: nn.Module) -> nn.Module:
        return model

    def speed(self, y: torch.Tensor, world_size: int, seconds: float) -> dict:
        return {"samples_per_s": len(y) * world_size / seconds}

    # hooks of the trainer, for tasks with state across steps (the text memory); none here
    def begin_step(self, step: int) -> None:
        """Step `step` is about to run."""

    def begin_evaluation(self) -> None:
        """An evaluation is about to run."""

    def state_dict(self) -> Optional[dict]:
        """What a checkpoint must hold for exact resume, beyond model and optimizer (every
        process calls it)."""
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore ``state_dict()``'s state."""


class ImageClassification(_Task):
    """Images and class labels (module docstring)."""

    def __init__(self, config: TrainConfig, place: Place, device: torch.device, *,
                 data: Optional[tuple] = None):
        super().__init__(config, place, device, data=data)
        self.n_classes = num_classes(self.train_set)
        self.mean_std = self._normalization()

    def load(self, split: str, limit: Optional[int] = None, augment: bool = False) -> Dataset:
        c = self.config
        ds = load_dataset(c.dataset, split, root=c.data_root, download=c.download, augment=augment)
        return ds if limit is None else take(ds, limit)

    def data_shape(self) -> dict:
        shape = image_shape(self.train_set)
        return dict(in_channels=shape[0], image_size=shape[-1], n_classes=self.n_classes)

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

    def train_batches(self) -> TrainBatches:
        c, p = self.config, self.place
        return TrainBatches(self.train_set, c.batch_size, seed=c.seed, rank=p.rank,
                            world_size=p.world_size, num_workers=c.num_workers,
                            pin_memory=self.device.type == "cuda")

    def eval_batches(self, dataset: Dataset, batch_size: int) -> Iterator:
        c, p = self.config, self.place
        return eval_batches(dataset, batch_size, rank=p.rank, world_size=p.world_size,
                            num_workers=c.num_workers, pin_memory=self.device.type == "cuda")

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """On the device, normalized, channels-last if asked."""
        x = x.to(self.device, non_blocking=True)
        if self.mean_std is not None:
            x = (x - self.mean_std[0]) / self.mean_std[1]
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def probe_inputs(self, n: int) -> torch.Tensor:
        return self.inputs(first_images(self.test_set, n))

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return module(x)                                    # logits

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Optional[float]]:
        """(mean cross-entropy, this batch's accuracy)."""
        return F.cross_entropy(out.float(), y), (out.argmax(1) == y).float().mean().item()

    def eval_sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(summed loss, number right) of one evaluation batch."""
        return (F.cross_entropy(out.float(), y, reduction="sum").item(),
                (out.argmax(1) == y).sum().item())

    def quality(self, loss: float, acc: Optional[float]) -> dict:
        return dict(acc=acc)

    def eval_extra(self, split: Optional[str], count: float, seconds: float) -> dict:
        return {} if split in (None, self.held_out) else dict(eval_split=split)

    def progress(self, record: dict) -> dict:
        return dict(acc=f"{record['acc']:.2f}")

    def summary(self, record: dict) -> str:
        return f"test accuracy {record['acc']:.4f}, test loss {record['loss']:.4f}"


class LanguageModelLoss(nn.Module):
    """``model.loss(tokens, targets)`` as a module's forward. DistributedDataParallel averages the
    gradients of what the forward of the module it wraps computes, so a language model trains
    under DDP through this wrapper; ``deqlite.deq.equilibrium`` calls ``module(inputs)``, for
    which ``targets=None`` scores the inputs as their own targets (only the model's equilibrium
    state is wanted then)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                memory=None) -> torch.Tensor:
        targets = tokens if targets is None else targets
        if memory is None:                      # (a model without memory takes no memory=)
            return self.model.loss(tokens, targets)
        return self.model.loss(tokens, targets, memory=memory)


def _pack(memory) -> Optional[list]:
    """A model's memory (a ``Memory`` pair, or a list of them, one per layer) as a list of
    [z, u] pairs of tensors (what a checkpoint can hold)."""
    if memory is None:
        return None
    return [list(memory)] if isinstance(memory, Memory) else [list(m) for m in memory]


def _unpack(packed: Optional[list], one: bool):
    if packed is None:
        return None
    memories = [Memory(*pair) for pair in packed]
    return memories[0] if one else memories


class LanguageModeling(_Task):
    """Token windows and the next tokens (module docstring). ``limit_train`` / ``limit_test``
    count tokens; the model gets ``vocab_size`` from the data and ``max_len = seq_len``."""
    held_out = "valid"
    language = True

    def load(self, split: str, limit: Optional[int] = None, augment: bool = False):
        c = self.config
        ds = load_dataset(c.dataset, split, root=c.data_root, download=c.download)
        return ds if limit is None else ds.take(limit)

    def data_shape(self) -> dict:
        return dict(vocab_size=self.train_set.vocab_size, max_len=self.config.seq_len)

    def model_options(self, cls: type) -> dict:
        options = super().model_options(cls)
        seq_len = self.config.seq_len
        if "max_len" in keyword_options(cls.__init__) and options["max_len"] < seq_len:
            raise ValueError(f"model_options.max_len = {options['max_len']} is shorter than "
                             f"seq_len = {seq_len}: raise max_len or leave it unset (it is "
                             f"seq_len then).")
        return options

    def module(self, model: nn.Module) -> nn.Module:
        return LanguageModelLoss(model)

    def __init__(self, config: TrainConfig, place: Place, device: torch.device, *,
                 data: Optional[tuple] = None):
        super().__init__(config, place, device, data=data)
        self.stream: Optional[StreamBatches] = None
        self.memory = {"train": None, "eval": None}     # the model's memory for the next window
        self.memory_step: Optional[int] = None          # the step the training memory is for

    def train_batches(self) -> StreamBatches:
        c, p = self.config, self.place
        self.stream = StreamBatches(self.train_set, c.batch_size, c.seq_len, rank=p.rank,
                                    world_size=p.world_size)
        return self.stream

    def eval_batches(self, dataset, batch_size: int) -> Iterator:
        p = self.place
        return eval_windows(dataset, batch_size, self.config.seq_len, rank=p.rank,
                            world_size=p.world_size)

    def begin_step(self, step: int) -> None:
        """The memory of step − 1 goes on into `step`, unless a row starts again there."""
        starts_row = self.stream is not None and self.stream.window(step).start == 0
        if starts_row or self.memory_step != step:
            self.memory["train"] = None
        self.memory_step = step

    def begin_evaluation(self) -> None:
        self.memory["eval"] = None

    def state_dict(self) -> Optional[dict]:
        """The training memory and the step it is for, its rows gathered from every process (in
        rank order: the rows of the global batch)."""
        packed = _pack(self.memory["train"])
        if packed is not None and self.place.world_size > 1:
            import torch.distributed as dist
            gathered = []
            for pair in packed:
                both = []
                for t in pair:
                    parts = [torch.empty_like(t) for _ in range(self.place.world_size)]
                    dist.all_gather(parts, t.contiguous())
                    both.append(torch.cat(parts).cpu())
                gathered.append(both)
            packed = gathered
        elif packed is not None:
            packed = [[t.cpu() for t in pair] for pair in packed]
        return dict(memory=packed, memory_step=self.memory_step,
                    one=isinstance(self.memory["train"], Memory))

    def load_state_dict(self, state: Optional[dict]) -> None:
        """This process's rows of the saved memory (see ``state_dict``)."""
        if not state or state.get("memory") is None:
            return
        p, rows = self.place, self.config.batch_size // self.place.world_size
        mine = slice(p.rank * rows, (p.rank + 1) * rows)
        packed = [[t[mine].to(self.device) for t in pair] for pair in state["memory"]]
        self.memory["train"] = _unpack(packed, state["one"])
        self.memory_step = state["memory_step"]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def probe_inputs(self, n: int) -> torch.Tensor:
        return self.inputs(first_windows(self.test_set, n, self.config.seq_len)[0])

    def forward(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean NLL per token, from the model, given the memory of the window before (kept
        per mode: training steps, evaluation windows)."""
        model = getattr(module, "module", module).model     # inside DDP and LanguageModelLoss
        kind = "train" if model.training else "eval"
        out = module(x, y, self.memory[kind])
        self.memory[kind] = getattr(model, "next_memory", None)
        if kind == "train" and self.memory_step is not None:
            self.memory_step += 1                           # the memory is for the next step
        return out

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Optional[float]]:
        return out.float(), None

    def eval_sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return out.float().item() * y.numel(), 0.0          # mean NLL per token × tokens

    def quality(self, loss: float, acc: Optional[float]) -> dict:
        return dict(bits_per_token=bits(loss), ppl=math.exp(min(loss, 700.0)))

    def speed(self, y: torch.Tensor, world_size: int, seconds: float) -> dict:
        return {"tokens_per_s": y.numel() * world_size / seconds}

    def eval_extra(self, split: Optional[str], count: float, seconds: float) -> dict:
        return dict(eval_split=split or self.held_out, tokens=int(count),
                    tokens_per_s=count / seconds)

    def progress(self, record: dict) -> dict:
        return dict(bpt=f"{record['bits_per_token']:.3f}")

    def summary(self, record: dict) -> str:
        return (f"validation loss {record['loss']:.4f} nats/token, {record['bits_per_token']:.4f} "
                f"bits/token, perplexity {record['ppl']:.2f}")


TASKS = {"image": ImageClassification, "text": LanguageModeling}


def task_for(config: TrainConfig) -> type:
    """The task class of the config's dataset: language modeling for text, else images."""
    return TASKS["text" if is_text(config.dataset) else "image"]
