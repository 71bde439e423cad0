"""Tests of nsl.data's idx reader and writer (MNIST / Fashion-MNIST) on Debian's Fashion-MNIST when installed
and on idx files written from scikit-learn's real digits, damaged copies included; and of the digits split."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from nsl.data import (
    FASHION_MNIST_CLASSES,
    DatasetError,
    TensorImageDataset,
    dataset_info,
    get_dataset,
    load_digits,
    load_mnist,
    read_idx,
    write_idx,
)
from nsl.data.mnist import DEBIAN_FASHION_MNIST

needs_debian_fmnist = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                         reason="apt package dataset-fashion-mnist not installed")


@needs_debian_fmnist
def test_fashion_mnist_real_files(tmp_path):
    x, y = load_mnist(None, "test", "fashion-mnist")  # root=None finds the Debian package
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    x2, y2 = load_mnist(DEBIAN_FASHION_MNIST, "test", "fashion-mnist")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # round trip a real subset through torchvision's layout, raw and gzipped
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", x[:500, 0])
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", y[:500].to(torch.uint8))
    x3, y3 = load_mnist(tmp_path, "test", "fashion-mnist", check_counts=False)
    assert torch.equal(x3, x[:500]) and torch.equal(y3, y[:500])
    with pytest.raises(DatasetError, match="holds 500 images, expected 10000"):
        load_mnist(tmp_path, "test", "fashion-mnist")
    ds = get_dataset("fashion-mnist", DEBIAN_FASHION_MNIST, "test")
    assert ds.classes == FASHION_MNIST_CLASSES and len(ds) == 10000


def test_mnist_idx_round_trip(tmp_path, digits28):
    x, y = digits28
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", x[:1000, 0])
    write_idx(raw / "train-labels-idx1-ubyte.gz", y[:1000].to(torch.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", x[1000:, 0])
    write_idx(raw / "t10k-labels-idx1-ubyte", y[1000:].numpy().astype(np.uint8))
    head = (raw / "t10k-images-idx3-ubyte").read_bytes()[:16]
    assert head == bytes([0, 0, 8, 3]) + (797).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    for split, sl in (("train", slice(0, 1000)), ("test", slice(1000, None))):
        xi, yi = load_mnist(tmp_path, split, check_counts=False)
        assert xi.shape[1:] == (1, 28, 28) and torch.equal(xi, x[sl]) and torch.equal(yi, y[sl])
    # other dtypes survive a round trip too
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a.idx", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    with pytest.raises(DatasetError, match="holds 1000 images, expected 60000"):
        load_mnist(tmp_path, "train")


def test_mnist_damaged_files(tmp_path, digits28):
    x, y = digits28
    root = tmp_path
    write_idx(root / "train-images-idx3-ubyte", x[:100, 0])
    write_idx(root / "train-labels-idx1-ubyte", y[:100].to(torch.uint8))
    ok = (root / "train-images-idx3-ubyte").read_bytes()
    (root / "train-images-idx3-ubyte").write_bytes(ok[:-100])
    with pytest.raises(DatasetError, match="bytes but its header .* the file is truncated"):
        load_mnist(root, "train", check_counts=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x12\x34" + ok[2:])
    with pytest.raises(DatasetError, match="not an idx file: bad magic number 1234"):
        load_mnist(root, "train", check_counts=False)
    shutil.copyfile(root / "train-labels-idx1-ubyte", root / "train-images-idx3-ubyte")
    with pytest.raises(DatasetError, match=r"must hold uint8 images \[N, 28, 28\] \(magic 0x00000803\)"):
        load_mnist(root, "train", check_counts=False)
    (root / "train-images-idx3-ubyte").unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(ok)[:-30])
    with pytest.raises(DatasetError, match="cannot decompress .*truncated or corrupt"):
        load_mnist(root, "train", check_counts=False)
    write_idx(root / "train-images-idx3-ubyte.gz", x[:99, 0])
    with pytest.raises(DatasetError, match="holds 99 images but train-labels-idx1-ubyte 100 labels"):
        load_mnist(root, "train", check_counts=False)
    (root / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="but not train-labels-idx1-ubyte"):
        load_mnist(root, "train", check_counts=False)
    with pytest.raises(DatasetError) as e:
        load_mnist(tmp_path / "nothing", "test", "fashion-mnist")
    for part in ("t10k-images-idx3-ubyte[.gz]", "FashionMNIST/raw", "download('fashion-mnist'",
                 "torchvision.datasets.FashionMNIST", "apt-get install dataset-fashion-mnist"):
        assert part in str(e.value), part


def test_digits_split_is_deterministic_stratified_and_partitions():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    xall, yall = load_digits("all")
    assert xtr.shape == (1347, 1, 8, 8) and xte.shape == (450, 1, 8, 8) and xtr.dtype == torch.uint8
    assert int(xall.max()) == 255 and int(xall.min()) == 0
    x2, y2 = load_digits("train")
    assert torch.equal(xtr, x2) and torch.equal(ytr, y2)
    assert not torch.equal(load_digits("test", seed=1)[1], yte)
    # stratified: each class keeps its share (within one image) in the test split
    total = torch.bincount(yall, minlength=10).double()
    assert (torch.bincount(yte, minlength=10) - total * 450 / 1797).abs().max() <= 1
    # train and test partition the dataset
    def rows(x, y):
        return Counter((bytes(a.flatten().tolist()), int(b)) for a, b in zip(x, y, strict=True))

    assert rows(xtr, ytr) + rows(xte, yte) == rows(xall, yall)
    # sklearn's 0..16 values become round(v * 255 / 16)
    from sklearn.datasets import load_digits as sk

    ref = np.rint(sk().images * 255 / 16).astype(np.uint8)
    assert np.array_equal(xall[:, 0].numpy(), ref)
    for size in (16, 32):
        xs, ys = load_digits("test", size=size)
        assert xs.shape == (450, 1, size, size) and torch.equal(ys, yte)
        assert torch.equal(load_digits("test", size=size, interpolation="nearest")[0],
                           xte.repeat_interleave(size // 8, 2).repeat_interleave(size // 8, 3))
    info = dataset_info("digits")
    mean, std = TensorImageDataset(xtr, ytr).channel_stats()
    assert abs(mean[0] - info.mean[0]) < 1e-4 and abs(std[0] - info.std[0]) < 1e-4
