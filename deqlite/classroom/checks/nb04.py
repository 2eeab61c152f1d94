"""Checks for notebook 04's exercises (training a DEQ)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...models import DEQClassifier
from ._harness import DT, CheckFailed, _call, _compare, _numbered, _passed, exercise


def _tiny_classifier(seed: int):
    torch.manual_seed(seed)
    return DEQClassifier(channels=2, hidden=8, deq=dict(tol=1e-6, max_iter=100)).double()


@exercise
def check_train_step(fn: Callable) -> bool:
    """fn(model, optimizer, x, y) -> loss (float) after one cross-entropy optimizer step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 28, 28, generator=g, dtype=DT), torch.randint(0, 10, (6,), generator=g)
    ref, mine = _tiny_classifier(1), _tiny_classifier(1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    my_opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    for step in range(2):                     # two steps: catches a forgotten zero_grad
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        got = _call(fn, "train_step", mine, my_opt, x, y, convert=_numbered("train_step"),
                    may_change=("model",))
        if abs(float(got) - ref_loss.item()) > 1e-6 * max(1.0, abs(ref_loss.item())):
            raise CheckFailed(f"train_step, step {step + 1}: loss {float(got):.6f}, expected "
                              f"{ref_loss.item():.6f}. Use F.cross_entropy(model(x), y) on the raw "
                              f"logits (no softmax first), computed before the optimizer step.")
        for (name, p), q in zip(ref.named_parameters(), mine.parameters()):
            _compare(q, p.detach(), f"train_step, parameter {name} after step {step + 1}",
                     "The order is: optimizer.zero_grad(), loss.backward(), optimizer.step(). "
                     "Forgetting zero_grad() adds up gradients across steps; forgetting step() "
                     "changes nothing.", rtol=1e-6, atol=1e-9)
    return _passed("train_step", "same loss and same parameters as the reference, two steps running")


@exercise
def check_count_parameters(fn: Callable) -> bool:
    """fn(model) -> number of trainable parameters."""
    model = _tiny_classifier(0)
    model.head.bias.requires_grad_(False)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = _call(fn, "count_parameters", model, convert=_numbered("count_parameters"))
    if got != expected:
        total = sum(p.numel() for p in model.parameters())
        hint = (" You counted frozen parameters too: keep only those with p.requires_grad."
                if int(got) == total else
                " Sum p.numel() (the number of entries), not len(p) or the number of tensors.")
        raise CheckFailed(f"count_parameters: got {int(got)}, expected {expected}.{hint}")
    return _passed("count_parameters", f"{expected} trainable parameters")


@exercise
def check_nfe_by_epoch(fn: Callable) -> bool:
    """fn(history) -> {epoch: mean forward NFE of that epoch's train records}."""
    history = [dict(split="train", epoch=e, step=3 * e + i + 1, fwd_nfe=n)
               for e, ns in enumerate([(6, 6, 6), (9, 10, 11), (12, 15, 15)]) for i, n in enumerate(ns)]
    history.insert(3, dict(split="test", epoch=0, step=3, fwd_nfe=100))
    expected = {0: 6.0, 1: 10.0, 2: 14.0}
    got = _call(fn, "nfe_by_epoch", history)
    if not isinstance(got, dict) or {k: round(float(v), 6) for k, v in got.items()} != expected:
        raise CheckFailed(f"nfe_by_epoch: expected {expected}, got {got}. Average `fwd_nfe` over the "
                          f"records with split == 'train' only (test records are evaluations), "
                          f"grouped by their `epoch`.")
    return _passed("nfe_by_epoch", "mean forward NFE per epoch, train records only")
