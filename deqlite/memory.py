"""How much memory does a backward pass need? Count the tensors autograd saves for it.

Training memory beyond the weights is dominated by the activations autograd keeps for the
backward pass. ``torch.autograd.graph.saved_tensors_hooks`` lets us see each tensor as it is
saved; summing the sizes of their distinct storages gives the memory the graph holds on to.
It is exact, deterministic and works the same on CPU and GPU (where
``torch.cuda.max_memory_allocated`` is also available, and reported by ``peak_cuda_bytes``).

Unrolled backprop through n solver iterations saves O(n) activations; the implicit (IFT)
backward saves those of a single application of f, whatever n is.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def saved_tensor_bytes(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` and return ``(its result, bytes autograd saved for backward)``.

    Tensors that share storage (views, the same weight saved twice) are counted once.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(storages.values())


def peak_cuda_bytes(fn: Callable[..., Any], *args, device=None, **kwargs) -> tuple[Any, int]:
    """Run ``fn`` on a CUDA device and return ``(its result, peak allocated bytes during it)``."""
    if not torch.cuda.is_available():
        raise RuntimeError("peak_cuda_bytes needs a CUDA GPU; on CPU use saved_tensor_bytes.")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base
