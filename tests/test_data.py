"""Datasets: the offline defaults, and the real loaders on small files in the real on-disk formats."""
import pickle
import struct

import numpy as np
import pytest
import torch

from deqlite import data


def write_idx_images(path, images):
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes())


def write_idx_labels(path, labels):
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sets = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=n)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        sets[prefix] = (images, labels)
    return tmp_path, sets


def test_mnist_idx_files_load_through_torchvision(fake_mnist):
    root, sets = fake_mnist
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = data.load_dataset("mnist", split, root=root)
        x, y = ds.tensors
        images, labels = sets[prefix]
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32
        assert torch.allclose(x[:, 0] * 255, torch.as_tensor(images, dtype=torch.float32))
        assert torch.equal(y, torch.as_tensor(labels))


def test_cifar10_python_batches_load(tmp_path):
    folder = tmp_path / data.CIFAR_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(1)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": images, b"labels": labels}, fh)
        expected.append((images, labels))
    x, y = data.load_dataset("cifar10", "test", root=tmp_path).tensors
    images, labels = expected[-1]
    assert x.shape == (3, 3, 32, 32)
    # channel-major layout: the first 1024 bytes are the red plane of image 0
    assert torch.allclose(x[0, 0].flatten() * 255, torch.as_tensor(images[0, :1024], dtype=torch.float32))
    assert y.tolist() == labels
    x, _ = data.load_dataset("cifar10", "train", root=tmp_path).tensors
    assert len(x) == 15


def test_missing_real_data_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m deqlite.data download mnist"):
        data.load_dataset("mnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m deqlite.data download cifar10"):
        data.load_dataset("cifar10", root=tmp_path)


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQLITE_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DEQLITE_DATA")
    assert data.data_root().name == "data"


def test_offline_mnist5k_is_a_fixed_stratified_split():
    train, test = data.load_dataset("mnist5k", "train"), data.load_dataset("mnist5k", "test")
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert torch.bincount(yte).tolist() == [100] * 10
    assert 0 <= xtr.min() and xtr.max() <= 1
    # no image is in both parts, and the split is the same every time
    assert not set(map(bytes, xte.flatten(1).numpy())) & set(map(bytes, xtr.flatten(1).numpy()))
    assert torch.equal(data.load_dataset("mnist5k", "test").tensors[1], yte)


def test_digits_and_errors():
    x, y = data.load_dataset("digits", "test").tensors
    assert x.shape[1:] == (1, 8, 8) and len(x) == 359 and x.max() <= 1
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'.*Did you mean 'mnist'"):
        data.load_dataset("mnsit")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load_dataset("digits", "val")


def test_first_examples_of_a_split_cover_every_class():
    _, y = data.load_dataset("mnist5k", "train").tensors
    assert len(torch.unique(y[:100])) == 10


# --- image folders (ImageNet's layout), CIFAR-10 augmentation, the batches of a run ---------------

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


def test_imagenet_folders_load_with_the_standard_transforms(tmp_path):
    root = write_image_tree(tmp_path)
    train = data.load_dataset("imagenet", "train", root=root)
    test = data.load_dataset("imagenet", "test", root=root)             # the val folder
    assert (len(train), len(test)) == (12, 6) and train.classes == ["n01", "n02", "n03"]
    x, y = test[5]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 2
    assert x.min() < 0 < x.max()                                         # normalized, not in [0, 1]
    assert torch.equal(test[5][0], x)                                    # Resize + CenterCrop: fixed
    augmented = data.load_dataset("imagenet", "train", root=root, augment=True)
    crops = torch.stack([augmented[0][0] for _ in range(3)])
    assert crops.shape == (3, 3, 224, 224) and not torch.equal(crops[0], crops[1])
    assert data.num_classes(data.take(train, 5)) == 3 and data.image_shape(train) == (3, 224, 224)


def test_missing_imagenet_explains_the_layout_and_the_manual_download(tmp_path):
    for download in (False, True):
        with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically") as err:
            data.load_dataset("imagenet", "test", root=tmp_path, download=download)
        assert "imagenet/val" in str(err.value) and "image-net.org" in str(err.value)
    with pytest.raises(SystemExit, match="image-net.org"):
        data.main(["download", "imagenet", "--root", str(tmp_path)])


@pytest.fixture
def cifar_root(tmp_path):
    folder = tmp_path / data.CIFAR_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, size=4).tolist()}, fh)
    return tmp_path


def test_random_crop_flip_is_torchvisions_crop_of_the_padded_image_then_a_flip():
    import torchvision.transforms.functional as TF
    x = torch.rand(5, 3, 32, 32)
    aug = data.RandomCropFlip(padding=4)
    choices = torch.tensor([[0, 0, 0], [8, 8, 1], [3, 5, 0], [4, 4, 0], [7, 1, 1]])
    out = aug.apply(x, choices)
    assert out.shape == x.shape and out.is_contiguous()
    for image, crop, (dy, dx, flip) in zip(x, out, choices.tolist()):
        expected = TF.crop(TF.pad(image, [4]), dy, dx, 32, 32)
        assert torch.equal(crop, TF.hflip(expected) if flip else expected)
    assert torch.equal(out[3], x[3])                                     # centred, not flipped
    drawn = aug.draw(1000, torch.Generator().manual_seed(0))
    assert drawn[:, :2].min() == 0 and drawn[:, :2].max() == 8 and 400 < drawn[:, 2].sum() < 600


def test_cifar10_augmentation(cifar_root):
    plain = data.load_dataset("cifar10", "train", root=cifar_root)
    augmented = data.load_dataset("cifar10", "train", root=cifar_root, augment=True)
    assert isinstance(augmented, data.AugmentedTensorDataset)
    assert all(torch.equal(a, b) for a, b in zip(plain.tensors, augmented.tensors))
    x, y = augmented[7]
    assert x.shape == (3, 32, 32) and y == plain.tensors[1][7]
    padded = torch.nn.functional.pad(plain.tensors[0][7], (4, 4, 4, 4))
    windows = [w for dy in range(9) for dx in range(9)
               for w in (padded[:, dy:dy + 32, dx:dx + 32], padded[:, dy:dy + 32, dx:dx + 32].flip(-1))]
    assert any(torch.equal(x, w) for w in windows)                       # a crop of the padded image
    assert isinstance(data.take(augmented, 3), data.AugmentedTensorDataset)
    assert not isinstance(data.load_dataset("cifar10", "test", root=cifar_root), data.AugmentedTensorDataset)
    with pytest.raises(ValueError, match="has no augmentation.*cifar10, imagenet"):
        data.load_dataset("mnist5k", augment=True)


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
    memory = data.TrainBatches(ds, 6, seed=3)
    assert memory.steps_per_epoch == 4                                   # 6 + 6 + 6 + 2
    expected = all_batches(memory, 8)
    assert [len(b[2]) for b in expected] == [6, 6, 6, 2] * 2 and [b[0] for b in expected] == [0] * 4 + [1] * 4
    assert sorted(torch.cat([b[2] for b in expected[:4]]).tolist()) == sorted(y.tolist())
    order = torch.randperm(20, generator=data.epoch_generator(3, 1))     # epoch 1's order
    assert torch.equal(expected[4][1], x[order[:6]])
    for workers in (0, 2):
        streamed = data.TrainBatches(ListDataset(x, y), 6, seed=3, num_workers=workers)
        assert streamed.steps_per_epoch == 4 and not streamed.in_memory
        for (e1, x1, y1), (e2, x2, y2) in zip(expected, all_batches(streamed, 8)):
            assert e1 == e2 and torch.equal(x1, x2) and torch.equal(y1, y2)
        resumed = data.TrainBatches(ListDataset(x, y), 6, seed=3, num_workers=workers)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(expected[5:], all_batches(resumed, 8, 5)))


def test_processes_split_each_global_batch_and_drop_an_incomplete_last_one(cifar_root):
    ds = data.load_dataset("cifar10", "train", root=cifar_root, augment=True)     # 20 examples
    one = data.TrainBatches(ds, 8, seed=1)
    ranks = [data.TrainBatches(ds, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    assert one.steps_per_epoch == 3 and ranks[0].steps_per_epoch == 2              # 8 + 8 (+ 4 dropped)
    for epoch, i in ((0, 0), (0, 1), (1, 0), (1, 1)):
        _, x, y = one(3 * epoch + i)
        parts = [rank(2 * epoch + i) for rank in ranks]
        assert [len(p[2]) for p in parts] == [4, 4]
        assert torch.equal(torch.cat([p[1] for p in parts]), x)                    # same augmentation
        assert torch.equal(torch.cat([p[2] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by the number of processes, 3"):
        data.TrainBatches(ds, 8, world_size=3, rank=0)


def test_random_transforms_are_keyed_by_example_not_by_worker_or_reading_order():
    x, y = torch.zeros(12), torch.arange(12)
    reads = {}
    for workers, world in ((0, 1), (2, 1), (0, 2)):
        parts = [data.TrainBatches(ListDataset(x, y, noise=True), 4, seed=0, rank=r,
                                   world_size=world, num_workers=workers) for r in range(world)]
        reads[workers, world] = [torch.cat([p(step)[1] for p in parts]) for step in range(6)]
    first = reads[0, 1]
    assert not torch.equal(first[0], first[3])                       # epoch 1 draws anew
    for other in reads.values():
        assert all(torch.equal(a, b) for a, b in zip(first, other))
    state = torch.get_rng_state()
    data.TrainBatches(ListDataset(x, y, noise=True), 4)(0)
    assert torch.equal(torch.get_rng_state(), state), "reading must not move torch's generator"


def test_eval_batches_split_the_test_set_between_processes(cifar_root):
    ds = data.load_dataset("cifar10", "test", root=cifar_root)           # 4 examples
    _, y = ds.tensors
    whole = torch.cat([b[1] for b in data.eval_batches(ds, 3)])
    shares = [torch.cat([b[1] for b in data.eval_batches(ds, 1, rank=r, world_size=3)]) for r in range(3)]
    assert torch.equal(whole, y) and torch.equal(torch.cat(shares), y)
    streamed = [b[1] for b in data.eval_batches(ListDataset(*ds.tensors), 3, rank=1, world_size=2)]
    assert torch.equal(torch.cat(streamed), y[2:])
