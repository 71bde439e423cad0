"""Tests of nsl.data's CIFAR-10/100 reader on the real datasets (``data_root``): python and binary
layouts agree, labels and statistics, and damaged, truncated or hostile copies of the real files."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nsl.data import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    DatasetError,
    TensorImageDataset,
    cifar_class_names,
    dataset_info,
    load_cifar,
)


@pytest.mark.parametrize("name,classes,per_class",
                         [("cifar10", 10, (5000, 1000)), ("cifar100", 100, (500, 100))])
def test_cifar_python_and_binary_layouts_agree(cifar, name, classes, per_class):
    for split, n, k in (("train", 50000, per_class[0]), ("test", 10000, per_class[1])):
        xp, yp = cifar(name, split, layout="python")
        xb, yb = cifar(name, split, layout="binary")
        assert xp.shape == (n, 3, 32, 32) and xp.dtype == torch.uint8
        assert yp.shape == (n,) and yp.dtype == torch.int64
        assert torch.equal(xp, xb) and torch.equal(yp, yb)
        assert torch.equal(torch.bincount(yp, minlength=classes), torch.full((classes,), k))
        assert int(xp.max()) == 255 and int(xp.min()) == 0
    # auto picks the python layout when both exist
    xa, ya = cifar(name, "test")
    assert torch.equal(xa, cifar(name, "test", layout="python")[0])


def test_cifar100_coarse_labels_agree_and_nest(cifar):
    fine = cifar("cifar100", "train", "fine", "python")[1]
    cp = cifar("cifar100", "train", "coarse", "python")[1]
    cb = cifar("cifar100", "train", "coarse", "binary")[1]
    assert torch.equal(cp, cb)
    assert torch.equal(torch.bincount(cp, minlength=20), torch.full((20,), 2500))
    # every fine class belongs to exactly one superclass, every superclass has 5 fine classes
    pairs = torch.unique(fine * 100 + cp)
    assert len(pairs) == 100 and torch.equal(torch.bincount(pairs % 100, minlength=20), torch.full((20,), 5))


def test_cifar_channel_statistics_match_published(cifar):
    for name in ("cifar10", "cifar100"):
        x, y = cifar(name, "train")
        mean, std = TensorImageDataset(x, y).channel_stats()
        info = dataset_info(name)
        assert np.allclose(mean, info.mean, atol=6e-5), (name, mean)
        assert np.allclose(std, info.std, atol=6e-5), (name, std)


def test_cifar_root_may_be_the_layout_folder_and_class_names(data_root, cifar):
    x, y = load_cifar(data_root / "cifar-10-batches-bin", "cifar10", "test")
    assert torch.equal(x, cifar("cifar10", "test")[0]) and torch.equal(y, cifar("cifar10", "test")[1])
    x, y = load_cifar(data_root / "cifar-100-python", "cifar100", "test", label="coarse")
    assert torch.equal(y, cifar("cifar100", "test", "coarse", "binary")[1])
    for layout in ("python", "binary"):
        assert cifar_class_names(data_root, "cifar10", layout=layout) == CIFAR10_CLASSES
        assert cifar_class_names(data_root, "cifar100", layout=layout) == CIFAR100_FINE_CLASSES
        assert cifar_class_names(data_root, "cifar100", "coarse", layout=layout) == CIFAR100_COARSE_CLASSES
    with pytest.raises(ValueError, match="coarse"):
        load_cifar(data_root, "cifar10", "test", label="coarse")
    with pytest.raises(ValueError, match="split"):
        load_cifar(data_root, "cifar10", "validation")


def _copy(data_root: Path, tmp: Path, folder: str, *files: str) -> Path:
    dst = tmp / folder
    dst.mkdir(parents=True)
    for f in files:
        shutil.copyfile(data_root / folder / f, dst / f)
    return dst


def test_cifar_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_cifar(tmp_path, "cifar10", "train")
    msg = str(e.value)
    for part in (str(tmp_path), "cifar-10-batches-py", "cifar-10-batches-bin", "data_batch_1", "test_batch",
                 "python layout", "binary layout", "download('cifar10'", "torchvision.datasets.CIFAR10",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"):
        assert part in msg, part
    assert isinstance(e.value, ValueError)
    with pytest.raises(DatasetError, match="cifar-100-binary"):
        load_cifar(tmp_path, "cifar100", "test", layout="binary")


def test_cifar_missing_file(data_root, tmp_path):
    folder = _copy(data_root, tmp_path, "cifar-10-batches-py", "test_batch", "batches.meta")
    x, _ = load_cifar(tmp_path, "cifar10", "test")  # the test split alone is complete
    assert x.shape[0] == 10000
    with pytest.raises(DatasetError, match=r"missing file .*data_batch_1 \(python layout") as e:
        load_cifar(tmp_path, "cifar10", "train")
    assert "download" in str(e.value)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="missing file .*test_batch"):
        load_cifar(folder, "cifar10", "test")


def test_cifar_truncated_and_corrupt_binary(data_root, tmp_path):
    src = (data_root / "cifar-10-batches-bin" / "test_batch.bin").read_bytes()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    f = folder / "test_batch.bin"
    f.write_bytes(src[: len(src) // 2 + 7])
    with pytest.raises(DatasetError, match="not a whole number of 3073-byte records: the file is truncated"):
        load_cifar(tmp_path, "cifar10", "test")
    f.write_bytes(src[: 3073 * 5000])
    with pytest.raises(DatasetError, match="holds 5000 images and 5000 labels, expected 10000"):
        load_cifar(tmp_path, "cifar10", "test")
    bad = bytearray(src)
    bad[3073 * 17] = 10  # label byte of record 17
    f.write_bytes(bytes(bad))
    with pytest.raises(DatasetError, match=r"fine labels in 0\.\.10, expected 0\.\.9"):
        load_cifar(tmp_path, "cifar10", "test")
    # CIFAR-100: records of coarse, fine label bytes
    src = (data_root / "cifar-100-binary" / "test.bin").read_bytes()
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    bad = bytearray(src)
    bad[3074 * 3] = 20  # coarse label of record 3
    (folder / "test.bin").write_bytes(bytes(bad))
    assert load_cifar(tmp_path, "cifar100", "test")[1].max() == 99  # fine labels are intact
    with pytest.raises(DatasetError, match=r"coarse labels in 0\.\.20, expected 0\.\.19"):
        load_cifar(tmp_path, "cifar100", "test", label="coarse")


def test_cifar_truncated_and_corrupt_pickles(data_root, tmp_path):
    src = (data_root / "cifar-10-batches-py" / "test_batch").read_bytes()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    f = folder / "test_batch"
    f.write_bytes(src[: 1 << 20])
    with pytest.raises(DatasetError, match="cannot read .*test_batch .*truncated or corrupt"):
        load_cifar(tmp_path, "cifar10", "test")
    f.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_cifar(tmp_path, "cifar10", "test")
    d = pickle.loads(src)
    d["data"] = d["data"][:, :3000]
    f.write_bytes(pickle.dumps(d))
    with pytest.raises(DatasetError, match=r"'data' must be a uint8 array of shape \[N, 3072\]"):
        load_cifar(tmp_path, "cifar10", "test")
    d = pickle.loads(src)
    d["labels"] = [y + 0.5 for y in d["labels"]]  # fractional labels: refused, not truncated
    f.write_bytes(pickle.dumps(d))
    first = d["labels"][0]
    with pytest.raises(DatasetError, match=r"'labels' must hold integer class indices, found float64 values such as "
                                           rf"{first}"):
        load_cifar(tmp_path, "cifar10", "test")
    d["labels"] = [float(int(y)) for y in d["labels"]]  # integral floats lose nothing
    f.write_bytes(pickle.dumps(d))
    assert load_cifar(tmp_path, "cifar10", "test")[1].tolist() == [int(y) for y in d["labels"]]
    d = pickle.loads(src)
    del d["labels"]
    f.write_bytes(pickle.dumps(d))
    with pytest.raises(DatasetError, match="lacks the entries 'data' and 'labels'"):
        load_cifar(tmp_path, "cifar10", "test")
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DatasetError, match="lists 2 class names, expected 10"):
        cifar_class_names(tmp_path, "cifar10")


class _Evil:
    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        return shutil.rmtree, (self.victim,)


def test_cifar_pickle_cannot_run_code(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Evil(str(victim)), "labels": [0]}))
    with pytest.raises(DatasetError, match="refusing to load the global shutil.rmtree"):
        load_cifar(tmp_path, "cifar10", "test")
    assert victim.is_dir()
