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
