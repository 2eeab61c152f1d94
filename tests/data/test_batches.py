"""The batches of a run (deqlite.data.batches): a function of the step alone, the same read from
memory or through a loader, split between processes; text windows that cover the stream."""
import pytest
import torch

from deqlite import data
from deqlite.data import batches
from deqlite.data.batches import StreamBatches, TrainBatches, eval_batches, eval_windows


class ListDataset(torch.utils.data.Dataset):
    """Not a TensorDataset, so TrainBatches reads it through a DataLoader, like an image folder.
    ``noise=True``: a random transform (torch's generator), like RandomResizedCrop."""

    def __init__(self, x, y, noise=False):
        self.x, self.y, self.noise = x, y, noise

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + (torch.rand(()) if self.noise else 0), self.y[i]


def all_batches(batches, steps, start=0):
    return [batches(step) for step in range(start, steps)]


def test_train_batches_are_the_same_read_from_memory_or_from_a_loader(cifar_root):
    ds = data.load_dataset("cifar10", "train", root=cifar_root)          # 20 examples
    x, y = ds.tensors
    memory = batches.TrainBatches(ds, 6, seed=3)
    assert memory.steps_per_epoch == 4                                   # 6 + 6 + 6 + 2
    expected = all_batches(memory, 8)
    assert [len(b[2]) for b in expected] == [6, 6, 6, 2] * 2 and [b[0] for b in expected] == [0] * 4 + [1] * 4
    assert sorted(torch.cat([b[2] for b in expected[:4]]).tolist()) == sorted(y.tolist())
    order = torch.randperm(20, generator=batches.epoch_generator(3, 1))     # epoch 1's order
    assert torch.equal(expected[4][1], x[order[:6]])
    for workers in (0, 2):
        streamed = batches.TrainBatches(ListDataset(x, y), 6, seed=3, num_workers=workers)
        assert streamed.steps_per_epoch == 4 and not streamed.in_memory
        for (e1, x1, y1), (e2, x2, y2) in zip(expected, all_batches(streamed, 8)):
            assert e1 == e2 and torch.equal(x1, x2) and torch.equal(y1, y2)
        resumed = batches.TrainBatches(ListDataset(x, y), 6, seed=3, num_workers=workers)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(expected[5:], all_batches(resumed, 8, 5)))


def test_processes_split_each_global_batch_and_drop_an_incomplete_last_one(cifar_root):
    ds = data.load_dataset("cifar10", "train", root=cifar_root, augment=True)     # 20 examples
    one = batches.TrainBatches(ds, 8, seed=1)
    ranks = [batches.TrainBatches(ds, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert one.steps_per_epoch == 3 and ranks[0].steps_per_epoch == 2              # 8 + 8 (+ 4 dropped)
    for epoch, i in ((0, 0), (0, 1), (1, 0), (1, 1)):
        _, x, y = one(3 * epoch + i)
        parts = [rank(2 * epoch + i) for rank in ranks]
        assert [len(p[2]) for p in parts] == [4, 4]
        assert torch.equal(torch.cat([p[1] for p in parts]), x)                    # same augmentation
        assert torch.equal(torch.cat([p[2] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by the number of processes, 3"):
        batches.TrainBatches(ds, 8, world_size=3, rank=0)


def test_random_transforms_are_keyed_by_example_not_by_worker_or_reading_order():
    x, y = torch.zeros(12), torch.arange(12)
    reads = {}
    for workers, world in ((0, 1), (2, 1), (0, 2)):
        parts = [batches.TrainBatches(ListDataset(x, y, noise=True), 4, seed=0, rank=r,
                                   world_size=world, num_workers=workers) for r in range(world)]
        reads[workers, world] = [torch.cat([p(step)[1] for p in parts]) for step in range(6)]
    first = reads[0, 1]
    assert not torch.equal(first[0], first[3])                       # epoch 1 draws anew
    for other in reads.values():
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    state = torch.get_rng_state()
    batches.TrainBatches(ListDataset(x, y, noise=True), 4)(0)
    assert torch.equal(torch.get_rng_state(), state), "reading must not move torch's generator"


def test_eval_batches_split_the_test_set_between_processes(cifar_root):
    ds = data.load_dataset("cifar10", "test", root=cifar_root)           # 4 examples
    _, y = ds.tensors
    whole = torch.cat([b[1] for b in batches.eval_batches(ds, 3)])
    shares = [torch.cat([b[1] for b in batches.eval_batches(ds, 1, rank=r, world_size=3)]) for r in range(3)]
    assert torch.equal(whole, y) and torch.equal(torch.cat(shares), y)
    streamed = [b[1] for b in batches.eval_batches(ListDataset(*ds.tensors), 3, rank=1, world_size=2)]
    assert torch.equal(torch.cat(streamed), y[2:])


def test_stream_batches_are_shifted_windows_that_cover_the_stream():
    tokens = torch.arange(1000)
    batches = StreamBatches(tokens, 4, 10)                 # rows of L = 249 tokens, 24 windows
    assert batches.steps_per_epoch == 24
    epoch, x, y = batches(0)
    assert epoch == 0 and x.shape == y.shape == (4, 10) and x.dtype == torch.long
    assert torch.equal(y, x + 1)                           # targets: the next token
    assert x[:, 0].tolist() == [0, 249, 498, 747]          # contiguous rows
    rows = torch.cat([batches(k)[1] for k in range(24)], dim=1)
    assert torch.equal(rows, torch.arange(4 * 249).view(4, 249)[:, :240])
    again = StreamBatches(tokens, 4, 10)                   # a resumed run: step k is the same batch
    for k in (5, 24 + 5, 3 * 24 + 23):
        assert all(torch.equal(a, b) for a, b in zip(batches(k)[1:], again(k)[1:]))
    assert batches(24 + 5)[0] == 1 and torch.equal(batches(24 + 5)[1], batches(5)[1])


def test_evaluation_windows_score_every_token_once():
    tokens = torch.arange(1, 1002)                          # N = 1001: L = 250 per row
    targets = torch.cat([y.flatten() for _, y in eval_windows(tokens, 4, 16)])
    assert sorted(targets.tolist()) == list(range(2, 1002))
    shapes = [x.shape for x, _ in eval_windows(tokens, 4, 16)]
    assert shapes[0] == (4, 16) and shapes[-1] == (4, 250 - 15 * 16) and len(shapes) == 16
    assert all(torch.equal(y, x + 1) for x, y in eval_windows(tokens, 4, 16))


def test_processes_take_disjoint_contiguous_rows():
    tokens = torch.randint(0, 50, (2001,), generator=torch.Generator().manual_seed(0))
    whole = StreamBatches(tokens, 6, 8)
    parts = [StreamBatches(tokens, 6, 8, rank=r, world_size=3) for r in range(3)]
    for k in (0, 7, 100):
        assert parts[0](k)[1].shape == (2, 8)
        assert torch.equal(torch.cat([p(k)[1] for p in parts]), whole(k)[1])
        assert torch.equal(torch.cat([p(k)[2] for p in parts]), whole(k)[2])
    eval_parts = [list(eval_windows(tokens, 6, 8, rank=r, world_size=3)) for r in range(3)]
    for windows, alone in zip(zip(*eval_parts), eval_windows(tokens, 6, 8)):   # the same windows
        assert torch.equal(torch.cat([x for x, _ in windows]), alone[0])
        assert torch.equal(torch.cat([y for _, y in windows]), alone[1])
    n_windows = [len(list(eval_windows(tokens, 2, 8, rank=r, world_size=3))) for r in range(3)]
    assert n_windows == [125, 125, 0]                     # 3 processes, 2 rows: one has none
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        StreamBatches(tokens, 5, 8, world_size=2)
    with pytest.raises(ValueError, match=r"2,001 tokens, fewer than .* 6 × 500 \+ 1 = 3,001"):
        StreamBatches(tokens, 6, 500)


def test_batches_reject_an_empty_dataset_and_a_rank_outside_the_run(cifar_root):
    ds = data.load_dataset("cifar10", "test", root=cifar_root)
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="the training set is empty"):
        TrainBatches(empty, 4)
    with pytest.raises(ValueError, match="the dataset to evaluate is empty"):
        next(eval_batches(empty, 4))
    with pytest.raises(ValueError, match="batch_size must lie in"):
        next(eval_batches(ds, 0))
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes, numbered 0 to 1"):
        TrainBatches(ds, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank must lie in"):
        StreamBatches(torch.arange(100), 2, 4, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="world_size must lie in"):
        next(eval_windows(torch.arange(100), 2, 4, world_size=0))
