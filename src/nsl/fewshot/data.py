"""Episodic (few-shot) datasets: CIFAR-FS, FC100, Omniglot and mini-ImageNet.

Every loader returns a :class:`FewShotDataset`: all images of one split as a single uint8 tensor
``[N, C, H, W]``, int64 labels ``[N]`` numbering the split's classes ``0 .. n_classes-1``, and the
class names. Sample episodes from it with :class:`nsl.fewshot.EpisodeSampler` and build them with
:func:`nsl.fewshot.make_episode`.

Splits (``train`` / ``val`` / ``test``; classes never overlap between splits):

* ``cifar-fs`` (Bertinetto et al., 2019): 64 / 16 / 20 CIFAR-100 fine classes, by name.
* ``fc100`` (Oreshkin et al., 2018): 12 / 4 / 4 CIFAR-100 superclasses = 60 / 20 / 20 fine classes.
  For both, every image of a class (the CIFAR-100 train and test halves) belongs to the class's
  split: 600 images per class. The split definitions ship with the package (``splits/*.json``).
  ``root`` is the folder :func:`nsl.data.cifar.load_cifar` reads (holding ``cifar-100-python/`` or
  ``cifar-100-binary/``).
* ``omniglot`` (Lake et al., 2015): characters are classes (20 drawings each), resized to 28 x 28.
  ``train`` = the first 800 characters of ``images_background`` (sorted order), ``val`` = its
  remaining 164, ``test`` = all 659 characters of ``images_evaluation``; ``background`` and
  ``evaluation`` give the whole sets. ``rotations=True`` adds the 90/180/270-degree rotations of
  every character as new classes (x4 classes, Vinyals et al., 2016).
* ``mini-imagenet`` (Vinyals et al., 2016; Ravi & Larochelle split): 64 / 16 / 20 classes of 600
  images, resized to 84 x 84.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nsl.data.cifar import cifar_class_names, load_cifar
from nsl.data.errors import DatasetError

from .sampler import EpisodeSampler

if TYPE_CHECKING:  # Pillow is imported where images are decoded, not when nsl starts
    from PIL import Image

__all__ = [
    "FEWSHOT_DATASETS",
    "FewShotDataset",
    "OMNIGLOT_TRAIN_CHARACTERS",
    "get_fewshot_dataset",
    "load_cifar_fs",
    "load_fc100",
    "load_mini_imagenet",
    "load_omniglot",
    "load_split_definition",
    "with_rotations",
]

SPLITS = ("train", "val", "test")

#: Omniglot ``train`` = this many leading background characters (sorted); ``val`` = the rest (164).
OMNIGLOT_TRAIN_CHARACTERS = 800


@dataclass
class FewShotDataset:
    """All images of one split of an episodic dataset, held in memory.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (``C`` = 3 for colour, 1 for Omniglot).
        labels: int64 ``[N]``, class of each image, ``0 .. n_classes-1`` within the split.
        class_names: ``n_classes`` names; ``class_names[k]`` names label ``k``.
        name: dataset name (``"cifar-fs"``, ``"fc100"``, ``"omniglot"``, ``"mini-imagenet"``).
        split: split name (``"train"``, ``"val"``, ``"test"``, ...).
        superclasses: for FC100, the CIFAR-100 coarse label of each class (``n_classes`` ints);
            otherwise ``None``.

    Indexing ``ds[i]`` gives ``(image uint8 [C, H, W], label int)`` like a torchvision dataset.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str
    split: str
    superclasses: list[int] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        n = len(self.class_names)
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= n):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")

    @property
    def n_classes(self) -> int:
        """Number of classes in the split."""
        return len(self.class_names)

    def __len__(self) -> int:
        """Number of images ``N``."""
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(image uint8 [C, H, W], label int)`` of image ``i``."""
        return self.images[i], int(self.labels[i])

    def to(self, device: torch.device | str) -> FewShotDataset:
        """A copy whose ``images`` and ``labels`` live on ``device`` (for on-device episodes)."""
        return FewShotDataset(self.images.to(device), self.labels.to(device), list(self.class_names),
                              self.name, self.split,
                              None if self.superclasses is None else list(self.superclasses))

    def sampler(self, n_way: int, k_shot: int, n_query: int, n_episodes: int,
                seed: int = 0) -> EpisodeSampler:
        """An :class:`~nsl.fewshot.EpisodeSampler` over this split's labels."""
        return EpisodeSampler(self.labels, n_way, k_shot, n_query, n_episodes, seed)

    def __repr__(self) -> str:
        return (f"FewShotDataset({self.name!r}, split={self.split!r}, images={tuple(self.images.shape)}, "
                f"n_classes={self.n_classes})")


def _check_split(dataset: str, split: str, valid: Sequence[str]) -> str:
    if split not in valid:
        raise ValueError(f"unknown split {split!r} for {dataset}; valid splits: {', '.join(valid)}")
    return split


def load_split_definition(name: str) -> dict:
    """The packaged split definition ``{"train": [...], "val": [...], "test": [...]}``.

    ``name`` is ``"cifar_fs"`` (fine class names, strings) or ``"fc100"`` (CIFAR-100 coarse label
    indices, integers in 0..19). Read from ``nsl/fewshot/splits/<name>_split.json`` via
    :mod:`importlib.resources` and checked: every split present, a non-empty list of distinct entries
    of the right type, no class in two splits.

    Raises:
        ValueError: unknown ``name``. DatasetError: the file is missing, not JSON, or not such a
            definition (the message names the file and says to reinstall).
    """
    if name not in ("cifar_fs", "fc100"):
        raise ValueError(f"unknown split definition {name!r}; valid: cifar_fs, fc100")
    path = resources.files("nsl.fewshot").joinpath("splits", f"{name}_split.json")
    fix = "reinstall nsl (pip install --force-reinstall nsl, or git checkout the file in a source checkout)"
    try:
        definition = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"the few-shot split file {path} is missing from the installed package; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"the few-shot split file {path} cannot be read: {e}; {fix}") from None
    kind, check = (str, lambda v: True) if name == "cifar_fs" else (int, lambda v: 0 <= v < 20)
    if not isinstance(definition, dict):
        raise DatasetError(f"the few-shot split file {path} holds {type(definition).__name__}, expected a JSON "
                           f"object with the splits {', '.join(SPLITS)}; {fix}")
    seen: dict = {}
    for split in SPLITS:
        entries = definition.get(split)
        what = "class names" if kind is str else "CIFAR-100 coarse labels (0-19)"
        if (not isinstance(entries, list) or not entries
                or not all(type(v) is kind and check(v) for v in entries) or len(set(entries)) != len(entries)):
            raise DatasetError(f"the few-shot split file {path}: split {split!r} must be a non-empty list of "
                               f"distinct {what}, got {json.dumps(entries)[:80]}; {fix}")
        for v in entries:
            if v in seen:
                raise DatasetError(f"the few-shot split file {path}: {v!r} is in both {seen[v]!r} and {split!r}; "
                                   f"{fix}")
            seen[v] = split
    return definition


def _cifar100_all(root: str | os.PathLike, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 train + test halves concatenated: uint8 [60000, 3, 32, 32], int64 [60000]."""
    x_tr, y_tr = load_cifar(root, "cifar100", "train", label=label)
    x_te, y_te = load_cifar(root, "cifar100", "test", label=label)
    return torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])


def _select_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label is in ``classes`` (dataset order) relabelled to their position in it."""
    lut = torch.full((max(int(labels.max()), *classes) + 1,), -1, dtype=torch.long)
    lut[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    new = lut[labels]
    keep = new >= 0
    return images[keep].contiguous(), new[keep].contiguous()


def load_cifar_fs(root: str | os.PathLike, split: str) -> FewShotDataset:
    """CIFAR-FS (Bertinetto et al., ICLR 2019) from CIFAR-100: 64 / 16 / 20 fine classes.

    Args:
        root: folder holding ``cifar-100-python/`` or ``cifar-100-binary/`` (read by
            :func:`nsl.data.cifar.load_cifar`).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        :class:`FewShotDataset` with images uint8 ``[600 * n_classes, 3, 32, 32]`` (the train and
        test halves of every class), labels int64 in ``0..n_classes-1`` in the order of the split
        definition, which also gives ``class_names``.

    Raises:
        ValueError: unknown split. DatasetError: CIFAR-100 missing or malformed.
    """
    _check_split("cifar-fs", split, SPLITS)
    names = load_split_definition("cifar_fs")[split]
    lookup = {n: i for i, n in enumerate(cifar_class_names(root, "cifar100", "fine"))}
    unknown = [n for n in names if n not in lookup]
    if unknown:
        raise DatasetError(f"the CIFAR-FS split names classes this CIFAR-100 does not have: {unknown}")
    images, fine = _cifar100_all(root, "fine")
    x, y = _select_classes(images, fine, [lookup[n] for n in names])
    return FewShotDataset(x, y, list(names), "cifar-fs", split)


def load_fc100(root: str | os.PathLike, split: str) -> FewShotDataset:
    """FC100 (Oreshkin et al., NeurIPS 2018) from CIFAR-100: 12 / 4 / 4 superclasses.

    Each superclass brings its 5 fine classes with all 600 images each: 60 / 20 / 20 classes.

    Args:
        root: folder holding ``cifar-100-python/`` or ``cifar-100-binary/`` (read by
            :func:`nsl.data.cifar.load_cifar`).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        :class:`FewShotDataset` with images uint8 ``[600 * n_classes, 3, 32, 32]``; the classes are
        the fine classes ordered by (position of their superclass in the split definition, fine
        label); ``class_names`` are fine names and ``superclasses`` their coarse labels.

    Raises:
        ValueError: unknown split. DatasetError: CIFAR-100 missing or malformed.
    """
    _check_split("fc100", split, SPLITS)
    coarse_ids = load_split_definition("fc100")[split]
    images, fine = _cifar100_all(root, "fine")
    _, coarse = _cifar100_all(root, "coarse")
    pairs = torch.unique(torch.stack([fine, coarse], 1), dim=0)  # (fine, coarse) per fine class
    fine_to_coarse = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), strict=True))
    if len(fine_to_coarse) != len(pairs):
        raise DatasetError("CIFAR-100 fine labels map to more than one coarse label; the data are corrupt")
    classes = [f for c in coarse_ids for f in sorted(k for k, v in fine_to_coarse.items() if v == c)]
    x, y = _select_classes(images, fine, classes)
    fine_names = cifar_class_names(root, "cifar100", "fine")
    return FewShotDataset(x, y, [fine_names[f] for f in classes], "fc100", split,
                          superclasses=[fine_to_coarse[f] for f in classes])


# --------------------------------------------------------------------------------------- image folders

def _workers(num_workers: int | None) -> int:
    return max(1, min(8, os.cpu_count() or 1)) if num_workers is None else max(1, int(num_workers))


def _read_images(paths: Sequence[Path], convert: Callable[[Image.Image], Image.Image],
                 num_workers: int | None) -> torch.Tensor:
    """Decode ``paths`` with ``convert`` (to a fixed mode and size): uint8 ``[N, C, H, W]``."""
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                a = np.asarray(convert(im))
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # channel-first view

    if not paths:
        raise DatasetError("no images to read")
    first = one(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)  # filled in place: no second copy
    out[0] = first

    def fill(i: int) -> None:
        a = one(paths[i])
        if a.shape != first.shape:
            raise DatasetError(f"{paths[i]} decodes to shape {a.shape}, {paths[0]} to {first.shape}; "
                               "pass image_size to resize the images to one size")
        out[i] = a

    n = _workers(num_workers)
    if n == 1 or len(paths) < 64:
        for i in range(1, len(paths)):
            fill(i)
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(fill, range(1, len(paths)), chunksize=64))
    return torch.from_numpy(out)


def _resizer(mode: str, image_size: int | None) -> Callable[[Image.Image], Image.Image]:
    from PIL import Image

    def convert(im: Image.Image) -> Image.Image:
        im = im.convert(mode)
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return im

    return convert


# --------------------------------------------------------------------------------------------- Omniglot

_OMNIGLOT_LAYOUT = (
    "expected {where}/images_{split}/ holding either one folder per character with its PNG drawings "
    "(cNNNN/NN.png, as shared/data/materialize.py writes) or the official tree "
    "<Alphabet>/characterNN/*.png (from images_{split}.zip of github.com/brendenlake/omniglot); "
    "root may be that folder or its parent holding omniglot/ or omniglot-py/. To get it: run `nsl download "
    "omniglot {where}` or add --download to nsl fewshot train")


def _omniglot_dir(root: Path, subset: str) -> Path:
    for base in (root, root / "omniglot", root / "omniglot-py"):
        if (base / f"images_{subset}").is_dir():
            return base / f"images_{subset}"
    raise DatasetError(f"Omniglot images_{subset} not found under {root}: "
                       + _OMNIGLOT_LAYOUT.format(where=root, split=subset))


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _omniglot_characters(folder: Path) -> list[tuple[str, list[Path]]]:
    """``(class name, sorted PNG paths)`` per character, in sorted (alphabet, character) order."""
    chars: list[tuple[str, list[Path]]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        pngs = _pngs(sub)
        if pngs:  # flat layout: sub is a character
            chars.append((sub.name, pngs))
            continue
        for char in sorted(p for p in sub.iterdir() if p.is_dir()):  # official: sub is an alphabet
            pngs = _pngs(char)
            if pngs:
                chars.append((f"{sub.name}/{char.name}", pngs))
    if not chars:
        raise DatasetError(f"no Omniglot character folders with PNG files in {folder}: "
                           + _OMNIGLOT_LAYOUT.format(where=folder.parent, split=folder.name[7:]))
    return chars


def with_rotations(dataset: FewShotDataset) -> FewShotDataset:
    """Rotation class augmentation: every class and its 90/180/270-degree rotations as 4 classes.

    Args:
        dataset: a :class:`FewShotDataset` with square images ``[N, C, S, S]``.

    Returns:
        A new dataset with images uint8 ``[4 N, C, S, S]`` (the four rotations, counter-clockwise, as
        consecutive blocks of ``N``) and ``4 * n_classes`` classes: label ``4 k + r`` is class ``k``
        rotated by ``90 r`` degrees, named ``"<name>@rot<90 r>"``.
    """
    x = dataset.images
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation augmentation needs square images, got {tuple(x.shape[-2:])}")
    images = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    labels = torch.cat([dataset.labels * 4 + r for r in range(4)])
    names = [f"{n}@rot{90 * r}" for n in dataset.class_names for r in range(4)]
    return FewShotDataset(images.contiguous(), labels, names, dataset.name, dataset.split)


def load_omniglot(root: str | os.PathLike, split: str, rotations: bool = False, image_size: int | None = 28,
                  num_workers: int | None = None) -> FewShotDataset:
    """Omniglot (Lake et al., 2015) with characters as classes.

    Args:
        root: folder holding ``images_background/`` and/or ``images_evaluation/`` (or its parent,
            holding ``omniglot/`` or ``omniglot-py/``). Each set is either one folder per character
            (``cNNNN/NN.png``) or the official ``<Alphabet>/characterNN/*.png`` tree; characters are
            taken in sorted (alphabet, character) order, drawings in sorted file order.
        split: ``"train"`` (first :data:`OMNIGLOT_TRAIN_CHARACTERS` = 800 background characters),
            ``"val"`` (the other 164 background characters), ``"test"`` (all evaluation characters),
            or ``"background"`` / ``"evaluation"`` (whole sets).
        rotations: add the 90/180/270-degree rotations as new classes (see :func:`with_rotations`).
        image_size: side of the square output images (PIL LANCZOS resize); ``None`` keeps 105.
        num_workers: decoding threads (default ``min(8, cpu_count)``).

    Returns:
        :class:`FewShotDataset` with images uint8 ``[N, 1, image_size, image_size]`` (255 = white
        paper, as stored), labels int64 ``[N]``; class names ``"cNNNN"`` or
        ``"<Alphabet>/characterNN"`` (with ``"@rot<deg>"`` when ``rotations``).

    Raises:
        ValueError: unknown split. DatasetError: folder missing or holding no characters.
    """
    _check_split("omniglot", split, (*SPLITS, "background", "evaluation"))
    subset = "evaluation" if split in ("test", "evaluation") else "background"
    chars = _omniglot_characters(_omniglot_dir(Path(root), subset))
    if split == "train":
        chars = chars[:OMNIGLOT_TRAIN_CHARACTERS]
    elif split == "val":
        chars = chars[OMNIGLOT_TRAIN_CHARACTERS:]
        if not chars:
            raise DatasetError(f"Omniglot images_background has no more than {OMNIGLOT_TRAIN_CHARACTERS} "
                               "characters, so the val split (the characters after them) is empty")
    paths = [p for _, ps in chars for p in ps]
    labels = torch.repeat_interleave(torch.arange(len(chars)), torch.tensor([len(ps) for _, ps in chars]))
    images = _read_images(paths, _resizer("L", image_size), num_workers)
    ds = FewShotDataset(images, labels, [n for n, _ in chars], "omniglot", split)
    return with_rotations(ds) if rotations else ds


# ---------------------------------------------------------------------------------------- mini-ImageNet

_MINI_LAYOUT = (
    "expected the Ravi & Larochelle layout: {where}/{{train,val,test}}.csv (header 'filename,label', "
    "label = WordNet id) and {where}/images/ holding the listed files (or images/<label>/<file>); "
    "root may also be the parent of a mini-imagenet/ or miniImageNet/ folder")
_MINI_DIRS = ("", "mini-imagenet", "miniImageNet", "mini_imagenet", "miniimagenet")


def _mini_dir(root: Path, split: str) -> Path:
    for sub in _MINI_DIRS:
        base = root / sub if sub else root
        if (base / f"{split}.csv").is_file():
            return base
    raise DatasetError(f"mini-ImageNet {split}.csv not found under {root}: "
                       + _MINI_LAYOUT.format(where=root))


def load_mini_imagenet(root: str | os.PathLike, split: str, image_size: int | None = 84,
                       num_workers: int | None = None) -> FewShotDataset:
    """mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle split.

    Args:
        root: folder holding ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``)
            and ``images/`` (or the parent of ``mini-imagenet/`` / ``miniImageNet/``).
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        image_size: side of the square RGB output images (PIL LANCZOS resize where the file differs);
            ``None`` keeps the files' size (they must then all agree).
        num_workers: decoding threads (default ``min(8, cpu_count)``).

    Returns:
        :class:`FewShotDataset` with images uint8 ``[N, 3, image_size, image_size]`` in CSV row order,
        labels int64 ``[N]`` numbering the sorted distinct CSV labels, which are the class names.

    Raises:
        ValueError: unknown split. DatasetError: CSV or images missing, or a malformed CSV.
    """
    _check_split("mini-imagenet", split, SPLITS)
    base = _mini_dir(Path(root), split)
    csv_path = base / f"{split}.csv"
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (getattr(e, "strerror", None) or str(e))
        raise DatasetError(f"cannot read {csv_path}: {reason}; " + _MINI_LAYOUT.format(where=base)) from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DatasetError(f"{csv_path}: the first line must be the header 'filename,label', got "
                           f"{rows[0] if rows else 'an empty file'}; " + _MINI_LAYOUT.format(where=base))
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != 2]
    if bad:
        raise DatasetError(f"{csv_path}: line {bad[0]} does not have two fields (filename,label)")
    rows = [(r[0].strip(), r[1].strip()) for r in rows[1:]]
    if not rows:
        raise DatasetError(f"{csv_path} lists no images")
    image_dir = base / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"mini-ImageNet image folder {image_dir} not found: "
                           + _MINI_LAYOUT.format(where=base))
    paths, missing = [], []
    for name, label in rows:
        p = image_dir / name
        if not p.is_file():
            p = image_dir / label / name
            if not p.is_file():
                missing.append(name)
        paths.append(p)
    if missing:
        raise DatasetError(f"{len(missing)} images listed in {csv_path} are missing from {image_dir} "
                           f"(first: {missing[0]}); " + _MINI_LAYOUT.format(where=base))
    class_names = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[label] for _, label in rows], dtype=torch.long)
    images = _read_images(paths, _resizer("RGB", image_size), num_workers)
    return FewShotDataset(images, labels, class_names, "mini-imagenet", split)


# ------------------------------------------------------------------------------------------------ registry

#: name -> loader ``(root, split, **kwargs) -> FewShotDataset``.
FEWSHOT_DATASETS: dict[str, Callable[..., FewShotDataset]] = {
    "cifar-fs": load_cifar_fs,
    "fc100": load_fc100,
    "mini-imagenet": load_mini_imagenet,
    "omniglot": load_omniglot,
}


def get_fewshot_dataset(name: str, root: str | os.PathLike, split: str, **kwargs) -> FewShotDataset:
    """Load split ``split`` of the episodic dataset ``name`` from ``root``.

    Args:
        name: ``"cifar-fs"``, ``"fc100"``, ``"omniglot"`` or ``"mini-imagenet"`` (case-insensitive,
            ``_`` accepted for ``-``).
        root: data folder (see the loader of each dataset).
        split: ``"train"``, ``"val"`` or ``"test"`` (Omniglot also ``"background"``, ``"evaluation"``).
        **kwargs: passed to the loader (e.g. ``rotations=True``, ``image_size=...`` for Omniglot).

    Returns:
        :class:`FewShotDataset`: uint8 images ``[N, C, H, W]``, int64 labels ``[N]``, class names.

    Raises:
        ValueError: unknown name or split (the message lists the valid ones).
        DatasetError: the files are missing (the message names the expected layout).
    """
    key = str(name).lower().replace("_", "-")
    if key not in FEWSHOT_DATASETS:
        raise ValueError(f"unknown few-shot dataset {name!r}; valid names: {', '.join(FEWSHOT_DATASETS)}")
    return FEWSHOT_DATASETS[key](root, split, **kwargs)
