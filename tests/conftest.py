"""Shared test set-up: headless matplotlib, deterministic seeds, small float64 problems."""
import matplotlib

matplotlib.use("Agg")

import contextlib  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deqlite.cells import MLPCell  # noqa: E402
from deqlite.data.images import CIFAR_FOLDER  # noqa: E402
from deqlite.train.distributed import shutdown_distributed  # noqa: E402

DT = torch.float64

# The tests' tensors are tiny: one thread is faster than two (no barrier waits), and far steadier
# on a shared machine. Benchmarks, not tests, measure multi-threaded speed.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def symmetric_tanh_problem(d=64, batch=16, top=0.97, input_scale=0.01, seed=0):
    """f(z) = tanh(z Wᵀ + u) with symmetric W, spectrum linspace(0, top): slow for plain iteration
    (in float64; the benchmarks' ``benchmarks/_problems.symmetric_tanh`` is the same problem)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    W = (Q * torch.linspace(0, top, d, dtype=DT)) @ Q.T
    u = input_scale * torch.randn(batch, d, generator=g, dtype=DT)
    return (lambda z: torch.tanh(z @ W.T + u)), torch.zeros(batch, d, dtype=DT)


def linear_problem(d=12, batch=5, norm=0.9, seed=0):
    """f(z) = z Wᵀ + b with ‖W‖₂ = norm, and its exact fixed point (I − W)⁻¹ b per row."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W *= norm / torch.linalg.matrix_norm(W, ord=2)
    b = torch.randn(batch, d, generator=g, dtype=DT)
    z_exact = torch.linalg.solve(torch.eye(d, dtype=DT) - W, b.T).T
    return W, b, z_exact


@contextlib.contextmanager
def torchrun_process(rank: int, world_size: int, port: int):
    """Inside: the environment torchrun gives process `rank` of a run on this machine (for tests
    that start their processes with torch.multiprocessing.spawn), one thread each. On the way out
    the process group, if the body joined one, is left as `deqlite.train`'s command line leaves it
    (after a barrier when the body finished, at once on an error), except that the body's Trainer
    still holds it through its DDP wrapper: it is freed when the body returns and drops the Trainer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    finished = False
    try:
        yield
        finished = True
    finally:
        shutdown_distributed(wait=finished)


def write_image_tree(root, classes=("n01", "n02", "n03"), per_class=(4, 2), seed=0):
    """``root/imagenet/{train,val}/<class>/*`` with small random PNG and JPEG files of assorted
    sizes, as ImageNet's folders hold JPEGs of assorted sizes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            folder = root / "imagenet" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 48, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.{'png' if i % 2 else 'JPEG'}")
    return root


@pytest.fixture
def cifar_root(tmp_path):
    """A CIFAR-10 folder of python batches with 4 random images each (20 train, 4 test)."""
    folder = tmp_path / CIFAR_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, size=4).tolist()}, fh)
    return tmp_path


class CountingCell(MLPCell):
    """An MLPCell that counts its forward calls and the backward passes through them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards = self.backwards = 0

    def forward(self, z, injection):
        self.forwards += 1
        out = super().forward(z, injection)
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad):
        self.backwards += 1
