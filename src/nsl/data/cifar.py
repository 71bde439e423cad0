"""CIFAR-10 and CIFAR-100 readers for both on-disk layouts of the official release.

* python layout (what torchvision writes and reads): ``cifar-10-batches-py/`` holding the pickled
  batches ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and ``batches.meta``;
  ``cifar-100-python/`` holding ``train``, ``test`` and ``meta`` (fine and coarse labels).
* binary layout (Krizhevsky's "binary version"): ``cifar-10-batches-bin/`` holding
  ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``, records of 1 label byte +
  3,072 pixel bytes, and ``batches.meta.txt``; ``cifar-100-binary/`` holding ``train.bin`` and
  ``test.bin``, records of 2 label bytes (coarse, fine) + 3,072 pixel bytes, and
  ``fine_label_names.txt`` / ``coarse_label_names.txt``.

Pixels are stored channel-major (1,024 red, 1,024 green, 1,024 blue bytes, rows top to bottom),
so a record reshapes directly to ``[3, 32, 32]``.

The files are validated by content, not by checksum (re-written copies of the data are as good as
the originals): number of images per file and per split, array shapes and dtypes, label ranges.
Anything missing, truncated or corrupt raises :class:`~nsl.data.errors.DatasetError` naming the
folder, the expected layout and files, and how to obtain them.

Security note: the python layout is made of pickles; that is inherent to the format. They are only
read from the folder the caller points to, and through a restricted unpickler that refuses every
global except the handful numpy needs to rebuild an array, so a crafted file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_COARSE_CLASSES",
    "CIFAR100_FINE_CLASSES",
    "cifar_class_names",
    "find_cifar",
    "load_cifar",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
    "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm").split()
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things "
    "large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals "
    "non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2").split()

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    py_folder: str
    bin_folder: str
    py_files: dict  # split -> tuple of (file, expected image count)
    bin_files: dict
    py_meta: str
    bin_meta: dict  # label kind -> txt file
    label_bytes: int
    num_classes: dict  # label kind -> classes
    url: str
    torchvision: str


_SPECS = {
    "cifar10": _Spec(
        name="cifar10", title="CIFAR-10",
        py_folder="cifar-10-batches-py", bin_folder="cifar-10-batches-bin",
        py_files={"train": tuple((f"data_batch_{i}", 10000) for i in range(1, 6)),
                  "test": (("test_batch", 10000),)},
        bin_files={"train": tuple((f"data_batch_{i}.bin", 10000) for i in range(1, 6)),
                   "test": (("test_batch.bin", 10000),)},
        py_meta="batches.meta", bin_meta={"fine": "batches.meta.txt"},
        label_bytes=1, num_classes={"fine": 10},
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", torchvision="CIFAR10"),
    "cifar100": _Spec(
        name="cifar100", title="CIFAR-100",
        py_folder="cifar-100-python", bin_folder="cifar-100-binary",
        py_files={"train": (("train", 50000),), "test": (("test", 10000),)},
        bin_files={"train": (("train.bin", 50000),), "test": (("test.bin", 10000),)},
        py_meta="meta", bin_meta={"fine": "fine_label_names.txt", "coarse": "coarse_label_names.txt"},
        label_bytes=2, num_classes={"fine": 100, "coarse": 20},
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", torchvision="CIFAR100"),
}
_SPLIT_SIZES = {"train": 50000, "test": 10000}


def _spec(name: str) -> _Spec:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _SPECS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected 'cifar10' or 'cifar100'")
    return _SPECS[key]


def _check_split_label(spec: _Spec, split: str, label: str) -> None:
    if split not in _SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label not in spec.num_classes:
        raise ValueError(f"{spec.title} has labels {sorted(spec.num_classes)}, got label={label!r}")


def _layout_description(spec: _Spec, root: Path) -> str:
    def files(table, extra):
        names = [f for split in ("train", "test") for f, _ in table[split]]
        if len(names) > 3:
            names = [names[0], "...", *names[len(names) - 2:]]
        return ", ".join(names + list(extra))

    return (f"the python layout {root / spec.py_folder}/ ({files(spec.py_files, [spec.py_meta])}) "
            f"or the binary layout {root / spec.bin_folder}/ "
            f"({files(spec.bin_files, spec.bin_meta.values())})")


def _how_to_get(spec: _Spec, root: Path) -> str:
    return (f"To get it: run `nsl download {spec.name} {root}` or add --download to nsl train or nsl fewshot "
            f"train (fetches "
            f"{spec.url} and checks its published md5; from Python: `nsl.data.download.download({spec.name!r}, "
            f"{str(root)!r})`), or torchvision.datasets.{spec.torchvision}"
            f"({str(root)!r}, download=True), or download that archive by hand and extract it into "
            f"{root}.")


def _fail(spec: _Spec, root: Path, problem: str) -> DatasetError:
    return DatasetError(f"{spec.title}: {problem}. Expected {_layout_description(spec, root)}. "
                        f"{_how_to_get(spec, root)}")


def find_cifar(root: str | Path, name: str, layout: str = "auto") -> tuple[str, Path]:
    """Locate a CIFAR dataset folder.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (or another layout folder), or the layout
            folder itself.
        name: ``'cifar10'`` or ``'cifar100'``.
        layout: ``'auto'`` (python layout first, then binary), ``'python'`` or ``'binary'``.

    Returns:
        ``(layout, folder)`` with layout ``'python'`` or ``'binary'``.

    Raises:
        DatasetError: no folder of the requested layout exists.
    """
    spec = _spec(name)
    if layout not in ("auto", "python", "binary"):
        raise ValueError(f"layout must be 'auto', 'python' or 'binary', got {layout!r}")
    root = Path(root).expanduser()
    wanted = ("python", "binary") if layout == "auto" else (layout,)
    for kind in wanted:
        folder_name = spec.py_folder if kind == "python" else spec.bin_folder
        table = spec.py_files if kind == "python" else spec.bin_files
        if (root / folder_name).is_dir():
            return kind, root / folder_name
        # root may be the layout folder itself (possibly renamed): recognise it by its files.
        if root.is_dir() and (root.name == folder_name
                              or any((root / f).is_file() for s in table.values() for f, _ in s)):
            return kind, root
    where = root.parent if root.name in (spec.py_folder, spec.bin_folder) else root
    what = "" if layout == "auto" else f" in the {layout} layout"
    raise _fail(spec, where, f"not found{what} under {root}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals numpy needs to rebuild arrays."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load the global {module}.{name}: a CIFAR batch holds only numpy "
                "arrays, lists and strings")
        if module.startswith("numpy.core."):  # numpy >= 2 moved numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
            except (ImportError, AttributeError):
                pass
        return getattr(importlib.import_module(module), name)


def _unpickle(path: Path) -> dict:
    """Load one pickled CIFAR file (``encoding='bytes'``) with str keys; raises on any failure."""
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_python_file(spec: _Spec, folder: Path, fname: str, label: str):
    path = folder / fname
    if not path.is_file():
        raise _fail(spec, folder.parent, f"missing file {path} (python layout in {folder})")
    try:
        d = _unpickle(path)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a CIFAR batch
        raise _fail(spec, folder.parent, f"cannot read {path} (python layout): the file is truncated or "
                    f"corrupt ({type(e).__name__}: {e})") from e
    key = "labels" if spec.name == "cifar10" else f"{label}_labels"
    if "data" not in d or key not in d:
        raise _fail(spec, folder.parent, f"{path} (python layout) lacks the entries 'data' and {key!r} "
                    f"(found {sorted(map(str, d))})")
    data = d["data"]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != _PIXELS):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise _fail(spec, folder.parent, f"{path} (python layout): 'data' must be a uint8 array of shape "
                    f"[N, {_PIXELS}], found {dtype} {shape}")
    try:
        raw = np.asarray(d[key]).reshape(-1)
        labels = raw.astype(np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise _fail(spec, folder.parent, f"{path} (python layout): {key!r} is not a list of integers") from e
    if raw.dtype.kind not in "iub":  # floats (or objects) would be truncated to integers silently
        bad = raw[labels != raw] if raw.dtype.kind in "fc" else raw[:1]
        if raw.dtype.kind not in "fc" or len(bad):
            raise _fail(spec, folder.parent, f"{path} (python layout): {key!r} must hold integer class indices, "
                        f"found {raw.dtype} values such as {bad[0].item()!r}")
    return data, labels, path


def _read_binary_file(spec: _Spec, folder: Path, fname: str, label: str):
    path = folder / fname
    if not path.is_file():
        raise _fail(spec, folder.parent, f"missing file {path} (binary layout in {folder})")
    record = spec.label_bytes + _PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise _fail(spec, folder.parent, f"{path} (binary layout) has {raw.size} bytes, not a whole "
                    f"number of {record}-byte records: the file is truncated or corrupt")
    raw = raw.reshape(-1, record)
    col = 0 if spec.label_bytes == 1 or label == "coarse" else 1  # cifar-100 records: coarse, fine
    return raw[:, spec.label_bytes:], raw[:, col].astype(np.int64), path


def load_cifar(root: str | Path, name: str, split: str, label: str = "fine", *,
               layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 or CIFAR-100 split from the python or the binary layout under ``root``.

    Args:
        root: folder holding ``cifar-10-batches-py/``, ``cifar-10-batches-bin/``,
            ``cifar-100-python/`` or ``cifar-100-binary/``, or one of those folders itself.
        name: ``'cifar10'`` or ``'cifar100'``.
        split: ``'train'`` (50,000 images) or ``'test'`` (10,000 images).
        label: ``'fine'`` (CIFAR-10's only labels; CIFAR-100's 100 classes) or ``'coarse'``
            (CIFAR-100's 20 superclasses).
        layout: ``'auto'`` (python layout if present, else binary), ``'python'`` or ``'binary'``.

    Returns:
        ``(images, labels)``: images a uint8 tensor ``[N, 3, 32, 32]`` (RGB, 0..255), labels an
        int64 tensor ``[N]`` in ``0 .. num_classes - 1``, in the file order of the release.

    Raises:
        DatasetError: the folder or a file is missing, truncated or corrupt, or the image count or a
            label is out of range; the message says what was expected and how to get the data.
        ValueError: an unknown ``name``, ``split``, ``label`` or ``layout``.

    The python layout is read with pickle (``encoding='bytes'``) through a restricted unpickler that
    only rebuilds numpy arrays; it only opens files under the folder given.
    """
    spec = _spec(name)
    _check_split_label(spec, split, label)
    kind, folder = find_cifar(root, spec.name, layout)
    table = (spec.py_files if kind == "python" else spec.bin_files)[split]
    reader = _read_python_file if kind == "python" else _read_binary_file
    datas, labels = [], []
    for fname, expected in table:
        data, lab, path = reader(spec, folder, fname, label)
        if len(data) != expected or len(lab) != expected:
            raise _fail(spec, folder.parent, f"{path} ({kind} layout) holds {len(data)} images and "
                        f"{len(lab)} labels, expected {expected}: the file is truncated or not the "
                        "official split")
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= spec.num_classes[label]:
            raise _fail(spec, folder.parent, f"{path} ({kind} layout) has {label} labels in {lo}..{hi}, "
                        f"expected 0..{spec.num_classes[label] - 1}: the file is corrupt")
        datas.append(data)
        labels.append(lab)
    data = np.concatenate(datas) if len(datas) > 1 else np.array(datas[0])  # own, writable copy
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels))


def cifar_class_names(root: str | Path, name: str, label: str = "fine", *, layout: str = "auto") -> list[str]:
    """Class names of a CIFAR dataset, read from the layout's metadata file.

    Reads ``batches.meta`` (``label_names``) / ``meta`` (``fine_label_names``,
    ``coarse_label_names``) in the python layout, ``batches.meta.txt`` /
    ``fine_label_names.txt`` / ``coarse_label_names.txt`` in the binary layout. Where the metadata
    file is absent the official names are returned (:data:`CIFAR10_CLASSES`,
    :data:`CIFAR100_FINE_CLASSES`, :data:`CIFAR100_COARSE_CLASSES`).

    Returns:
        a list of ``num_classes`` strings; index ``i`` names label ``i``.

    Raises:
        DatasetError: the dataset folder is missing, or the metadata file is corrupt or lists the
            wrong number of classes.
    """
    spec = _spec(name)
    if label not in spec.num_classes:
        raise ValueError(f"{spec.title} has labels {sorted(spec.num_classes)}, got label={label!r}")
    kind, folder = find_cifar(root, spec.name, layout)
    official = {("cifar10", "fine"): CIFAR10_CLASSES, ("cifar100", "fine"): CIFAR100_FINE_CLASSES,
                ("cifar100", "coarse"): CIFAR100_COARSE_CLASSES}[spec.name, label]
    n = spec.num_classes[label]
    if kind == "python":
        path = folder / spec.py_meta
        if not path.is_file():
            return list(official)
        key = "label_names" if spec.name == "cifar10" else f"{label}_label_names"
        try:
            names = _unpickle(path)[key]
            names = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in names]
        except Exception as e:  # noqa: BLE001
            raise _fail(spec, folder.parent, f"cannot read the class names {key!r} from {path} "
                        f"({type(e).__name__}: {e})") from e
    else:
        path = folder / spec.bin_meta[label]
        if not path.is_file():
            return list(official)
        try:
            names = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise _fail(spec, folder.parent, f"cannot read the class names from {path} ({e})") from e
    if len(names) != n:
        raise _fail(spec, folder.parent, f"{path} lists {len(names)} class names, expected {n}")
    return names
