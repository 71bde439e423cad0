"""Episode sampling for N-way K-shot few-shot learning.

:class:`EpisodeSampler` draws episodes as *index* tensors into a dataset (in the spirit of easyfsl's
``TaskSampler``); :func:`make_episode` turns one episode into the support / query tensors by indexing
the dataset's uint8 image tensor where it lives (put it on the GPU once and every episode is built
there, with no per-image Python).

Episode ``i`` is a pure function of ``(seed, i)``: two models evaluated with the same seed see
identical episodes, and any single episode can be regenerated with :meth:`EpisodeSampler.episode`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Episode", "EpisodeSampler", "episode_labels", "make_episode"]


class Episode(NamedTuple):
    """One N-way K-shot episode, as indices into a dataset.

    Attributes:
        support: int64 ``[n_way * k_shot]``, dataset indices, class-major (the ``k_shot`` images of
            ``classes[0]`` first, then those of ``classes[1]``, ...).
        query: int64 ``[n_way * n_query]``, dataset indices, class-major like ``support``; disjoint
            from ``support``.
        classes: int64 ``[n_way]``, the dataset labels of the episode's classes, all distinct;
            episode-local label ``j`` stands for dataset label ``classes[j]``.
    """

    support: torch.Tensor
    query: torch.Tensor
    classes: torch.Tensor


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class EpisodeSampler:
    """Reproducible sampler of N-way K-shot episodes over a labelled dataset.

    Each episode picks ``n_way`` distinct classes, then ``k_shot + n_query`` distinct images of each
    class: the first ``k_shot`` form the support set, the rest the query set (so support and query
    never overlap). Episode ``i`` depends only on ``(seed, i)`` (its generator is seeded from
    ``numpy.random.SeedSequence([seed, i])``), not on the order in which episodes are drawn.

    Args:
        labels: int ``[N]`` class label of every image (any integer values; the classes are the
            distinct values). Typically ``FewShotDataset.labels``.
        n_way: classes per episode (N).
        k_shot: support images per class (K), >= 1.
        n_query: query images per class (Q), >= 0.
        n_episodes: episodes per pass (the length of the sampler).
        seed: base seed, a non-negative int.

    Raises:
        ValueError: ``n_way`` exceeds the number of classes, or a class has fewer than
            ``k_shot + n_query`` images (the message names the class and the counts).

    Iterating yields :class:`Episode` tuples ``(support [n_way*k_shot], query [n_way*n_query],
    classes [n_way])`` of int64 CPU tensors; ``torch.cat([ep.support, ep.query])`` is the flat index
    list easyfsl's ``TaskSampler`` yields.
    """

    def __init__(self, labels: torch.Tensor | Sequence[int] | np.ndarray, n_way: int, k_shot: int,
                 n_query: int, n_episodes: int, seed: int = 0) -> None:
        labels = torch.as_tensor(labels).detach().cpu()
        integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        if labels.ndim != 1 or not integer:
            raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} and shape "
                             f"{tuple(labels.shape)}")
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.n_query = _check_int("n_query", n_query, 0)
        self.n_episodes = _check_int("n_episodes", n_episodes, 0)
        self.seed = _check_int("seed", seed, 0)

        classes, counts = torch.unique(labels.long(), sorted=True, return_counts=True)
        if self.n_way > len(classes):
            raise ValueError(f"n_way={self.n_way} exceeds the number of classes in labels "
                             f"({len(classes)})")
        need = self.k_shot + self.n_query
        short = (counts < need).nonzero().flatten()
        if len(short):
            c = int(short[0])
            extra = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
            raise ValueError(
                f"class {int(classes[c])} has {_plural(int(counts[c]), 'image', 'images')}, an episode needs "
                f"{_plural(self.k_shot, 'shot', 'shots')} + {_plural(self.n_query, 'query', 'queries')} "
                f"= {need}{extra}")
        #: int64 ``[n_classes]`` the distinct labels, ascending.
        self.classes = classes
        #: int64 ``[n_classes]`` images per class.
        self.counts = counts
        # table[c, :counts[c]] = the dataset indices of class c, in dataset order; -1 padding after.
        order = torch.argsort(labels.long(), stable=True)
        starts = torch.cumsum(counts, 0) - counts
        col = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
        row = torch.repeat_interleave(torch.arange(len(classes)), counts)
        self._table = torch.full((len(classes), int(counts.max())), -1, dtype=torch.long)
        self._table[row, col] = order

    def __len__(self) -> int:
        """Number of episodes per pass, ``n_episodes``."""
        return self.n_episodes

    def generator(self, i: int) -> torch.Generator:
        """The CPU ``torch.Generator`` of episode ``i``, seeded from ``(seed, i)`` only."""
        state = np.random.SeedSequence([self.seed, int(i)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) << 32))

    def episode(self, i: int) -> Episode:
        """Episode ``i`` (``0 <= i``; indices beyond ``n_episodes`` are valid too).

        Returns:
            :class:`Episode` of int64 CPU tensors: ``support [n_way*k_shot]``,
            ``query [n_way*n_query]`` (dataset indices, class-major) and ``classes [n_way]``.
        """
        if int(i) < 0:
            raise ValueError(f"episode index must be >= 0, got {i}")
        g = self.generator(i)
        chosen = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        counts = self.counts[chosen]
        # A random key per (class, slot); padding slots get +inf so the smallest keys pick a uniform
        # random subset of each class's images without replacement.
        keys = torch.rand((self.n_way, self._table.shape[1]), generator=g, dtype=torch.float64)
        keys[torch.arange(self._table.shape[1]) >= counts[:, None]] = float("inf")
        need = self.k_shot + self.n_query
        slots = torch.argsort(keys, dim=1)[:, :need]
        picked = torch.gather(self._table[chosen], 1, slots)  # [n_way, k_shot + n_query]
        return Episode(support=picked[:, : self.k_shot].reshape(-1).contiguous(),
                       query=picked[:, self.k_shot:].reshape(-1).contiguous(),
                       classes=self.classes[chosen].clone())

    def __iter__(self) -> Iterator[Episode]:
        """Yield episodes ``0 .. n_episodes - 1`` (see :meth:`episode`)."""
        for i in range(self.n_episodes):
            yield self.episode(i)

    def __repr__(self) -> str:
        return (f"EpisodeSampler(n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query}, "
                f"n_episodes={self.n_episodes}, seed={self.seed}, n_classes={len(self.classes)})")


def episode_labels(n_way: int, per_class: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Episode-local labels of a class-major set: int64 ``[n_way * per_class]``, ``0,0,..,1,1,..``."""
    return torch.arange(n_way, device=device).repeat_interleave(per_class)


def make_episode(images: torch.Tensor, episode: Episode, device: torch.device | str | None = None,
                 scale: bool = True, mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build an episode's tensors by indexing the dataset's image tensor (no per-image Python).

    Indexing happens where ``images`` lives: keep ``images`` on the accelerator (``ds.images.cuda()``,
    once) and only the index tensors travel per episode. With ``images`` on the CPU and ``device`` an
    accelerator, only the episode's images are gathered on the CPU and moved.

    Args:
        images: ``[N, C, H, W]`` image tensor, uint8 (0..255) or floating point.
        episode: an :class:`Episode` from :class:`EpisodeSampler`.
        device: where the outputs go; default ``images.device``.
        scale: divide uint8 images by 255 (to ``[0, 1]``) before normalising.
        mean, std: optional per-channel ``[C]`` normalisation, ``(x - mean) / std``, applied after
            scaling (so in ``[0, 1]`` units when ``scale``).
        dtype: floating dtype of the outputs.

    Returns:
        ``(support, support_labels, query, query_labels)``: ``support`` ``dtype [n_way*k_shot, C, H, W]``,
        ``support_labels`` int64 ``[n_way*k_shot]``, ``query`` ``dtype [n_way*n_query, C, H, W]``,
        ``query_labels`` int64 ``[n_way*n_query]``; labels are episode-local, ``0 .. n_way-1``, label
        ``j`` meaning dataset class ``episode.classes[j]``. All on ``device``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = images.device if device is None else torch.device(device)
    n_way = len(episode.classes)
    k_shot, rem_s = divmod(len(episode.support), n_way)
    n_query, rem_q = divmod(len(episode.query), n_way)
    if rem_s or rem_q or k_shot < 1:
        raise ValueError(f"malformed episode: {len(episode.support)} support and {len(episode.query)} "
                         f"query indices for {n_way} classes")
    idx = torch.cat([episode.support, episode.query]).to(images.device, non_blocking=True)
    x = images.index_select(0, idx).to(device, non_blocking=True).to(dtype)
    if scale and images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255.0)
    c = images.shape[1]
    if mean is not None:
        m = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1)
        if m.numel() not in (1, c):
            raise ValueError(f"mean has {m.numel()} values, images have {c} channels")
        x = x.sub_(m.view(1, -1, 1, 1))
    if std is not None:
        s = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1)
        if s.numel() not in (1, c):
            raise ValueError(f"std has {s.numel()} values, images have {c} channels")
        x = x.div_(s.view(1, -1, 1, 1))
    n_s = n_way * k_shot
    return (x[:n_s], episode_labels(n_way, k_shot, device), x[n_s:], episode_labels(n_way, n_query, device))
