"""The batches a training run draws: those of step k are a function of (seed, k) alone, for
process r of W, so that a resumed run, or one with more loader workers, draws the same.

Images (``TrainBatches``). Epoch e visits the examples in the order ``randperm(n)`` drawn from a
generator seeded by (seed, e); step i of the epoch takes the *global batch*
``order[i·B : (i+1)·B]``; with W processes, process r takes the r-th of W equal contiguous parts
of it (B/W examples), so the W processes together see exactly the global batch one process
would. Random augmentation is keyed by (seed, epoch, example) too, so an example is augmented the
same way whichever process, worker or resumed run loads it. ``eval_batches`` goes through a split
in order, un-augmented.

Text (``StreamBatches``, the standard scheme for long sequences with a truncated context): cut
the token stream into ``batch_size`` rows of equal length L; row r holds inputs t[rL : (r+1)L]
and the targets one token later, t[rL+1 : (r+1)L+1]. Step k takes window k mod n_windows of
every row, columns [wT, (w+1)T) with T = ``seq_len``:

    x = inputs[:, wT:(w+1)T],   y = targets[:, wT:(w+1)T]    (y is x shifted by one token)

and with W processes process p takes rows [pB/W, (p+1)B/W) of each window. Every window starts
from an empty context (no memory is carried between windows). ``eval_windows`` goes through a
whole split the same way, the last, shorter window included, so every token after the first is
scored once.

A stream too short for one batch, an empty dataset or a rank outside the run is an error that
says so (with the numbers: how many tokens there are, how many are needed), never an empty loop.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from .._validate import check_range
from .text import TokenStream


def _check_place(rank: int, world_size: int) -> None:
    """Process `rank` is one of the run's `world_size` processes, numbered from 0."""
    check_range(world_size, "world_size", low=1, integer=True)
    check_range(rank, "rank", low=0, integer=True)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} processes, numbered 0 to "
                         f"{world_size - 1}.")


def _check_global_batch(batch_size: int, world_size: int, what: str = "examples") -> None:
    """The global batch is split evenly between the processes."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch ({what}) and must be "
                         f"divisible by the number of processes, {world_size}; try "
                         f"{world_size * max(1, round(batch_size / world_size))}.")


# --- images --------------------------------------------------------------------------------------

def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s order (and, after it, of its augmentation choices)."""
    return torch.Generator().manual_seed(_epoch_seed(seed, epoch))


class _Keyed(Dataset):
    """``keyed[(i, key)]`` is ``dataset[i]`` read with torch's generator seeded by `key`: random
    transforms depend on the key alone, not on the worker process or the order of reading."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, key = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            return self.dataset[index]


class _RankBatches(Sampler):
    """Batch sampler: this process's part of each global batch of one epoch, from step `start` on,
    as lists of (index, key) for ``_Keyed``."""

    def __init__(self, batches: "TrainBatches", epoch: int, start: int):
        self.batches, self.epoch, self.start = batches, epoch, start

    def __len__(self) -> int:
        return self.batches.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list]:
        b = self.batches
        base = _epoch_seed(b.seed, self.epoch) * len(b.dataset)      # key: one per (epoch, example)
        for i in range(self.start, b.steps_per_epoch):
            yield [(k, base + k) for k in b.indices(b.steps_per_epoch * self.epoch + i).tolist()]


class TrainBatches:
    """The training batches of a run, for process `rank` of `world_size` (see the module docstring):
    ``batches(step) -> (epoch, images, labels)`` on the CPU, a function of (seed, step) alone.

    ``batch_size`` is the *global* batch; each process gets ``batch_size // world_size`` examples.
    With one process the last batch of an epoch may be smaller; with several, an incomplete last
    batch is dropped (as ``DistributedSampler(drop_last=True)``), so every process steps with the
    same number of examples and their mean gradient is the global batch's.

    In-memory datasets are indexed directly; other datasets are read by a ``DataLoader`` with
    `num_workers` worker processes (and `pin_memory`), started at the step asked for, so a resumed
    run reads the same examples, transformed the same way, whatever `num_workers` is.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        check_range(batch_size, "batch_size", low=1, integer=True)
        check_range(num_workers, "num_workers", low=0, integer=True)
        _check_place(rank, world_size)
        _check_global_batch(batch_size, world_size)
        n = len(dataset)
        if n == 0:
            raise ValueError("the training set is empty (0 examples): there is nothing to train "
                             "on. Check the dataset and, if set, limit_train.")
        if world_size > 1 and n < batch_size:
            raise ValueError(f"{n} training examples make no full global batch of {batch_size}.")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = math.ceil(n / batch_size) if world_size == 1 else n // batch_size
        self.in_memory = isinstance(dataset, TensorDataset)
        self._epoch, self._order, self._choices = None, None, None   # the current epoch's draws
        self._stream, self._stream_step = None, None                 # a loader and its next step

    def _draw_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = epoch_generator(self.seed, epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)
            augment = getattr(self.dataset, "augment", None) if self.in_memory else None
            self._choices = augment.draw(len(self.dataset), g) if augment is not None else None
            self._epoch = epoch

    def indices(self, step: int) -> torch.Tensor:
        """The dataset indices this process trains on at `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        self._draw_epoch(epoch)
        global_batch = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        return global_batch.tensor_split(self.world_size)[self.rank]

    def __call__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.in_memory:
            idx = self.indices(step)
            x, y = (t[idx] for t in self.dataset.tensors)
            if self._choices is not None:
                x = self.dataset.augment.apply(x, self._choices[idx])
            return epoch, x, y
        if self._stream is None or self._stream_step != step:      # first step, or a jump (resume)
            self._stream = iter(self._loader(epoch, i))
        x, y = next(self._stream)
        self._stream_step = step + 1
        if i == self.steps_per_epoch - 1:                           # epoch done: let workers go
            self._stream = None
        return epoch, x, y

    def _loader(self, epoch: int, start: int) -> DataLoader:
        return DataLoader(_Keyed(self.dataset), batch_sampler=_RankBatches(self, epoch, start),
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(0))   # leaves torch's RNG alone


def eval_batches(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of process `rank`'s contiguous share of `dataset`, in order,
    un-augmented for an in-memory set (evaluation sees the test images as they are)."""
    check_range(batch_size, "batch_size", low=1, integer=True)
    _check_place(rank, world_size)
    if len(dataset) == 0:
        raise ValueError("the dataset to evaluate is empty (0 examples): a score of nothing is "
                         "no score. Check the dataset and, if set, limit_test.")
    share = torch.arange(len(dataset)).tensor_split(world_size)[rank]
    if isinstance(dataset, TensorDataset):
        lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
        for i in range(lo, hi, batch_size):
            yield tuple(t[i:min(i + batch_size, hi)] for t in dataset.tensors)
        return
    yield from DataLoader(Subset(dataset, share.tolist()), batch_size=batch_size,
                          num_workers=num_workers, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(0))   # leaves torch's RNG alone


# --- text: contiguous windows --------------------------------------------------------------------------

def _tokens(stream) -> tuple[torch.Tensor, str]:
    """The ids of `stream` (a ``TokenStream`` or a 1-D tensor of ids) and its name for messages
    (a TokenStream's says which file it was read from)."""
    if isinstance(stream, TokenStream):
        return stream.tokens, stream.where
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        shape = tuple(stream.shape) if isinstance(stream, torch.Tensor) else type(stream).__name__
        raise ValueError(f"the tokens must be a TokenStream or a 1-D tensor of ids, got {shape}.")
    return stream, "the token stream"


def _rows(tokens: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (rows, L) with L = (N − 1) // rows ≥ 1 (the callers check the
    length): row r of the inputs is tokens[rL : (r+1)L], its targets the same one token later."""
    length = (len(tokens) - 1) // rows
    used = tokens[:rows * length + 1]
    return used[:-1].view(rows, length), used[1:].view(rows, length)


class StreamBatches:
    """The training batches of a token stream, for process `rank` of `world_size` (see the module
    docstring): ``batches(step) -> (epoch, x, y)``, x and y (batch_size / world_size, seq_len)
    int64 with y the tokens after x; a function of the step alone. An epoch is one pass over
    the ``steps_per_epoch`` full windows (a row's last L mod seq_len tokens are not trained on).
    `tokens`: a ``TokenStream`` (its file is then named in errors) or a 1-D tensor of ids."""

    def __init__(self, tokens, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1):
        check_range(batch_size, "batch_size", low=1, integer=True)
        check_range(seq_len, "seq_len", low=1, integer=True)
        _check_place(rank, world_size)
        _check_global_batch(batch_size, world_size, "rows")
        tokens, where = _tokens(tokens)
        needed = batch_size * seq_len + 1          # one window of every row, and the last target
        if len(tokens) < needed:
            row = max(0, (len(tokens) - 1) // batch_size)
            raise ValueError(f"{where} has {len(tokens):,} tokens, fewer than one training step "
                             f"needs: batch_size × seq_len + 1 = {batch_size} × {seq_len} + 1 = "
                             f"{needed:,} (in {batch_size} rows they make rows of {row} tokens, "
                             f"shorter than seq_len = {seq_len}). Lower batch_size or seq_len, or "
                             f"use a longer text.")
        inputs, targets = _rows(tokens, batch_size)
        self.steps_per_epoch = inputs.shape[1] // seq_len
        mine = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.inputs, self.targets = inputs[mine], targets[mine]
        self.batch_size, self.seq_len = batch_size, seq_len

    def window(self, k: int) -> slice:
        """The columns of step k: window k mod steps_per_epoch."""
        w = k % self.steps_per_epoch
        return slice(w * self.seq_len, (w + 1) * self.seq_len)

    def __call__(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        cols = self.window(step)
        return (step // self.steps_per_epoch, self.inputs[:, cols].contiguous(),
                self.targets[:, cols].contiguous())


def eval_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) windows through a whole split, for evaluation: the stream in ``batch_size`` rows *in
    all*, process `rank` taking its contiguous share of them (so the windows, and the score, do
    not depend on the number of processes), every window in order, the last one shorter if the
    rows do not divide evenly. `tokens`: a ``TokenStream`` or a 1-D tensor of ids."""
    check_range(seq_len, "seq_len", low=1, integer=True)
    check_range(batch_size, "batch_size", low=1, integer=True)
    _check_place(rank, world_size)
    tokens, where = _tokens(tokens)
    if len(tokens) < batch_size + 1:
        raise ValueError(f"{where} has {len(tokens):,} tokens; evaluating it in batch_size = "
                         f"{batch_size} rows needs at least {batch_size + 1:,} (a token and its "
                         f"target in every row). Lower the (eval) batch size.")
    inputs, targets = _rows(tokens, batch_size)
    mine = torch.arange(batch_size).tensor_split(world_size)[rank]
    if len(mine) == 0:                                    # more processes than rows
        return
    inputs, targets = inputs[mine[0]:mine[-1] + 1], targets[mine[0]:mine[-1] + 1]
    for start in range(0, inputs.shape[1], seq_len):
        yield (inputs[:, start:start + seq_len].contiguous(),
               targets[:, start:start + seq_len].contiguous())


def first_windows(tokens: torch.Tensor, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n consecutive windows of the stream as a batch (n, seq_len) of inputs and their
    targets (fewer if the stream is short): fixed examples for diagnostics."""
    check_range(n, "n", low=1, integer=True)
    check_range(seq_len, "seq_len", low=1, integer=True)
    tokens, where = _tokens(tokens)
    if len(tokens) < 2:
        raise ValueError(f"{where} has {len(tokens)} token(s); a window needs at least 2 (an "
                         f"input and its target).")
    seq_len = min(seq_len, len(tokens) - 1)
    n = max(1, min(n, (len(tokens) - 1) // seq_len))
    x = tokens[:n * seq_len].view(n, seq_len)
    y = tokens[1:n * seq_len + 1].view(n, seq_len)
    return x, y
