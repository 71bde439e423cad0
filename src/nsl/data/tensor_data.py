"""Small image datasets held as one uint8 tensor on the training device, and a batch iterator.

:class:`TensorImageDataset` keeps a whole dataset (CIFAR: 150 MiB) as one uint8 tensor
``[N, C, H, W]``, on the CPU or on the accelerator. :class:`GPULoader` cuts it into shuffled
batches and augments them without a Python loop over images: each batch is gathered straight from
the dataset tensor with one advanced-indexing operation whose row and column indices encode each
sample's crop offset and flip (:func:`random_crop_flip`), then converted to float. It works on any
device (CPU included) and its randomness comes from CPU ``torch.Generator`` objects, so a seed gives
the same batches on every device.

Resumption: :meth:`GPULoader.state_dict` holds the epoch, the number of batches already produced
in it and the augmentation generator's state; :meth:`GPULoader.load_state_dict` restores them, and
the restored loader produces exactly the batches the original would have produced next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

__all__ = ["GPULoader", "TensorImageDataset", "crop_flip_indices", "random_crop_flip"]

_MASK64 = (1 << 63) - 1


class TensorImageDataset(torch.utils.data.Dataset):
    """An image classification dataset living in two tensors.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: integer ``[N]`` (stored as int64).
        classes: optional class names; ``classes[i]`` names label ``i``.
        name: optional dataset name (for messages and metadata).

    Indexing returns ``(image uint8 [C, H, W], label int64 [])`` so the dataset also works with a
    plain :class:`torch.utils.data.DataLoader`; for speed use :class:`GPULoader`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None,
                 name: str | None = None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W], got "
                             f"{getattr(images, 'dtype', type(images).__name__)} "
                             f"{list(getattr(images, 'shape', []))}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor [{len(images)}], got {labels.dtype} "
                             f"{list(labels.shape)}")
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.classes = list(classes) if classes is not None else None
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (f"TensorImageDataset(name={self.name!r}, images={list(self.images.shape)} uint8, "
                f"num_classes={self.num_classes}, device={self.device})")

    @property
    def device(self) -> torch.device:
        """The device both tensors live on."""
        return self.images.device

    @property
    def num_classes(self) -> int:
        """``len(classes)`` if class names are known, else ``max(label) + 1``."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TensorImageDataset:
        """A copy of the dataset on ``device`` (the same object if it is already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return TensorImageDataset(self.images.to(device, non_blocking=non_blocking),
                                  self.labels.to(device, non_blocking=non_blocking), self.classes, self.name)

    def subset(self, index: torch.Tensor | Sequence[int]) -> TensorImageDataset:
        """The samples at ``index`` (int64 indices or bool mask) as a new dataset."""
        index = torch.as_tensor(index, device=self.images.device)
        return TensorImageDataset(self.images[index], self.labels[index], self.classes, self.name)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (population) standard deviation in 0..1 units (pixel / 255).

        Computed exactly from per-channel histograms of the 256 pixel values, so the result does not
        depend on the device or on summation order.

        Returns:
            ``(mean, std)``, each a tuple of ``C`` floats.
        """
        c = self.images.shape[1]
        hist = torch.stack([torch.bincount(self.images[:, k].reshape(-1), minlength=256) for k in range(c)])
        hist = hist.cpu().double()  # [C, 256]
        v = torch.arange(256, dtype=torch.float64) / 255.0
        n = hist.sum(1).clamp_min(1)
        mean = (hist * v).sum(1) / n
        var = (hist * v.square()).sum(1) / n - mean.square()
        return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().tolist())


def crop_flip_indices(offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor, height: int,
                      width: int, padding: int, padding_mode: str = "zeros"):
    """Source row and column indices for padded random crops with optional horizontal flips.

    Sample ``b`` of the result is the ``height x width`` window at ``(offsets_y[b], offsets_x[b])``
    of its image padded by ``padding`` on every side, mirrored left-right when ``flips[b]``.

    Args:
        offsets_y, offsets_x: int64 ``[B]`` in ``0 .. 2 * padding``.
        flips: bool ``[B]``.
        height, width: image size ``H, W``.
        padding: padding on each side (``< H`` and ``< W`` for ``'reflect'``).
        padding_mode: ``'zeros'`` (zero padding), ``'reflect'`` (mirror without repeating the edge,
            like ``torch.nn.functional.pad(mode='reflect')``) or ``'replicate'`` (repeat the edge).

    Returns:
        ``(rows, cols, valid)``: rows int64 ``[B, H]`` and cols int64 ``[B, W]`` index the unpadded
        image; ``valid`` is None, or (zero padding) a bool ``[B, 1, H, W]`` mask that is False where
        the window falls on padding.
    """
    if padding_mode not in ("zeros", "reflect", "replicate"):
        raise ValueError(f"padding_mode must be 'zeros', 'reflect' or 'replicate', got {padding_mode!r}")
    device = offsets_y.device
    ar_h = torch.arange(height, device=device)
    ar_w = torch.arange(width, device=device)
    rows = offsets_y[:, None] + ar_h - padding  # [B, H], coordinates in the unpadded image
    cols = torch.where(flips[:, None], offsets_x[:, None] + (width - 1 - ar_w), offsets_x[:, None] + ar_w)
    cols = cols - padding
    valid = None
    if padding_mode == "zeros":
        valid = (((rows >= 0) & (rows < height))[:, None, :, None]
                 & ((cols >= 0) & (cols < width))[:, None, None, :])
        rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    elif padding_mode == "replicate":
        rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    else:
        if padding >= height or padding >= width:
            raise ValueError(f"reflect padding {padding} needs an image larger than it, got {height}x{width}")
        rows = torch.where(rows < 0, -rows, torch.where(rows >= height, 2 * (height - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= width, 2 * (width - 1) - cols, cols))
    return rows, cols, valid


def random_crop_flip(images: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor,
                     flips: torch.Tensor, padding: int = 4, padding_mode: str = "zeros",
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """Padded crops with horizontal flips for a whole batch, in one gather (no per-image Python).

    Equivalent to, for each sample ``b``: pad ``images[index[b]]`` by ``padding`` (zeros, reflect or
    replicate), take the window at ``(offsets_y[b], offsets_x[b])`` of the original size, and flip
    it left-right if ``flips[b]``.

    Args:
        images: ``[N, C, H, W]`` of any dtype (uint8 for a :class:`TensorImageDataset`).
        offsets_y, offsets_x: int64 ``[B]`` in ``0 .. 2 * padding``.
        flips: bool ``[B]``.
        padding, padding_mode: see :func:`crop_flip_indices`.
        index: optional int64 ``[B]`` selecting the images of the batch; ``None`` means all
            (``B = N``). Gathering through ``index`` avoids copying the batch twice.

    Returns:
        ``[B, C, H, W]`` with the dtype and device of ``images``.
    """
    n, c, h, w = images.shape
    dev = images.device
    offsets_y, offsets_x, flips = offsets_y.to(dev), offsets_x.to(dev), flips.to(dev, torch.bool)
    if index is None:
        index = torch.arange(n, device=dev)
    rows, cols, valid = crop_flip_indices(offsets_y, offsets_x, flips, h, w, padding, padding_mode)
    index = index.to(dev)
    ch = torch.arange(c, device=dev)
    if images.is_contiguous():  # one flat gather: about twice as fast as 4-way advanced indexing
        flat = ((index * (c * h * w))[:, None, None, None] + (ch * (h * w))[None, :, None, None]
                + (rows * w)[:, None, :, None] + cols[:, None, None, :])
        out = images.view(-1)[flat.view(-1)].view(len(index), c, h, w)
    else:
        out = images[index[:, None, None, None], ch[None, :, None, None], rows[:, None, :, None],
                     cols[:, None, None, :]]
    if valid is not None:
        out.masked_fill_(~valid, 0)
    return out


class GPULoader:
    """Shuffled, augmented, optionally sharded batches from a :class:`TensorImageDataset`.

    Args:
        data: a :class:`TensorImageDataset` or a pair ``(images uint8 [N, C, H, W], labels [N])``.
        batch_size: samples per batch (per rank).
        shuffle: draw a new permutation every epoch (from a generator seeded with ``seed`` and the
            epoch number, identical on every rank); else the dataset order.
        drop_last: drop the last, smaller batch of each epoch.
        augment: random crop after padding by ``padding`` and (``flip``) a random horizontal flip
            with probability 1/2, both drawn per sample.
        padding, padding_mode: crop padding and its mode (``'zeros'``, ``'reflect'``, ``'replicate'``).
        flip: with ``augment``, whether to flip.
        output: ``'raw'`` (float pixel values 0..255, the NSL paper's CIFAR protocol), ``'unit'``
            (0..1) or ``'normalize'`` (``(x / 255 - mean) / std``).
        mean, std: per-channel statistics in 0..1 units for ``output='normalize'``; computed from
            the dataset when omitted.
        dtype: floating dtype of the images produced.
        channels_last: return images in ``torch.channels_last`` memory format.
        device: where the dataset is moved once and where batches are produced (default: where the
            dataset is).
        seed: seed of the permutations and of the augmentation generator.
        rank, world_size: data-parallel sharding. Every epoch's permutation is truncated to a
            multiple of ``world_size`` (when ``even_shards``) and rank ``r`` takes its elements
            ``r, r + world_size, ...``: the shards are disjoint, equally long, and together cover the
            epoch (up to ``world_size - 1`` samples dropped that epoch).
        even_shards: equal shard lengths (default: ``shuffle``, since unequal lengths would
            desynchronise data-parallel training); ``False`` keeps every sample (shards differ by
            at most one sample), which is what evaluation wants.

    Iteration yields ``(images, labels)``: images ``[B, C, H, W]`` of ``dtype`` on ``device``,
    labels int64 ``[B]``. The loader is stateful: iterating continues the current epoch from its
    current position (0 after construction or a completed epoch) and ends at the end of the epoch;
    the next iteration starts the next epoch. An interrupted epoch is continued by the next
    iteration, e.g. after :meth:`load_state_dict`.
    """

    def __init__(self, data, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 augment: bool = False, padding: int = 4, padding_mode: str = "zeros", flip: bool = True,
                 output: str = "raw", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 device: torch.device | str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 even_shards: bool | None = None):
        if not isinstance(data, TensorImageDataset):
            data = TensorImageDataset(*data)
        if device is not None:
            data = data.to(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if output not in ("raw", "unit", "normalize"):
            raise ValueError(f"output must be 'raw', 'unit' or 'normalize', got {output!r}")
        if padding_mode not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect' or 'replicate', got {padding_mode!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.augment, self.flip = bool(augment), bool(flip)
        self.padding, self.padding_mode = int(padding), padding_mode
        self.output, self.dtype, self.channels_last = output, dtype, bool(channels_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.even_shards = self.shuffle if even_shards is None else bool(even_shards)
        self._scale = self._shift = None
        if output == "normalize":
            if mean is None or std is None:
                mean, std = data.channel_stats()
            c = data.images.shape[1]
            m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
            s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
            if len(m) not in (1, c) or len(s) not in (1, c) or bool((s <= 0).any()):
                raise ValueError(f"mean/std must have 1 or {c} entries and std > 0")
            self._scale = (1.0 / (255.0 * s)).to(dtype).reshape(1, -1, 1, 1).to(data.device)
            self._shift = (-m / s).to(dtype).reshape(1, -1, 1, 1).to(data.device)
        self.mean, self.std = mean, std
        self.epoch = 0
        self.position = 0
        self.generator = torch.Generator()
        self.generator.manual_seed(self._aug_seed())
        if len(self) == 0:
            raise ValueError(f"no batch to produce: {self.num_samples} samples per rank, batch_size "
                             f"{self.batch_size}, drop_last={self.drop_last}")

    # -- sizes and orders -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the dataset and of the batches."""
        return self.data.device

    @property
    def num_samples(self) -> int:
        """Samples of this rank per epoch."""
        n = len(self.data)
        if self.even_shards:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch (for this rank)."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _aug_seed(self) -> int:
        return ((self.seed + 1) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 * (self.rank + 1)) & _MASK64

    def _perm_seed(self, epoch: int) -> int:
        return (self.seed * 0xBF58476D1CE4E5B9 + (epoch + 1) * 0x94D049BB133111EB) & _MASK64

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch`` (default: the current one), in order.

        Returns:
            int64 ``[num_samples]`` on the CPU.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self._perm_seed(epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.even_shards:
            order = order[: n - n % self.world_size]
        return order[self.rank::self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (the augmentation generator is left as it is)."""
        self.epoch, self.position = int(epoch), 0

    # -- batches --------------------------------------------------------------------------------
    def _batch(self, index: torch.Tensor) -> torch.Tensor:
        images = self.data.images
        b = len(index)
        if self.augment:
            g = self.generator
            oy = torch.randint(0, 2 * self.padding + 1, (b,), generator=g)
            ox = torch.randint(0, 2 * self.padding + 1, (b,), generator=g)
            flips = (torch.rand(b, generator=g) < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool)
            x = random_crop_flip(images, oy, ox, flips, self.padding, self.padding_mode, index=index)
        else:
            x = images[index]
        x = x.to(self.dtype)
        if self.output == "unit":
            x = x.mul_(1.0 / 255.0)
        elif self.output == "normalize":
            x = x.mul_(self._scale).add_(self._shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nb = len(self)
        if self.position >= nb:  # a finished epoch whose iterator was not run to its end
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_indices().to(self.device)
        while self.position < nb:
            start = self.position * self.batch_size
            index = order[start:start + self.batch_size]
            x = self._batch(index)
            y = self.data.labels[index]
            self.position += 1
            yield x, y
        self.epoch, self.position = self.epoch + 1, 0

    # -- resumption -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: epoch, position (batches already produced in the
        epoch), the augmentation generator's state (uint8 tensor) and the settings they depend on."""
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state(),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": len(self.data), "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues where the saved loader was.

        Raises:
            ValueError: the state was saved by a loader with a different seed, rank, world size,
                batch size, dataset length, shuffle or drop_last setting.
        """
        for key in ("seed", "rank", "world_size", "batch_size", "num_samples", "shuffle", "drop_last"):
            mine = len(self.data) if key == "num_samples" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(f"loader state saved with {key}={state[key]!r}, this loader has {mine!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"].cpu())
