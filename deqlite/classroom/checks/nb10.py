"""Checks for notebook 10's exercises (scaling up)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...models import DEQClassifier
from ._harness import DT, CheckFailed, _call, _compare, _passed, exercise


def _tiny_deq_classifier(seed: int, hidden: int = 6):
    torch.manual_seed(seed)
    return DEQClassifier(in_channels=1, image_size=8, n_classes=4, channels=2, hidden=hidden,
                         deq=dict(solver="anderson", tol=1e-12, max_iter=200)).double()


@exercise
def check_data_parallel_gradient(fn: Callable) -> bool:
    """fn(model, x, y, world_size) -> the gradients DistributedDataParallel gives: the mean over
    world_size contiguous equal shards of each shard's mean cross-entropy gradient, one tensor per
    parameter (in model.parameters() order), leaving the model's .grad and weights as they were."""
    g = torch.Generator().manual_seed(0)
    for seed, batch, world in [(0, 12, 3), (1, 8, 2), (2, 8, 4)]:
        model = _tiny_deq_classifier(seed)
        x = torch.rand(batch, 1, 8, 8, generator=g, dtype=DT)
        y = torch.randint(0, 4, (batch,), generator=g)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():                  # a .grad the student must leave alone
            p.grad = torch.full_like(p, 0.5)
        expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        got = _call(fn, "data_parallel_gradient", model, x.clone(), y.clone(), world)
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            raise CheckFailed(f"data_parallel_gradient should return a list with one gradient per "
                              f"parameter ({len(expected)} here, in model.parameters() order), got "
                              f"{type(got).__name__}"
                              f"{f' of length {len(got)}' if isinstance(got, (list, tuple)) else ''}.")
        if any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)):
            raise CheckFailed("data_parallel_gradient changed the model's weights: only compute the "
                              "gradients (torch.autograd.grad), take no optimizer step.")
        if any(p.grad is None or not bool((p.grad == 0.5).all()) for p in model.parameters()):
            raise CheckFailed("data_parallel_gradient changed the parameters' .grad: return the "
                              "gradients instead (torch.autograd.grad does not touch .grad), or "
                              "save each p.grad before calling .backward() and put it back.")
        ratio = (torch.cat([t.flatten() for t in got]).norm() /
                 torch.cat([t.flatten() for t in expected]).norm()).item() if all(
            isinstance(t, torch.Tensor) for t in got) else float("nan")
        hint = ("Split x and y into world_size contiguous shards (x.tensor_split(world_size)), take "
                "each shard's gradient of its *mean* loss F.cross_entropy(model(x_r), y_r), and "
                "average the shards' gradients: with equal shards that is exactly the gradient of "
                "the whole batch's mean loss.")
        if abs(ratio - world) < 1e-6 * world:
            hint = ("Your gradients are world_size times too large: DDP *averages* the processes' "
                    "gradients (all-reduce, then divide by world_size); it does not sum them.")
        elif abs(ratio * world - 1) < 1e-6:
            hint = ("Your gradients are world_size times too small: you divided a shard's "
                    "gradient by world_size twice.")
        first = torch.autograd.grad(F.cross_entropy(model(x[:batch // world]), y[:batch // world]),
                                    list(model.parameters()))
        if all(isinstance(a, torch.Tensor) and a.shape == b.shape and
               (torch.allclose(a.to(DT), b) or torch.allclose(a.to(DT) * world, b))
               for a, b in zip(got, first)):
            hint = ("That is one shard's gradient only (rank 0's): every process computes its "
                    "shard's gradient, and the all-reduce averages all world_size of them.")
        for i, (a, b) in enumerate(zip(got, expected)):
            _compare(a, b, f"data_parallel_gradient, parameter {i} (batch {batch}, world_size "
                           f"{world})", hint, rtol=1e-8, atol=1e-11)
    _check_batch_coupled(fn)
    return _passed("data_parallel_gradient", "the averaged shard gradients equal the whole "
                   "batch's gradient, for 2, 3 and 4 processes; with BatchNorm, each shard's own")


def _check_batch_coupled(fn: Callable) -> None:
    """With BatchNorm (training mode) a sample's output depends on the others in its batch, so
    the shards' gradients are *not* the whole batch's: each process normalizes with its own
    shard's statistics. Running the model once on the whole batch and splitting afterwards gives
    the single-process gradient, not DDP's."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(),
                          nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(12, 1, 8, 8, generator=g, dtype=DT), torch.randint(0, 4, (12,), generator=g)
    params, world = list(model.parameters()), 3
    shards = list(zip(x.tensor_split(world), y.tensor_split(world)))
    per_shard = [torch.autograd.grad(F.cross_entropy(model(x_r), y_r), params) for x_r, y_r in shards]
    expected = [sum(gs) / world for gs in zip(*per_shard)]
    whole = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    got = _call(fn, "data_parallel_gradient", model, x.clone(), y.clone(), world)
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        raise CheckFailed("data_parallel_gradient on a model with BatchNorm should return one "
                          "gradient per parameter.")
    hint = ("Each process runs *its own shard* through the model (model(x_r)): with BatchNorm the "
            "statistics are the shard's, so the result differs from the whole batch's gradient.")
    if all(isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a.to(DT), b)
           for a, b in zip(got, whole)):
        hint = ("That is the gradient of one process on the whole batch (the model run once on x, "
                "then split): with BatchNorm DDP's processes normalize each shard by its own "
                "statistics. " + hint)
    for i, (a, b) in enumerate(zip(got, expected)):
        _compare(a, b, f"data_parallel_gradient with BatchNorm, parameter {i} (batch 12, world_size "
                       f"3)", hint, rtol=1e-8, atol=1e-11)
