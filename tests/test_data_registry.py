"""Tests of nsl.data's dataset registry (get_dataset, dataset_info) on real CIFAR-10/100 and digits."""

from __future__ import annotations

import pytest
import torch

from nsl.data import (
    CIFAR100_COARSE_CLASSES,
    DATASETS,
    dataset_info,
    get_dataset,
)


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
