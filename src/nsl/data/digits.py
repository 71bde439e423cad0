"""scikit-learn's bundled handwritten digits: the zero-setup dataset (no download, no files).

1,797 grayscale 8 x 8 images of the digits 0..9 (UCI "optdigits" test set), pixel values 0..16.
They are split once, deterministically and stratified by class, into 1,347 train and 450 test
images, and scaled to uint8 0..255 so that they go through the same pipeline as the other image
datasets; they can be upscaled to 16 x 16 or 32 x 32 for models built for larger inputs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGITS_CLASSES", "load_digits"]

DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_TEST_SIZE = 450


@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return images, d.target.astype(np.int64)


@lru_cache(maxsize=8)
def _split_indices(test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _all_digits()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_size, random_state=seed, shuffle=True, stratify=labels)
    return np.sort(train), np.sort(test)


def load_digits(split: str = "train", *, size: int = 8, test_size: int = DIGITS_TEST_SIZE, seed: int = 0,
                interpolation: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a deterministic, stratified split of scikit-learn's 8 x 8 digits.

    Args:
        split: ``'train'`` (1,347 images by default), ``'test'`` (450) or ``'all'`` (1,797).
        size: output side length: 8 (native), or larger (e.g. 16 or 32) to upscale.
        test_size: number of test images; each class keeps its share in both parts.
        seed: seed of the split (the same seed always gives the same split).
        interpolation: ``'bilinear'`` or ``'nearest'``, used when ``size != 8``.

    Returns:
        ``(images, labels)``: images uint8 ``[N, 1, size, size]`` (0 = background, 255 = ink),
        labels int64 ``[N]`` in ``0..9``; both in the order of scikit-learn's array.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if int(size) < 1:
        raise ValueError(f"size must be positive, got {size}")
    images, labels = _all_digits()
    if split != "all":
        train, test = _split_indices(int(test_size), int(seed))
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # never share the cached array
    if size != 8:
        kw = {"align_corners": False} if interpolation == "bilinear" else {}
        x = F.interpolate(x.float(), size=(int(size), int(size)), mode=interpolation, **kw)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x, torch.from_numpy(labels.copy())
