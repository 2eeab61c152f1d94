"""Where a process stands in a ``torchrun`` launch, and the few collective steps training needs.

``torchrun --nproc-per-node W ...`` starts W copies of the same program and tells each, in its
environment, its ``RANK`` (0 … W−1 over all machines), ``LOCAL_RANK`` (its GPU on this machine)
and ``WORLD_SIZE`` (W). Each process joins one process group (NCCL between GPUs, Gloo on CPU),
trains on its share of every global batch inside ``DistributedDataParallel`` (which averages the
gradients, so all processes take the same step), and rank 0 alone writes logs and checkpoints.
Run alone, a process is rank 0 of 1 and none of this does anything.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Place:
    """Where this process stands in a ``torchrun`` launch (rank 0 of 1 when run alone)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Place":
        """From an initialised process group, else from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
        local = int(os.environ.get("LOCAL_RANK", 0))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local)
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local)


def resolve_device(name: str, place: Place) -> torch.device:
    """"auto" → cuda when available, else cpu; a CUDA device without index → this process's GPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", place.local_rank)
    return device


def init_distributed(place: Place, device: torch.device) -> None:
    """Join the process group that torchrun describes in the environment (MASTER_ADDR/PORT,
    RANK, WORLD_SIZE): NCCL between GPUs, Gloo on CPU. Nothing to do alone or if already joined."""
    if place.world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, fixed when
    # the module is first imported. DDP imports it (through torch._dynamo) when it is built; if the
    # group existed by then, those defaults would hold it for good, destroy_process_group could not
    # free it, and Gloo's threads would still run while the interpreter exits (now and then a
    # process ends in SIGABRT after a finished run). Imported first, the defaults hold None.
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


_KEPT_AFTER_AN_ERROR: list = []


def shutdown_distributed(wait: bool = True, holder=None) -> None:
    """Leave the process group, if one was joined. With ``wait`` (after a run that finished) every
    process first waits for the others at a barrier, so none tears its connections down while a
    peer may still be talking to it; pass ``wait=False`` when leaving on an error, as the peers may
    never reach the barrier.

    ``holder``: what holds the group through a ``ddp`` attribute (a DistributedDataParallel
    wrapper), such as the Trainer. After a finished run the wrapper is dropped first, so leaving
    frees the group and stops Gloo's threads before the process exits (threads still running at
    exit can end a finished run in SIGABRT). After an error it is kept to the end of the process:
    a collective may still wait for a peer that will never join it, freeing the group would wait
    with it (Gloo joins its threads), and the launcher stops the peers only once this one exits."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if getattr(holder, "ddp", None) is not None:
        if wait:
            holder.ddp = None
        else:
            _KEPT_AFTER_AN_ERROR.append(holder.ddp)
    try:
        if wait:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def all_reduce(values: list, op: str, place: Place, device: torch.device) -> list:
    """Combine per-process numbers over the processes, ``op`` "sum" or "max"; None (a number
    no process has) stays None. One process: unchanged."""
    if place.world_size == 1:
        return values
    absent = math.nan if op == "sum" else -math.inf
    t = torch.tensor([absent if v is None else float(v) for v in values], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [v if math.isfinite(v) else None for v in t.tolist()]
