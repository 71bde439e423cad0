"""MNIST and Fashion-MNIST readers for the idx files of the official releases (raw or gzipped).

Files (``.gz`` or decompressed; ``train-images.idx3-ubyte`` with a dot is accepted too)::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

searched in ``root``, ``root/MNIST/raw`` or ``root/FashionMNIST/raw`` (torchvision's layout), and
``root/mnist`` or ``root/fashion-mnist``. With ``root=None``, Fashion-MNIST is also looked for where
Debian's ``dataset-fashion-mnist`` package installs it (``/usr/share/datasets/fashion-mnist``).

The idx format: a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order. Images are ``0x00000803`` (uint8,
3 dimensions), labels ``0x00000801`` (uint8, 1 dimension).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "find_mnist",
    "load_mnist",
    "read_idx",
    "write_idx",
]

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_VARIANTS = {
    "mnist": dict(title="MNIST", tv_folder="MNIST", folders=("mnist", "MNIST"), classes=MNIST_CLASSES,
                  torchvision="MNIST", url="https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": dict(title="Fashion-MNIST", tv_folder="FashionMNIST",
                          folders=("fashion-mnist", "fashion_mnist", "FashionMNIST"),
                          classes=FASHION_MNIST_CLASSES, torchvision="FashionMNIST",
                          url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
}
_PREFIX = {"train": "train", "test": "t10k"}
_COUNTS = {"train": 60000, "test": 10000}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _variant(variant: str) -> str:
    key = str(variant).lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    if key not in _VARIANTS:
        raise ValueError(f"variant must be 'mnist' or 'fashion-mnist', got {variant!r}")
    return key


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (raw, or gzip-compressed when the name ends in ``.gz``).

    Returns:
        a numpy array with the file's dimensions and element type (uint8 for MNIST's files),
        in native byte order.

    Raises:
        DatasetError: the file is missing, its magic number is not an idx one, or its size does
            not match the dimensions in its header (truncated or padded file).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        raise DatasetError(f"missing idx file {path}") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot decompress {path}: the file is truncated or corrupt ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an idx file: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path}: {len(raw)} bytes but its header {list(dims)} ({dtype}) needs "
                           f"{expected}: the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray | torch.Tensor) -> Path:
    """Write ``array`` as an idx file (gzip-compressed when ``path`` ends in ``.gz``).

    Args:
        path: destination file.
        array: uint8, int8, int16, int32, float32 or float64 array of 1 to 255 dimensions.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    a = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_TYPES.items()}
    native = a.dtype.newbyteorder("=")
    if native.str not in codes:
        raise ValueError(f"idx files cannot hold {a.dtype}")
    code = codes[native.str]
    buf = io.BytesIO()
    buf.write(bytes([0, 0, code, a.ndim]))
    buf.write(struct.pack(f">{a.ndim}I", *a.shape))
    buf.write(np.ascontiguousarray(a, dtype=_IDX_TYPES[code]).tobytes())
    path = Path(path)
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _file_in(folder: Path, split: str, kind: str) -> Path | None:
    ndim = 3 if kind == "images" else 1
    for stem in (f"{_PREFIX[split]}-{kind}-idx{ndim}-ubyte", f"{_PREFIX[split]}-{kind}.idx{ndim}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _candidates(root: Path | None, variant: str) -> list[Path]:
    v = _VARIANTS[variant]
    if root is None:
        return [DEBIAN_FASHION_MNIST] if variant == "fashion-mnist" else []
    return [root, root / v["tv_folder"] / "raw", *(root / f for f in v["folders"])]


def _how_to_get(variant: str, root: Path | None) -> str:
    v = _VARIANTS[variant]
    r = str(root) if root is not None else "ROOT"
    extra = (" On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs the files under "
             f"{DEBIAN_FASHION_MNIST}." if variant == "fashion-mnist" else "")
    return (f"To get it: run `nsl download {variant} {r}` or add --download to nsl train (fetches the four "
            f".gz files from {v['url']} into {r}/{v['tv_folder']}/raw and checks their md5; from Python: "
            f"`nsl.data.download.download({variant!r}, {r!r})`), or "
            f"torchvision.datasets.{v['torchvision']}({r!r}, download=True).{extra}")


def find_mnist(root: str | Path | None, split: str = "train", variant: str = "mnist") -> tuple[Path, Path]:
    """Locate the image and label idx files of one split.

    Returns:
        ``(images_path, labels_path)``.

    Raises:
        DatasetError: neither file pair is found in any of the searched folders.
    """
    variant = _variant(variant)
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser() if root is not None else None
    searched = _candidates(root, variant)
    for folder in searched:
        images, labels = _file_in(folder, split, "images"), _file_in(folder, split, "labels")
        if images and labels:
            return images, labels
        if images or labels:
            missing = f"{_PREFIX[split]}-{'labels-idx1' if images else 'images-idx3'}-ubyte[.gz]"
            raise DatasetError(f"{_VARIANTS[variant]['title']}: {folder} holds {(images or labels).name} "
                               f"but not {missing}. {_how_to_get(variant, root)}")
    p = _PREFIX[split]
    where = ", ".join(str(f) for f in searched) or "(no folder: root is None)"
    raise DatasetError(f"{_VARIANTS[variant]['title']} {split} split not found: expected "
                       f"{p}-images-idx3-ubyte[.gz] and {p}-labels-idx1-ubyte[.gz] in one of {where}. "
                       f"{_how_to_get(variant, root)}")


def load_mnist(root: str | Path | None, split: str = "train", variant: str = "mnist", *,
               check_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST or Fashion-MNIST split from its idx files.

    Args:
        root: folder holding the idx files (see the module docstring for the folders searched);
            ``None`` only finds the Debian package's Fashion-MNIST.
        split: ``'train'`` or ``'test'``.
        variant: ``'mnist'`` or ``'fashion-mnist'``.
        check_counts: require the official counts (60,000 train / 10,000 test); turn off to read
            a subset written with :func:`write_idx`.

    Returns:
        ``(images, labels)``: images uint8 ``[N, 1, 28, 28]`` (0 = background for MNIST),
        labels int64 ``[N]`` in ``0..9``.

    Raises:
        DatasetError: files missing, with a wrong magic number, truncated, of mismatched lengths,
            not 28 x 28, with labels outside 0..9, or (``check_counts``) not the official count.
    """
    variant = _variant(variant)
    title = _VARIANTS[variant]["title"]
    images_path, labels_path = find_mnist(root, split, variant)
    hint = _how_to_get(variant, Path(root).expanduser() if root is not None else None)
    try:
        images, labels = read_idx(images_path), read_idx(labels_path)
    except DatasetError as e:
        raise DatasetError(f"{title}: {e}. {hint}") from e
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{title}: {images_path} must hold uint8 images [N, 28, 28] (magic 0x00000803), "
                           f"found {images.dtype} {list(images.shape)}. {hint}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{title}: {labels_path} must hold uint8 labels [N] (magic 0x00000801), "
                           f"found {labels.dtype} {list(labels.shape)}. {hint}")
    if len(images) != len(labels):
        raise DatasetError(f"{title}: {images_path.name} holds {len(images)} images but "
                           f"{labels_path.name} {len(labels)} labels. {hint}")
    if check_counts and len(images) != _COUNTS[split]:
        raise DatasetError(f"{title}: {images_path} holds {len(images)} images, expected "
                           f"{_COUNTS[split]} for the {split} split. {hint}")
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"{title}: {labels_path} has labels up to {labels.max()}, expected 0..9. {hint}")
    return (torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))
