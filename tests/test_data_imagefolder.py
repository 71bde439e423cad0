"""Tests of nsl.data's ImageFolder, its loaders and transforms on a small PNG tree of real CIFAR-10 test images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nsl.data import (
    CIFAR10_CLASSES,
    DatasetError,
    ImageFolder,
    eval_transform,
    get_dataset,
    imagefolder_loader,
)
from nsl.data.imagefolder import RandomResizedCrop


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
