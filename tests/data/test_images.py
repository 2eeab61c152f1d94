"""Datasets: the offline defaults, and the real loaders on small files in the real on-disk formats."""
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import write_image_tree

from deqlite import data
from deqlite._files import data_root
from deqlite.data import images as image_data
from deqlite.data.__main__ import main as data_main


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
    folder = tmp_path / image_data.CIFAR_FOLDER
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
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DEQLITE_DATA")
    assert data_root().name == "data"


def test_offline_mnist5k_is_a_fixed_stratified_split():
    train, test = data.load_dataset("mnist5k", "train"), data.load_dataset("mnist5k", "test")
    (xtr, _), (xte, yte) = train.tensors, test.tensors
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
    assert image_data.num_classes(image_data.take(train, 5)) == 3 and image_data.image_shape(train) == (3, 224, 224)


def test_missing_imagenet_explains_the_layout_and_the_manual_download(tmp_path):
    for download in (False, True):
        with pytest.raises(FileNotFoundError, match="cannot be downloaded automatically") as err:
            data.load_dataset("imagenet", "test", root=tmp_path, download=download)
        assert "imagenet/val" in str(err.value) and "image-net.org" in str(err.value)
    with pytest.raises(SystemExit, match="image-net.org"):
        data_main(["download", "imagenet", "--root", str(tmp_path)])


def test_random_crop_flip_is_torchvisions_crop_of_the_padded_image_then_a_flip():
    import torchvision.transforms.functional as TF
    x = torch.rand(5, 3, 32, 32)
    aug = image_data.RandomCropFlip(padding=4)
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
    assert isinstance(augmented, image_data.AugmentedTensorDataset)
    assert all(torch.equal(a, b) for a, b in zip(plain.tensors, augmented.tensors))
    x, y = augmented[7]
    assert x.shape == (3, 32, 32) and y == plain.tensors[1][7]
    padded = torch.nn.functional.pad(plain.tensors[0][7], (4, 4, 4, 4))
    windows = [w for dy in range(9) for dx in range(9)
               for w in (padded[:, dy:dy + 32, dx:dx + 32], padded[:, dy:dy + 32, dx:dx + 32].flip(-1))]
    assert any(torch.equal(x, w) for w in windows)                       # a crop of the padded image
    assert isinstance(image_data.take(augmented, 3), image_data.AugmentedTensorDataset)
    assert not isinstance(data.load_dataset("cifar10", "test", root=cifar_root), image_data.AugmentedTensorDataset)
    with pytest.raises(ValueError, match="has no augmentation.*cifar10, imagenet"):
        data.load_dataset("mnist5k", augment=True)


