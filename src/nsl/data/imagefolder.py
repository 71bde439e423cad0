"""ImageNet-style image folders (``root/<class>/<image>``) decoded with PIL in DataLoader workers.

Only torch and Pillow are used (torchvision is not a dependency): the transforms below reproduce
torchvision's standard ones (``RandomResizedCrop``, ``RandomHorizontalFlip``, ``Resize``,
``CenterCrop``, ``ToTensor``, ``Normalize``). Their randomness comes from ``torch``'s global
generator, which the DataLoader seeds differently in every worker (and reproducibly when the
loader is given a seeded ``generator``, as :func:`imagefolder_loader` does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import DatasetError

if TYPE_CHECKING:  # Pillow is imported where images are decoded, not when nsl starts
    from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "CenterCrop",
    "Compose",
    "ImageFolder",
    "Normalize",
    "PILToTensor",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ToTensor",
    "eval_transform",
    "imagefolder_loader",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR (Pillow < 9.1: Image.BILINEAR, the same value)
_FLIP_LR = 0  # PIL.Image.Transpose.FLIP_LEFT_RIGHT (Pillow < 9.1: Image.FLIP_LEFT_RIGHT)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Compose:
    """Apply transforms in sequence."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomResizedCrop:
    """Crop a random area (``scale`` of the image) of random aspect ratio, resize it to ``size``.

    PIL image in, PIL image ``size`` (``int`` for square or ``(h, w)``) out; torchvision's algorithm
    (10 tries, then a center crop of the clamped aspect ratio).
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation=_BILINEAR):
        self.size, self.scale, self.ratio, self.interpolation = _pair(size), scale, ratio, interpolation

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Return ``(top, left, h, w)`` of the crop for an image of ``width x height``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(self.scale[0], self.scale[1]))
            aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(*img.size)
        box = (left, top, left + w, top + h)
        return img.resize((self.size[1], self.size[0]), self.interpolation, box=box)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror a PIL image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(1)) < self.p:
            return img.transpose(_FLIP_LR)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize a PIL image: an ``int`` sets the shorter side (aspect kept), ``(h, w)`` the exact size."""

    def __init__(self, size, interpolation=_BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            if w <= h:
                nw, nh = self.size, max(1, int(self.size * h / w))
            else:
                nw, nh = max(1, int(self.size * w / h)), self.size
        else:
            nh, nw = _pair(self.size)
        if (nw, nh) == (w, h):
            return img
        return img.resize((nw, nh), self.interpolation)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Crop the center ``size`` (``int`` or ``(h, w)``) of a PIL image, zero-padding a smaller one."""

    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        th, tw = self.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class PILToTensor:
    """PIL image -> uint8 tensor ``[C, H, W]`` (0..255)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.array(img, dtype=np.uint8)  # a writable copy
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "PILToTensor()"


class ToTensor(PILToTensor):
    """PIL image -> float32 tensor ``[C, H, W]`` in 0..1."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return super().__call__(img).float().div_(255.0)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(x - mean) / std`` per channel on a float tensor ``[C, H, W]`` (0..1 units)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def train_transform(size: int = 224, mean: Sequence[float] | None = IMAGENET_MEAN,
                    std: Sequence[float] | None = IMAGENET_STD, scale=(0.08, 1.0)) -> Compose:
    """Standard training transform: random resized crop to ``size``, random flip, tensor, normalise.

    Returns a callable PIL image -> float32 ``[C, size, size]`` (normalised with ``mean``/``std``;
    0..1 when they are None).
    """
    ts = [RandomResizedCrop(size, scale=scale), RandomHorizontalFlip(), ToTensor()]
    if mean is not None and std is not None:
        ts.append(Normalize(mean, std))
    return Compose(ts)


def eval_transform(size: int = 224, resize: int | None = None, mean: Sequence[float] | None = IMAGENET_MEAN,
                   std: Sequence[float] | None = IMAGENET_STD) -> Compose:
    """Standard evaluation transform: resize the shorter side to ``resize`` (default
    ``round(size / 0.875)``, i.e. 256 for 224), center crop ``size``, tensor, normalise.

    Returns a callable PIL image -> float32 ``[C, size, size]``.
    """
    resize = int(round(size / 0.875)) if resize is None else resize
    ts = [Resize(resize), CenterCrop(size), ToTensor()]
    if mean is not None and std is not None:
        ts.append(Normalize(mean, std))
    return Compose(ts)


def class_folders(root: str | Path) -> list[str]:
    """The class names of an image folder tree: its subfolders in sorted order, hidden ones skipped
    (label ``i`` is ``class_folders(root)[i]``)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolder(torch.utils.data.Dataset):
    """A folder of class subfolders of images: ``root/<class name>/**/<image>``.

    Args:
        root: the tree's root. Classes are its subfolders in sorted order (hidden ones skipped);
            images are found recursively, sorted by path, by file extension (``extensions``).
        transform: callable applied to the decoded PIL image; default :class:`PILToTensor`.
        extensions: accepted file extensions (lower case, with the dot).
        mode: PIL mode the images are converted to (``'RGB'``: 3 channels, ``'L'``: grayscale).
        allow_empty: accept class folders without images (default: an error).

    Indexing returns ``(transform(image), label int)``; ``samples`` lists ``(path, label)``,
    ``classes`` the class names and ``targets`` the labels.

    Raises:
        DatasetError: ``root`` is missing or not a folder, holds no class folders, or a class
            folder holds no image; reading a sample raises it for an unreadable image.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, mode: str = "RGB", allow_empty: bool = False):
        self.root = Path(root).expanduser()
        layout = (f"expected an image folder tree {self.root}/<class name>/<image>{{"
                  f"{','.join(extensions)}}}, one subfolder per class (ImageNet's train/ and val/ layout)")
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a folder: {layout}")
        self.classes = class_folders(self.root)
        if not self.classes:
            raise DatasetError(f"image folder {self.root} holds no class subfolders: {layout}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        ext = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        empty = []
        for c in self.classes:
            files = []
            for dirpath, dirnames, filenames in os.walk(self.root / c, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                files.extend(os.path.join(dirpath, f) for f in filenames
                             if f.lower().endswith(ext) and not f.startswith("."))
            if not files:
                empty.append(c)
            self.samples.extend((f, self.class_to_idx[c]) for f in sorted(files))
        if not self.samples:
            raise DatasetError(f"image folder {self.root} has {len(self.classes)} class folders but no "
                               f"images in them: {layout}")
        if empty and not allow_empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise DatasetError(f"image folder {self.root}: {len(empty)} class folder(s) hold no image "
                               f"({shown}): {layout} (pass allow_empty=True to accept them)")
        self.targets = [y for _, y in self.samples]
        self.transform = transform if transform is not None else PILToTensor()
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` as a PIL image in ``mode`` (no transform)."""
        from PIL import Image, UnidentifiedImageError

        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                return im.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(f"cannot decode image {path} ({type(e).__name__}: {e})") from e

    def __getitem__(self, index: int):
        return self.transform(self.load(index)), self.samples[index][1]


def imagefolder_loader(root: str | Path, batch_size: int, *, train: bool, image_size: int = 224,
                       resize: int | None = None, mean: Sequence[float] | None = IMAGENET_MEAN,
                       std: Sequence[float] | None = IMAGENET_STD, num_workers: int = 4, seed: int = 0,
                       drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, persistent_workers: bool = False,
                       prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over an :class:`ImageFolder` with the standard transforms.

    Args:
        root: the image folder tree (``root/<class>/<image>``).
        batch_size: images per batch (per rank).
        train: training (shuffled, :func:`train_transform`, drop_last) or evaluation (in order,
            :func:`eval_transform`).
        image_size, resize, mean, std: transform settings (see :func:`train_transform`,
            :func:`eval_transform`).
        num_workers: decoding worker processes (0 decodes in the main process).
        seed: seeds the shuffling and the workers' augmentation generators.
        drop_last: default ``train``.
        rank, world_size: data-parallel shard (a :class:`~torch.utils.data.DistributedSampler`;
            call ``loader.sampler.set_epoch(epoch)`` each epoch).

    Returns:
        a DataLoader yielding ``(images float32 [B, 3, image_size, image_size], labels int64 [B])``.

    Raises:
        DatasetError: the folder is not an image folder tree, or with ``drop_last`` it holds fewer images
            (per process) than one batch, so that an epoch would yield nothing.
    """
    tf = (train_transform(image_size, mean, std) if train else eval_transform(image_size, resize, mean, std))
    dataset = ImageFolder(root, transform=tf)
    g = torch.Generator()
    g.manual_seed(seed)
    sampler = None
    shuffle = train
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                      shuffle=train, seed=seed, drop_last=train)
        shuffle = False
    kw = {}
    if num_workers > 0:
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    drop_last = train if drop_last is None else drop_last
    per_rank = len(dataset) // world_size
    if drop_last and per_rank < batch_size:
        raise DatasetError(f"image folder {dataset.root} has {len(dataset)} images"
                           + (f" ({per_rank} per process of {world_size})" if world_size > 1 else "")
                           + f", fewer than one batch of {batch_size}: training drops incomplete batches, so an "
                           "epoch would have no batch; lower batch_size or add images")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=num_workers, drop_last=drop_last, generator=g,
                                       pin_memory=pin_memory, **kw)
