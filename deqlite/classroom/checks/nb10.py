"""Checks for notebook 10's exercises (scaling up)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

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
            hint = ("Your gradients are world_size times too small: either you divided a shard's "
                    "gradient by world_size twice, or you took only one shard's gradient.")
        for i, (a, b) in enumerate(zip(got, expected)):
            _compare(a, b, f"data_parallel_gradient, parameter {i} (batch {batch}, world_size "
                           f"{world})", hint, rtol=1e-8, atol=1e-11)
    return _passed("data_parallel_gradient", "the averaged shard gradients equal the whole "
                   "batch's gradient, for 2, 3 and 4 processes")
