"""Nothing lost, nothing silent, for images: a damaged CIFAR-10 batch or MNIST idx file is an error
that names the file, says what is wrong and what to do; the ImageNet check decodes a sample of
the images, names the unreadable ones and fails on them or on a wrong layout; ``take`` wants n ≥ 1."""
import pickle
import struct

import numpy as np
import pytest

from conftest import write_image_tree
from test_images import write_idx_images, write_idx_labels

from deqlite import data
from deqlite.data import images as image_data
from deqlite.data.__main__ import main as data_main
from deqlite.data.integrity import DataFileError


# --- CIFAR-10 and MNIST files --------------------------------------------------------------------

GOOD = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
CIFAR_DAMAGES = {
    "truncated": (pickle.dumps(GOOD)[:100], r"it is no readable pickle \((EOFError|UnpicklingError)"),
    "not a pickle": (b"<html>404 Not Found</html>", r"it is no readable pickle \(UnpicklingError"),
    "empty": (b"", r"it is no readable pickle \(EOFError: Ran out of input; 0 bytes"),
    "wrong keys": (pickle.dumps({"data": GOOD[b"data"], "labels": [0] * 4}),
                   r"keys b'data' and b'labels'; this one holds the keys \['data', 'labels'\]"),
    "not a dict": (pickle.dumps([1, 2, 3]), "this one holds list"),
    "wrong shape": (pickle.dumps({**GOOD, b"data": np.zeros((4, 3, 32, 32), dtype=np.uint8)}),
                    r"b'data' is uint8 of shape \(4, 3, 32, 32\); CIFAR-10's is uint8 of shape \(N, 3072\)"),
    "wrong dtype": (pickle.dumps({**GOOD, b"data": np.zeros((4, 3072))}), "b'data' is float64"),
    "labels out of range": (pickle.dumps({**GOOD, b"labels": [0, 1, 2, 10]}), "4 integers in 0..9"),
    "too few labels": (pickle.dumps({**GOOD, b"labels": [0, 1]}), r"of shape \(2,\)"),
}


@pytest.mark.parametrize("damage", CIFAR_DAMAGES)
def test_a_damaged_cifar10_batch_is_named_with_what_is_wrong(cifar_root, damage):
    content, problem = CIFAR_DAMAGES[damage]
    bad = cifar_root / image_data.CIFAR_FOLDER / "data_batch_3"
    bad.write_bytes(content)
    with pytest.raises(DataFileError, match=r"data_batch_3: .*" + problem) as err:
        data.load_dataset("cifar10", "train", root=cifar_root)
    assert err.value.path == bad
    assert f"python -m deqlite.data download cifar10 --root {cifar_root}" in str(err.value)
    assert len(data.load_dataset("cifar10", "test", root=cifar_root)) == 4    # the others still load


def test_a_damaged_cifar10_batch_fails_the_download_command(cifar_root):
    (cifar_root / image_data.CIFAR_FOLDER / "test_batch").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="test_batch: it is no readable pickle"):
        data_main(["download", "cifar10", "--root", str(cifar_root)])


def test_damaged_mnist_idx_files_are_named(tmp_path):
    root, raw = tmp_path, tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n, 28, 28)))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", np.zeros(n))
    images = raw / "train-images-idx3-ubyte"
    full = images.read_bytes()
    images.write_bytes(full[:1000])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte: its header promises "
                                            r"12 × 28 × 28 bytes .*9,424 bytes in all.*has 1,000"):
        data.load_dataset("mnist", root=root)
    images.write_bytes(b"<html>")
    with pytest.raises(DataFileError, match=r"no idx file of unsigned bytes \(it begins b'<htm'"):
        data.load_dataset("mnist", root=root)
    images.write_bytes(full)
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 0x801, 11) + bytes(11))
    with pytest.raises(DataFileError, match="11 labels for the 12 images"):
        data.load_dataset("mnist", root=root)
    assert len(data.load_dataset("mnist", "test", root=root)) == 5


# --- ImageNet's folders --------------------------------------------------------------------------

def test_the_imagenet_check_decodes_the_images_and_passes_a_good_tree(tmp_path, capsys):
    root = write_image_tree(tmp_path)
    data_main(["download", "imagenet", "--root", str(root)])             # exit status 0
    out = capsys.readouterr().out
    assert "train: 12 images in 3 class folders (4-4 per class); decoded 12 of them: 0 unreadable" in out
    assert "val: 6 images in 3 class folders (2-2 per class); decoded 6 of them" in out
    assert "ILSVRC2012's train has 1,000 classes" in out                 # a note, not a failure
    checks = image_data.check_imagenet(root, sample=5)
    assert [c.checked for c in checks] == [5, 5] and all(c.ok for c in checks)


def test_the_imagenet_check_names_unreadable_images_and_fails(tmp_path, capsys):
    root = write_image_tree(tmp_path)
    val = root / "imagenet" / "val"
    (val / "n02" / "garbage.JPEG").write_bytes(b"not a jpeg at all")
    good = (val / "n01" / "n01_0.JPEG").read_bytes()
    (val / "n03" / "cut.JPEG").write_bytes(good[:len(good) // 2])       # a truncated JPEG
    (val / "n01" / "notes.txt").write_text("mine")                       # not an image: a note
    with pytest.raises(SystemExit, match="imagenet: 2 unreadable images and 0 layout problems"):
        data_main(["download", "imagenet", "--root", str(root)])
    out = capsys.readouterr().out
    assert "decoded 8 of them: 2 unreadable" in out
    assert f"unreadable: {val / 'n02' / 'garbage.JPEG'} (UnidentifiedImageError" in out
    assert f"unreadable: {val / 'n03' / 'cut.JPEG'} (OSError" in out
    assert "that are not images (by their extension), skipped as ImageFolder skips them: 1" in out
    assert (val / "n01" / "notes.txt").read_text() == "mine"             # nothing deleted


def test_the_imagenet_check_fails_a_wrong_layout(tmp_path, capsys):
    root = write_image_tree(tmp_path)
    val = root / "imagenet" / "val"
    for p in (val / "n03").iterdir():                                    # a class missing from val,
        p.rename(val / p.name)                                           # its images left loose
    (val / "n03").rmdir()
    with pytest.raises(SystemExit, match="0 unreadable images and 2 layout problems"):
        data_main(["download", "imagenet", "--root", str(root)])
    out = capsys.readouterr().out
    assert "2 images lie directly in the folder, outside any class folder" in out
    assert "only in train/: n03" in out
    with pytest.raises(ValueError, match="class i would not be the same class in both"):
        data.load_dataset("imagenet", "test", root=root)                 # silently wrong labels: no
    for p in (val / "n02").iterdir():                                    # an empty class folder
        p.unlink()
    (root / "imagenet" / "train" / "n03").rename(root / "imagenet" / "n03")
    with pytest.raises(FileNotFoundError, match=r"imagenet/val: Found no valid file for the classes n02"):
        data.load_dataset("imagenet", "test", root=root)
    for p in list(val.iterdir()):                                        # val unpacked flat
        if p.is_dir():
            for q in p.iterdir():
                q.rename(val / q.name)
            p.rmdir()
    with pytest.raises(FileNotFoundError, match=r"\(4 files, and no class folders there\)"):
        data.load_dataset("imagenet", "test", root=root)


# --- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3])
def test_take_needs_a_positive_number_of_examples(cifar_root, n):
    ds = data.load_dataset("cifar10", "train", root=cifar_root)
    with pytest.raises(ValueError, match=rf"n must lie in \[1, inf\], got {n}"):
        image_data.take(ds, n)
    with pytest.raises(ValueError, match=rf"n must lie in \[1, inf\], got {n}"):
        image_data.first_images(ds, n)
    with pytest.raises(ValueError, match=rf"n must lie in \[2, inf\], got {n}"):
        data.load_dataset("stdlib_chars", "test").take(n)
    assert len(image_data.take(ds, 3)) == 3 and len(image_data.take(ds, 99)) == 20
