"""Datasets and loaders of nsl (depends only on torch, numpy, Pillow, scikit-learn and tqdm).

Registry::

    ds = get_dataset("cifar10", root, "train")          # TensorImageDataset, uint8 [50000, 3, 32, 32]
    loader = GPULoader(ds, 128, augment=True, device="cuda")
    info = dataset_info("cifar10")                        # classes, channels, size, mean, std

Names: ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``, ``digits`` (scikit-learn's, no files
needed) and ``imagefolder`` (an ImageNet-style ``root/<class>/<image>`` tree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cifar import (
    CIFAR10_CLASSES,
    CIFAR100_COARSE_CLASSES,
    CIFAR100_FINE_CLASSES,
    cifar_class_names,
    find_cifar,
    load_cifar,
)
from .digits import DIGITS_CLASSES, load_digits
from .download import SOURCES, Resource, Source
from .download import download as download_dataset
from .errors import ChecksumError, DatasetError
from .imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    eval_transform,
    imagefolder_loader,
    train_transform,
)
from .mnist import FASHION_MNIST_CLASSES, MNIST_CLASSES, find_mnist, load_mnist, read_idx, write_idx
from .tensor_data import GPULoader, TensorImageDataset, crop_flip_indices, random_crop_flip

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_COARSE_CLASSES",
    "CIFAR100_FINE_CLASSES",
    "DATASETS",
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_CLASSES",
    "SOURCES",
    "ChecksumError",
    "DatasetError",
    "DatasetInfo",
    "GPULoader",
    "ImageFolder",
    "Resource",
    "Source",
    "TensorImageDataset",
    "cifar_class_names",
    "crop_flip_indices",
    "dataset_info",
    "download_dataset",
    "eval_transform",
    "find_cifar",
    "find_mnist",
    "get_dataset",
    "imagefolder_loader",
    "load_cifar",
    "load_digits",
    "load_mnist",
    "random_crop_flip",
    "read_idx",
    "train_transform",
    "write_idx",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset.

    Attributes:
        name: registry name.
        num_classes: number of classes (CIFAR-100: fine labels; 20 coarse ones with
            ``label='coarse'``); 0 for ``imagefolder`` (depends on the tree).
        channels: image channels.
        image_size: side of the (square) images as stored; for ``imagefolder`` the default crop.
        mean, std: per-channel statistics of the training split in 0..1 units (ImageNet's for
            ``imagefolder``).
        train_size, test_size: images per split (0 when it depends on the data).
        classes: class names, or None when they depend on the data.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    classes: tuple[str, ...] | None = None


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           50000, 10000, tuple(CIFAR10_CLASSES)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            50000, 10000, tuple(CIFAR100_FINE_CLASSES)),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 60000, 10000, tuple(MNIST_CLASSES)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 60000, 10000,
                                 tuple(FASHION_MNIST_CLASSES)),
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3758,), 1347, 450, tuple(DIGITS_CLASSES)),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 224, IMAGENET_MEAN, IMAGENET_STD, 0, 0, None),
}
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion_mnist": "fashion-mnist",
            "fashionmnist": "fashion-mnist", "image-folder": "imagefolder", "image_folder": "imagefolder"}


def _canonical(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Metadata of a registered dataset (see :class:`DatasetInfo`); ValueError for unknown names."""
    return DATASETS[_canonical(name)]


def get_dataset(name: str, root: str | Path | None = None, split: str = "train", **kw):
    """Load a registered dataset split.

    Args:
        name: ``'cifar10'``, ``'cifar100'``, ``'mnist'``, ``'fashion-mnist'``, ``'digits'`` or
            ``'imagefolder'``.
        root: data folder (ignored by ``digits``); see each loader for the layouts found under it.
        split: ``'train'`` or ``'test'`` (``'all'`` for ``digits``; for ``imagefolder``, the
            subfolder ``root/<split>`` when it exists, with ``'test'`` falling back to ``root/val``,
            else ``root`` itself).
        **kw: passed to the loader: ``label``/``layout`` (:func:`load_cifar`), ``check_counts``
            (:func:`load_mnist`), ``size``/``seed``/``test_size`` (:func:`load_digits`),
            ``transform``/``image_size`` (:class:`ImageFolder`; default transforms: train or eval).

    Returns:
        a :class:`TensorImageDataset` (images uint8 ``[N, C, H, W]``, labels int64 ``[N]``, class
        names) for the tensor datasets, an :class:`ImageFolder` for ``imagefolder``.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or split.
        DatasetError: the data are missing or damaged (the message says how to get them).
    """
    key = _canonical(name)
    if key in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"{key} needs root, the folder holding its files")
        label = kw.pop("label", "fine")
        layout = kw.pop("layout", "auto")
        _no_extra(key, kw)
        images, labels = load_cifar(root, key, split, label=label, layout=layout)
        return TensorImageDataset(images, labels, cifar_class_names(root, key, label, layout=layout), key)
    if key in ("mnist", "fashion-mnist"):
        check_counts = kw.pop("check_counts", True)
        _no_extra(key, kw)
        images, labels = load_mnist(root, split, key, check_counts=check_counts)
        classes = MNIST_CLASSES if key == "mnist" else FASHION_MNIST_CLASSES
        return TensorImageDataset(images, labels, classes, key)
    if key == "digits":
        images, labels = load_digits(split, **kw)
        return TensorImageDataset(images, labels, DIGITS_CLASSES, key)
    # imagefolder
    if root is None:
        raise ValueError("imagefolder needs root, the folder of class subfolders")
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = Path(root).expanduser()
    folder = root
    for cand in ((split, "val") if split == "test" else (split,)):
        if (root / cand).is_dir():
            folder = root / cand
            break
    image_size = kw.pop("image_size", 224)
    transform = kw.pop("transform", None)
    if transform is None:
        transform = train_transform(image_size) if split == "train" else eval_transform(image_size)
    return ImageFolder(folder, transform=transform, **kw)


def _no_extra(name: str, kw: dict) -> None:
    if kw:
        raise TypeError(f"unexpected arguments for {name}: {', '.join(sorted(kw))}")
