"""Tests of nsl.data on real data: CIFAR-10/100 (both layouts, via the ``data_root`` fixture),
Fashion-MNIST (Debian's package when installed), scikit-learn's digits, and small trees or archives
the tests build from those real images."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nsl.data import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    ChecksumError,
    DatasetError,
    GPULoader,
    ImageFolder,
    Resource,
    Source,
    TensorImageDataset,
    cifar_class_names,
    dataset_info,
    eval_transform,
    get_dataset,
    imagefolder_loader,
    load_cifar,
    load_digits,
    load_mnist,
    random_crop_flip,
    read_idx,
    write_idx,
)
from nsl.data import download as download_module
from nsl.data.download import SOURCES, download
from nsl.data.imagefolder import RandomResizedCrop
from nsl.data.mnist import DEBIAN_FASHION_MNIST

CIFAR_DIRS = {"cifar10": ("cifar-10-batches-py", "cifar-10-batches-bin"),
              "cifar100": ("cifar-100-python", "cifar-100-binary")}


@cache
def _cifar(root: str, name: str, split: str, label: str = "fine", layout: str = "auto"):
    return load_cifar(root, name, split, label=label, layout=layout)


@pytest.fixture(scope="module")
def cifar(data_root):
    """``cifar(name, split, label='fine', layout='auto')``: cached loads from the shared cache."""
    return lambda *a, **k: _cifar(str(data_root), *a, **k)


# ---------------------------------------------------------------------------------------------
# CIFAR: both layouts, content validation
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files
# ---------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def digits28():
    """Real handwritten digits upscaled to MNIST's 28 x 28, 10 classes (scikit-learn's)."""
    x, y = load_digits("all", size=28)
    return x, y


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


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory, cifar):
    """A tiny ImageFolder tree of real CIFAR-10 test images saved as PNG: train/ and val/, 3 classes."""
    x, y = cifar("cifar10", "test")
    root = tmp_path_factory.mktemp("tree")
    picked = {}
    for split, start in (("train", 0), ("val", 5)):
        for c in (0, 3, 7):
            idx = torch.nonzero(y == c).flatten()[start:start + 5]
            folder = root / split / CIFAR10_CLASSES[c]
            folder.mkdir(parents=True)
            for k, i in enumerate(idx.tolist()):
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"{k:02d}.png")
            picked[split, c] = x[idx]
    return root, picked


def test_imagefolder_decodes_exact_pixels(tree):
    root, picked = tree
    ds = ImageFolder(root / "val")
    assert ds.classes == ["airplane", "cat", "horse"] and len(ds) == 15
    for i, c in enumerate((0, 3, 7)):
        imgs = torch.stack([ds[i * 5 + k][0] for k in range(5)])
        assert imgs.dtype == torch.uint8 and torch.equal(imgs, picked["val", c])
        assert {ds[i * 5 + k][1] for k in range(5)} == {i}
    gray = ImageFolder(root / "val", mode="L")
    assert gray[0][0].shape == (1, 32, 32)


def test_imagefolder_loaders_with_workers(tree):
    root, picked = tree
    loader = imagefolder_loader(root / "val", 4, train=False, image_size=32, resize=32, mean=None, std=None,
                                num_workers=2)
    xs, ys = zip(*list(loader), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    expect = torch.cat([picked["val", c] for c in (0, 3, 7)]).float() / 255
    assert torch.equal(x, expect) and torch.equal(y, torch.arange(3).repeat_interleave(5))
    loader = imagefolder_loader(root / "train", 4, train=True, image_size=24, num_workers=2, seed=3)
    batches = list(loader)
    assert len(batches) == 3  # 15 images, drop_last
    assert all(b[0].shape == (4, 3, 24, 24) and b[0].dtype == torch.float32 for b in batches)
    again = list(imagefolder_loader(root / "train", 4, train=True, image_size=24, num_workers=2, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # seeded workers
    ds = get_dataset("imagefolder", root, "test", image_size=28)  # test falls back to val/
    assert ds.root == root / "val" and ds[0][0].shape == (3, 28, 28)
    sharded = [imagefolder_loader(root / "val", 2, train=False, num_workers=0, rank=r, world_size=2,
                                  image_size=8) for r in (0, 1)]
    seen = [int(v) for s in sharded for _, yb in s for v in yb]
    assert sorted(seen) == sorted([0] * 5 + [1] * 5 + [2] * 5 + [0])  # DistributedSampler pads to 16


def test_imagefolder_errors(tree, tmp_path):
    with pytest.raises(DatasetError, match="does not exist .*<class name>/<image>"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="holds no class subfolders"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="has 1 class folders but no images in them"):
        ImageFolder(tmp_path)
    shutil.copytree(tree[0] / "val" / "cat", tmp_path / "b")
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) hold no image \(a\)"):
        ImageFolder(tmp_path)
    assert len(ImageFolder(tmp_path, allow_empty=True)) == 5
    # a training loader drops incomplete batches: fewer images than one batch would be an epoch without batches
    small = tmp_path.with_name(tmp_path.name + "-small")  # outside the tree above
    shutil.copytree(tree[0] / "val" / "cat", small / "cat")
    with pytest.raises(DatasetError, match=r"has 5 images, fewer than one batch of 16: .*lower batch_size"):
        imagefolder_loader(small, 16, train=True, num_workers=0)
    with pytest.raises(DatasetError, match=r"has 5 images \(2 per process of 2\), fewer than one batch of 4"):
        imagefolder_loader(small, 4, train=True, num_workers=0, rank=1, world_size=2)
    assert len(imagefolder_loader(small, 16, train=False, num_workers=0)) == 1  # evaluation keeps the rest
    (tmp_path / "b" / "zz.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path, allow_empty=True)
    with pytest.raises(DatasetError, match="cannot decode image .*zz.png"):
        ds[len(ds) - 1]


def test_transforms():
    img = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3))
    rrc = RandomResizedCrop(16)
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = rrc.get_params(60, 40)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60 and h > 0 and w > 0
    assert rrc(img).size == (16, 16)
    out = eval_transform(32, mean=None, std=None)(img)  # resize shorter side 37, crop 32
    assert out.shape == (3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


# ---------------------------------------------------------------------------------------------
# tensor datasets, batched augmentation, loader
# ---------------------------------------------------------------------------------------------
def _reference_crop_flip(x, oy, ox, flips, p, mode):
    pad = F.pad(x.float(), (p, p, p, p), mode={"zeros": "constant"}.get(mode, mode))
    h, w = x.shape[-2:]
    out = [pad[b, :, oy[b]:oy[b] + h, ox[b]:ox[b] + w] for b in range(len(x))]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips.tolist(), strict=True)])


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_random_crop_flip_matches_pad_then_crop(cifar, mode):
    x = cifar("cifar10", "test")[0][:64]
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    out = random_crop_flip(x, oy, ox, flips, 4, mode)
    assert out.dtype == torch.uint8
    assert torch.equal(out.float(), _reference_crop_flip(x, oy, ox, flips, 4, mode))
    # a known offset: (4, 4) without flip is the identity, (0, 8) shifts by 4 rows down / 4 columns left
    z = torch.zeros(2, dtype=torch.long)
    assert torch.equal(random_crop_flip(x[:2], z + 4, z + 4, z.bool(), 4, mode), x[:2])
    shifted = random_crop_flip(x[:2], z, z + 8, z.bool(), 4, mode)
    assert torch.equal(shifted[:, :, 4:, :28], x[:2, :, :28, 4:])
    if mode == "zeros":
        assert int(shifted[:, :, :4].abs().sum()) == 0 and int(shifted[:, :, :, 28:].abs().sum()) == 0
    # gathering through an index (the loader's path), and from a non-contiguous source
    idx = torch.tensor([5, 1, 5])
    ref = random_crop_flip(x[idx], oy[:3], ox[:3], flips[:3], 4, mode)
    assert torch.equal(random_crop_flip(x, oy[:3], ox[:3], flips[:3], 4, mode, index=idx), ref)
    nc = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert torch.equal(random_crop_flip(nc, oy[:3], ox[:3], flips[:3], 4, mode, index=idx), ref)


def _coordinate_images(n, h=32, w=32):
    """Images whose channel 0 holds row + 1 and channel 1 column + 1 (0 only on padding)."""
    rows = torch.arange(1, h + 1, dtype=torch.uint8)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8)[None, :].expand(h, w)
    img = torch.stack([rows, cols, torch.full((h, w), 7, dtype=torch.uint8)])
    return img.expand(n, 3, h, w).contiguous(), torch.arange(n)


def test_loader_augmentation_offsets_and_flips():
    x, y = _coordinate_images(4000)
    loader = GPULoader((x, y), 500, augment=True, padding=4, seed=0)
    offsets, flips, seen = [], [], []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and xb.shape == (500, 3, 32, 32)
        seen.append(yb)
        r, c = xb[:, 0].long(), xb[:, 1].long()
        # the window's centre pixel (16, 16) always lies inside the image for padding 4
        oy = r[:, 16, 16] - 1 - 16 + 4
        fl = c[:, 16, 17] < c[:, 16, 16]
        ox = torch.where(fl, c[:, 16, 16] - 1 - (31 - 16), c[:, 16, 16] - 1 - 16) + 4
        assert int(oy.min()) >= 0 and int(oy.max()) <= 8 and int(ox.min()) >= 0 and int(ox.max()) <= 8
        exp = _reference_crop_flip(x[yb], oy, ox, fl, 4, "zeros")
        assert torch.equal(xb, exp)
        offsets.append(torch.stack([oy, ox], 1))
        flips.append(fl)
    assert torch.equal(torch.sort(torch.cat(seen))[0], y)  # one epoch covers every sample once
    offsets, flips = torch.cat(offsets), torch.cat(flips)
    assert abs(flips.float().mean().item() - 0.5) < 0.03
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    assert int(counts.min()) > 0 and int(counts.sum()) == 4000
    assert int(counts.max()) < 3 * 4000 / 81  # every offset pair drawn, none dominating
    # reflect padding never shows a zero, augment=False is the identity
    xb, _ = next(iter(GPULoader((x, y), 256, augment=True, padding_mode="reflect")))
    assert bool((xb[:, :2] > 0).all())
    xb, yb = next(iter(GPULoader((x, y), 256, shuffle=False)))
    assert torch.equal(xb, x[:256].float()) and torch.equal(yb, y[:256])


def test_loader_outputs_and_determinism(cifar):
    x, y = cifar("cifar10", "test")
    ds = TensorImageDataset(x, y, CIFAR10_CLASSES, "cifar10")
    info = dataset_info("cifar10")
    norm = GPULoader(ds, 2000, augment=False, output="normalize", mean=info.mean, std=info.std)
    xb, _ = next(iter(norm))
    assert abs(float(xb.mean())) < 0.1 and abs(float(xb.std()) - 1) < 0.1
    unit, _ = next(iter(GPULoader(ds, 64, output="unit", channels_last=True, dtype=torch.float64)))
    assert unit.dtype == torch.float64 and 0 <= float(unit.min()) and float(unit.max()) <= 1
    assert unit.is_contiguous(memory_format=torch.channels_last)
    raw, _ = next(iter(GPULoader(ds, 64, augment=True)))
    assert float(raw.max()) > 200  # raw pixels 0..255 (the NSL paper's CIFAR protocol)

    def epoch(seed):
        return [(a.clone(), b.clone()) for a, b in GPULoader(ds, 1000, augment=True, seed=seed)]

    e1, e2, e3 = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, e2, strict=True))
    assert not torch.equal(e1[0][1], e3[0][1])
    # two epochs differ in order; drop_last
    loader = GPULoader(ds, 3000, seed=0)
    first = torch.cat([b for _, b in loader])
    second = torch.cat([b for _, b in loader])
    assert loader.epoch == 2 and len(first) == len(second) == 10000 and not torch.equal(first, second)
    loader = GPULoader(ds, 3000, drop_last=True)
    assert len(loader) == 3 and [len(b) for _, b in loader] == [3000] * 3
    assert [len(b) for _, b in GPULoader(ds, 3000)] == [3000, 3000, 3000, 1000]


@pytest.mark.parametrize("n,world", [(1000, 3), (999, 3), (10, 4)])
def test_loader_shards_disjoint_and_covering(n, world):
    x, y = _coordinate_images(n, 8, 8)
    for epoch in range(2):
        seen = []
        for rank in range(world):
            loader = GPULoader((x, y), 7, seed=5, rank=rank, world_size=world)
            loader.set_epoch(epoch)
            labels = torch.cat([b for _, b in loader])
            assert len(labels) == n // world
            assert torch.equal(labels, loader.epoch_indices(epoch))
            seen.append(labels)
        allseen = torch.cat(seen)
        assert len(torch.unique(allseen)) == len(allseen) == n - n % world
        # even_shards=False (evaluation) keeps every sample
        ev = [torch.cat([b for _, b in GPULoader((x, y), 7, shuffle=False, rank=r, world_size=world)])
              for r in range(world)]
        assert torch.equal(torch.sort(torch.cat(ev))[0], y)
    with pytest.raises(ValueError, match="rank"):
        GPULoader((x, y), 7, rank=world, world_size=world)


def test_loader_state_save_restore_continues_identically(digits28):
    x, y = digits28
    kw = dict(augment=True, padding=3, seed=11, rank=1, world_size=2, output="unit")
    a = GPULoader((x, y), 64, **kw)
    it = iter(a)
    for _ in range(5):
        next(it)  # part of epoch 0
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    expected = [next(it) for _ in range(len(a) - 5)]  # rest of epoch 0
    expected += list(a)  # epoch 1
    b = GPULoader((x, y), 64, **kw)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.epoch, b.position) == (0, 5)
    got = list(b) + list(b)
    assert len(got) == len(expected)
    for p, q in zip(got, expected, strict=True):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
    with pytest.raises(ValueError, match="seed=11"):
        GPULoader((x, y), 64, **{**kw, "seed": 12}).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------
def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory, data_root):
    """A cifar-10-python.tar.gz holding the real test batch and meta file."""
    d = tmp_path_factory.mktemp("archive")
    path = d / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for f in ("test_batch", "batches.meta"):
            tf.add(data_root / "cifar-10-batches-py" / f, arcname=f"cifar-10-batches-py/{f}")
    return path


def test_download_from_file_url_extracts_atomically(cifar_archive, tmp_path, cifar):
    md5 = _md5(cifar_archive)
    bad_mirror = (tmp_path / "nope.tar.gz").as_uri()
    src = Source((Resource("cifar-10-python.tar.gz", (bad_mirror, cifar_archive.as_uri()), md5=md5),),
                 "cifar-10-batches-py")
    root = tmp_path / "data"
    out = download("cifar10", root, source=src)
    assert out == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no leftovers
    x, y = load_cifar(root, "cifar10", "test")
    assert torch.equal(x, cifar("cifar10", "test")[0]) and torch.equal(y, cifar("cifar10", "test")[1])
    # already there: nothing is fetched (the URL is dead); force fetches again and replaces
    dead = Source((Resource("cifar-10-python.tar.gz", (bad_mirror,), md5=md5),), "cifar-10-batches-py")
    assert download("cifar10", root, source=dead) == out
    (out / "stale").write_text("x")
    download("cifar10", root, source=src, force=True)
    assert not (out / "stale").exists() and (out / "test_batch").is_file()
    # sha256 works as well
    sha = hashlib.sha256(cifar_archive.read_bytes()).hexdigest()
    src256 = Source((Resource("c.tar.gz", (cifar_archive.as_uri(),), sha256=sha),), "cifar-10-batches-py")
    assert download("cifar10", tmp_path / "d2", source=src256).is_dir()


def test_download_checksum_mismatch(cifar_archive, tmp_path, monkeypatch):
    root = tmp_path / "data"
    wrong = "0" * 32
    src = Source((Resource("cifar-10-python.tar.gz", (cifar_archive.as_uri(),), md5=wrong),),
                 "cifar-10-batches-py")
    monkeypatch.setitem(download_module.SOURCES, "cifar10", src)  # the URL table is overridable
    with pytest.raises(ChecksumError) as e:
        download("cifar10", root)
    msg = str(e.value)
    assert "checksum mismatch" in msg and _md5(cifar_archive) in msg and wrong in msg
    assert isinstance(e.value, DatasetError)
    assert list(root.iterdir()) == []  # nothing kept, not even the temporary folder
    missing = Source((Resource("x.tar.gz", ((tmp_path / "none").as_uri(),), md5=wrong),), "x")
    with pytest.raises(DatasetError, match="could not download x.tar.gz"):
        download("cifar10", root, source=missing)
    with pytest.raises(ValueError, match="no checksum"):
        download("x", root, source=Source((Resource("x", (cifar_archive.as_uri(),)),), "x"))
    with pytest.raises(ValueError, match="available: cifar10, cifar100"):
        download("svhn", root)


def test_download_refuses_unsafe_archive_and_fetches_idx_files(tmp_path, digits28):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    src = Source((Resource("evil.tar.gz", (evil.as_uri(),), md5=_md5(evil)),), "cifar-10-batches-py")
    with pytest.raises(DatasetError, match="unsafe member '../escaped'"):
        download("cifar10", tmp_path / "root", source=src)
    assert not (tmp_path / "escaped").exists()
    # MNIST-style sources: the .gz idx files are kept as they are in root/MNIST/raw
    x, y = digits28
    srv = tmp_path / "server"
    srv.mkdir()
    write_idx(srv / "train-images-idx3-ubyte.gz", x[:300, 0])
    write_idx(srv / "train-labels-idx1-ubyte.gz", y[:300].to(torch.uint8))
    res = tuple(Resource(f, ((srv / f).as_uri(),), md5=_md5(srv / f))
                for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"))
    out = download("mnist", tmp_path / "root", source=Source(res, "MNIST/raw", "files"))
    assert out == tmp_path / "root" / "MNIST" / "raw"
    xi, yi = load_mnist(tmp_path / "root", "train", check_counts=False)
    assert torch.equal(xi, x[:300]) and torch.equal(yi, y[:300])


def test_download_table_is_complete():
    assert set(SOURCES) >= {"cifar10", "cifar100", "mnist", "fashion-mnist"}
    for src in SOURCES.values():
        for r in src.resources:
            assert len(r.md5) == 32 and all(u.startswith(("https://", "http://")) for u in r.urls)
    assert SOURCES["cifar10"].resources[0].md5 == "c58f30108f718f92721af3b95e74349a"


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_registry(data_root, cifar):
    with pytest.raises(ValueError) as e:
        get_dataset("svhn", data_root)
    for name in ("cifar10", "cifar100", "mnist", "fashion-mnist", "digits", "imagefolder"):
        assert name in str(e.value)
        assert name in DATASETS and dataset_info(name).name == name
    ds = get_dataset("cifar100", data_root, "test", label="coarse", layout="binary")
    assert ds.num_classes == 20 and ds.classes == CIFAR100_COARSE_CLASSES
    assert torch.equal(ds.labels, cifar("cifar100", "test", "coarse", "binary")[1])
    ds = get_dataset("CIFAR-10", data_root, "test")
    assert ds.image_shape == (3, 32, 32) and ds.num_classes == 10 and len(ds) == 10000
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and label.dtype == torch.int64
    d = get_dataset("digits", split="test", size=16)
    info = dataset_info("digits")
    assert len(d) == info.test_size and d.image_shape == (info.channels, 16, 16)
    for name in DATASETS:
        i = dataset_info(name)
        assert len(i.mean) == len(i.std) == i.channels
    with pytest.raises(TypeError, match="unexpected arguments"):
        get_dataset("cifar10", data_root, "test", size=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_same_batches_on_cuda(digits28):
    x, y = digits28
    kw = dict(augment=True, padding=4, padding_mode="reflect", seed=3, output="normalize", channels_last=True)
    cpu = list(GPULoader((x, y), 128, **kw))
    gpu = list(GPULoader((x, y), 128, device="cuda", **kw))
    assert gpu[0][0].device.type == "cuda"
    for (a, b), (c, d) in zip(cpu, gpu, strict=True):
        assert torch.allclose(a, c.cpu(), atol=1e-6) and torch.equal(b, d.cpu())
