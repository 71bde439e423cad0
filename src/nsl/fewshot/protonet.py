"""Prototypical Networks and a bilinear neural-similarity metric, episodic loss and evaluation.

An episode's embeddings are ``support [n_way*k_shot, D]``, class-major with labels
``0,..,0, 1,..,1, .., n_way-1`` (``k_shot`` each, the layout :func:`nsl.fewshot.make_episode`
returns), and ``query [n_query, D]``. A head turns them into logits ``[n_query, n_way]``:

* :class:`PrototypicalHead` (Snell et al., 2017): prototypes ``p_j = mean_k support[j, k]``;
  ``metric='euclidean'``: ``logits[i, j] = -||q_i - p_j||^2``; ``'cosine'``:
  ``s * cos(q_i, p_j)`` with a learnable scale ``s`` (init 10); ``'dot'``: ``q_i^T p_j``.
* :class:`BilinearSimilarityHead`: ``logits[i, j] = q_i^T M p_j`` with ``M`` learned (full, or
  ``I + U V^T``), initialised to ``I``: neural similarity applied at the metric.

:class:`FewShotClassifier` chains a backbone (:func:`nsl.fewshot.build_backbone`) and a head;
:func:`episode_loss_and_accuracy` is the training step's loss, and :func:`evaluate` the standard
evaluation: mean accuracy over fixed-seed episodes with the 95% confidence interval
``1.96 * std / sqrt(n_episodes)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..stats import normal_ci
from .data import FewShotDataset
from .sampler import EpisodeSampler, make_episode

__all__ = [
    "HEAD_METRICS",
    "BilinearSimilarityHead",
    "EvalResult",
    "FewShotClassifier",
    "PrototypicalHead",
    "check_episode",
    "confidence_interval",
    "episode_loss_and_accuracy",
    "evaluate",
    "prototypes",
]

#: Metrics of :class:`PrototypicalHead`.
HEAD_METRICS = ("euclidean", "cosine", "dot")


def _show(labels: Tensor, limit: int = 20) -> str:
    vals = labels[:limit].tolist()
    return "[" + ", ".join(map(str, vals)) + (", ...]" if len(labels) > limit else "]")


def check_episode(support: Tensor, support_labels: Tensor, query: Tensor) -> tuple[int, int]:
    """Validate an episode's embeddings and support labels; return ``(n_way, k_shot)``.

    Args:
        support: ``[n_way*k_shot, D]`` support embeddings, grouped by class (class-major).
        support_labels: integer ``[n_way*k_shot]``, exactly ``0 (k_shot times), 1 (k_shot times), ..,
            n_way-1``: the layout of :func:`nsl.fewshot.make_episode` / ``episode_labels``.
        query: ``[n_query, D]`` query embeddings.

    Raises:
        ValueError: a tensor of the wrong rank, embedding dims that differ, a label count that
            differs from the number of support rows, or support labels not grouped by class.
    """
    if support.ndim != 2 or query.ndim != 2:
        raise ValueError(f"support and query embeddings must be 2-D [n, D], got shapes {tuple(support.shape)} "
                         f"and {tuple(query.shape)}")
    if support.shape[1] != query.shape[1]:
        raise ValueError(f"query embedding dim {query.shape[1]} does not match support embedding dim "
                         f"{support.shape[1]}")
    if support_labels.ndim != 1 or support_labels.is_floating_point() or support_labels.dtype == torch.bool:
        raise ValueError(f"support_labels must be a 1-D integer tensor, got {support_labels.dtype} "
                         f"{tuple(support_labels.shape)}")
    if len(support_labels) != len(support):
        raise ValueError(f"support_labels has {len(support_labels)} entries but support has {len(support)} rows")
    if len(support) == 0:
        raise ValueError("the support set is empty")
    labels = support_labels.detach().cpu().long()
    n_way = int(labels.max()) + 1
    k_shot = len(labels) // n_way
    expected = torch.arange(n_way).repeat_interleave(k_shot)
    if int(labels.min()) < 0 or k_shot * n_way != len(labels) or not torch.equal(labels, expected):
        raise ValueError("support must be grouped by class: support_labels must read 0 (k_shot times), "
                         "1 (k_shot times), .., n_way-1 (class-major, as make_episode returns), got "
                         f"{_show(labels)}")
    return n_way, k_shot


def prototypes(support: Tensor, n_way: int, k_shot: int) -> Tensor:
    """Class prototypes ``p_j = (1/k_shot) sum_k support[j*k_shot + k]``: ``[n_way*k_shot, D] -> [n_way, D]``."""
    return support.reshape(n_way, k_shot, support.shape[-1]).mean(1)


class _EpisodeHead(nn.Module):
    """Base of the heads: validate, average the support into prototypes, score the queries."""

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor) -> Tensor:
        """Logits ``[n_query, n_way]`` from ``support [n_way*k_shot, D]`` (class-major), its labels and
        ``query [n_query, D]``."""
        n_way, k_shot = check_episode(support, support_labels, query)
        self._check_dim(support.shape[1])
        return self.logits(query, prototypes(support, n_way, k_shot))

    def _check_dim(self, dim: int) -> None:
        pass

    def logits(self, query: Tensor, protos: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PrototypicalHead(_EpisodeHead):
    """Prototypical Networks' classifier over class prototypes ``p_j`` (class means of the support).

    For a query ``q_i`` (shapes ``q [n_query, D]``, ``p [n_way, D]``, logits ``[n_query, n_way]``):

    * ``'euclidean'`` (Snell et al.): ``logits[i, j] = -||q_i - p_j||^2``
      (computed as ``-(||q_i||^2 - 2 q_i^T p_j + ||p_j||^2)``, clamped to ``<= 0``);
    * ``'cosine'``: ``logits[i, j] = s * q_i^T p_j / (||q_i|| ||p_j||)``, ``s`` initialised to
      ``scale_init`` (10), a learned parameter when ``learn_scale`` else a fixed buffer;
    * ``'dot'``: ``logits[i, j] = q_i^T p_j`` (the bilinear head with ``M = I``).

    ``learn_scale`` and ``scale_init`` concern ``'cosine'`` only.
    """

    def __init__(self, metric: str = "euclidean", learn_scale: bool = True, scale_init: float = 10.0):
        super().__init__()
        if metric not in HEAD_METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(HEAD_METRICS)}")
        self.metric = metric
        self.learn_scale = learn_scale
        if metric == "cosine":
            scale = torch.tensor(float(scale_init))
            if learn_scale:
                self.scale = nn.Parameter(scale)
            else:
                self.register_buffer("scale", scale)

    def logits(self, query: Tensor, protos: Tensor) -> Tensor:
        """``query [n_query, D]``, ``protos [n_way, D]`` -> logits ``[n_query, n_way]``."""
        if self.metric == "euclidean":
            d2 = (query.pow(2).sum(1, keepdim=True) - 2.0 * query @ protos.t()
                  + protos.pow(2).sum(1).unsqueeze(0))
            return -d2.clamp_min(0.0)
        if self.metric == "cosine":
            return self.scale * (F.normalize(query, dim=1) @ F.normalize(protos, dim=1).t())
        return query @ protos.t()

    def extra_repr(self) -> str:
        s = f"metric={self.metric!r}"
        if self.metric == "cosine":
            s += f", learn_scale={self.learn_scale}"
        return s


class BilinearSimilarityHead(_EpisodeHead):
    """Neural similarity at the metric: ``logits[i, j] = q_i^T M p_j`` with ``M [D, D]`` learned.

    ``q [n_query, D]``, prototypes ``p [n_way, D]`` (class means of the support), logits
    ``[n_query, n_way]``. ``M`` is parametrised around the identity:

    * ``rank=None``: ``M = I + Delta``, ``Delta [D, D]`` a full learned matrix, initialised to 0;
    * ``rank=r``: ``M = I + U V^T``, ``U, V [D, r]``; ``U = 0`` and ``V ~ N(0, 1/D)`` at init, so
      ``U`` learns at once and ``V`` once ``U != 0`` (``D^2`` vs ``2 D r`` parameters).

    At initialisation ``M = I`` and the head is the dot-product head ``q_i^T p_j``
    (``PrototypicalHead('dot')``); weight decay on ``Delta`` / ``U`` pulls ``M`` back towards ``I``,
    like NSL's identity-residual layers.

    Relation to the squared Euclidean distance of Prototypical Networks::

        -||q - p||^2 = 2 q^T p - ||p||^2 - ||q||^2

    ``||q||^2`` is the same for every class, so the softmax ignores it: ProtoNet's logits equal
    ``2 q^T I p - ||p||^2`` up to a per-query constant. The bilinear head at ``M = I`` differs from
    ProtoNet by the factor 2 (a temperature) and the per-class bias ``-||p||^2``, which penalises
    prototypes of large norm. More generally, for a symmetric positive semi-definite
    ``M = L L^T``, ``-(q - p)^T M (q - p) = -||L^T q - L^T p||^2`` is a squared Mahalanobis distance
    (ProtoNet on the linearly mapped embedding ``L^T x``), and ``q^T M p`` is its cross term; here
    ``M`` is unconstrained (neither symmetric nor definite), a learned bilinear similarity as in NSL.

    With ``prototype_bias=True`` the head adds the per-class bias of the Euclidean form:

        ``logits[i, j] = q_i^T M p_j - (1/2) p_j^T M p_j``

    which at ``M = I`` equals ``-(1/2) ||q_i - p_j||^2 + (1/2) ||q_i||^2``: ProtoNet's logits at
    temperature 2 up to a per-query constant, i.e. the same softmax as ``PrototypicalHead('euclidean')``
    with halved logits. The head then starts as (a tempered) ProtoNet and learns away from it.

    Args:
        dim: embedding dimension ``D`` (``backbone.embedding_dim(image_size)``).
        rank: ``None`` for a full ``M``, else the rank ``r >= 1`` of ``M - I``.
        prototype_bias: subtract ``(1/2) p_j^T M p_j`` from the logits of class ``j``.
    """

    def __init__(self, dim: int, rank: int | None = None, prototype_bias: bool = False):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be None or >= 1, got {rank}")
        self.dim = int(dim)
        self.rank = rank
        self.prototype_bias = bool(prototype_bias)
        if rank is None:
            self.delta = nn.Parameter(torch.zeros(dim, dim))
        else:
            self.u = nn.Parameter(torch.zeros(dim, rank))
            self.v = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))

    def matrix(self) -> Tensor:
        """The similarity matrix ``M [D, D]`` (``I + Delta`` or ``I + U V^T``)."""
        eye = torch.eye(self.dim, device=self._ref().device, dtype=self._ref().dtype)
        return eye + (self.delta if self.rank is None else self.u @ self.v.t())

    def _ref(self) -> Tensor:
        return self.delta if self.rank is None else self.u

    def _check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise ValueError(f"embedding dim {dim} does not match the bilinear head's dim {self.dim}")

    def logits(self, query: Tensor, protos: Tensor) -> Tensor:
        """``q^T M p`` (``- p^T M p / 2`` with ``prototype_bias``): ``query [n_query, D]``,
        ``protos [n_way, D]`` -> ``[n_query, n_way]``."""
        if self.rank is None:
            mp = protos + protos @ self.delta.t()                     # rows: (M p_j)^T
        else:
            mp = protos + (protos @ self.v) @ self.u.t()
        logits = query @ mp.t()
        if self.prototype_bias:
            logits = logits - 0.5 * (protos * mp).sum(1).unsqueeze(0)
        return logits

    def extra_repr(self) -> str:
        s = f"dim={self.dim}" + ("" if self.rank is None else f", rank={self.rank}")
        return s + (", prototype_bias=True" if self.prototype_bias else "")


class FewShotClassifier(nn.Module):
    """A backbone and an episode head: ``forward(support, support_labels, query) -> logits``.

    Support and query images go through the backbone in one batch (so in training mode the batch
    norm statistics are those of the whole episode, as in Snell et al.'s implementation), are split
    into support embeddings ``[n_way*k_shot, D]`` and query embeddings ``[n_query, D]``, and the head
    scores them.

    Args:
        backbone: images ``[N, C, H, W]`` -> embeddings ``[N, D]`` (e.g. :func:`build_backbone`).
        head: :class:`PrototypicalHead`, :class:`BilinearSimilarityHead` or any module with the same
            ``(support, support_labels, query) -> logits`` call.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, images: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, D]``; embeddings that are not 2-D are flattened."""
        z = self.backbone(images)
        return z if z.ndim == 2 else z.flatten(1)

    def forward(self, support: Tensor, support_labels: Tensor, query: Tensor) -> Tensor:
        """Logits ``[n_query, n_way]``.

        Args:
            support: images ``[n_way*k_shot, C, H, W]``, class-major.
            support_labels: int64 ``[n_way*k_shot]``, ``0,..,0, 1,..,1, ..`` (as make_episode returns).
            query: images ``[n_query, C, H, W]``.
        """
        if len(support_labels) != len(support):
            raise ValueError(f"support_labels has {len(support_labels)} entries but support has "
                             f"{len(support)} images")
        if support.shape[1:] != query.shape[1:]:
            raise ValueError(f"support images {tuple(support.shape[1:])} and query images "
                             f"{tuple(query.shape[1:])} differ in shape")
        z = self.embed(torch.cat([support, query]))
        return self.head(z[: len(support)], support_labels, z[len(support):])


def _check_query_labels(query: Tensor, query_labels: Tensor, n_way: int | None = None) -> None:
    if query_labels.ndim != 1 or len(query_labels) != len(query):
        raise ValueError(f"query_labels has {len(query_labels)} entries but query has {len(query)} images")
    if n_way is not None and len(query_labels):
        lo, hi = (int(v) for v in torch.aminmax(query_labels.detach()))
        if lo < 0 or hi >= n_way:
            raise ValueError(f"query_labels must lie in 0..{n_way - 1} (n_way = {n_way}), got {lo}..{hi}")


def episode_loss_and_accuracy(model: nn.Module, support: Tensor, support_labels: Tensor, query: Tensor,
                              query_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy loss and accuracy of one episode.

    ``logits = model(support, support_labels, query)`` (``[n_query, n_way]``);
    ``loss = -(1/n_query) sum_i log softmax(logits_i)[query_labels[i]]``;
    ``acc = (1/n_query) sum_i [argmax_j logits[i, j] == query_labels[i]]``.

    Args:
        model: e.g. :class:`FewShotClassifier`.
        support, support_labels, query, query_labels: as :func:`nsl.fewshot.make_episode` returns
            (episode-local labels ``0 .. n_way-1``; ``query_labels`` int64 ``[n_query]``).

    Returns:
        ``(loss, acc)``: 0-dim tensors; ``loss`` carries the graph, ``acc`` is a detached fraction in
        ``[0, 1]`` left on the device (call ``.item()`` when needed). The input checks read the
        labels on the host before the forward pass (a cheap sync while the device queue is short).

    Raises:
        ValueError: bad episode layout (see :func:`check_episode`), ``query_labels`` of the wrong
            length or outside ``0 .. n_way-1``.
    """
    n_way = int(support_labels.detach().max()) + 1 if len(support_labels) else None
    _check_query_labels(query, query_labels, n_way)
    logits = model(support, support_labels, query)
    loss = F.cross_entropy(logits, query_labels)
    acc = (logits.detach().argmax(1) == query_labels).float().mean()
    return loss, acc


def confidence_interval(accuracies: Sequence[float] | np.ndarray | Tensor, z: float = 1.96) -> tuple[float, float]:
    """Mean and confidence half-width of per-episode accuracies: ``(mean, z * std / sqrt(n))``, ``std`` the
    population standard deviation over episodes (``ddof=0``, as the usual few-shot evaluation code);
    ``z = 1.96`` gives the 95% interval (:func:`nsl.stats.normal_ci`)."""
    return normal_ci(accuracies, z)


@dataclass(frozen=True)
class EvalResult:
    """Result of :func:`evaluate`; accuracies are fractions in ``[0, 1]``.

    Attributes:
        mean: mean accuracy over the episodes.
        ci95: 95% confidence half-width, ``1.96 * std / sqrt(n_episodes)`` (``std`` with ``ddof=0``).
        std: standard deviation of the per-episode accuracies (``ddof=0``).
        accuracies: float64 ``[n_episodes]``, accuracy of each episode (episode ``i`` of the seed), for
            paired comparisons of models evaluated with the same seed.
    """

    mean: float
    ci95: float
    std: float
    accuracies: np.ndarray

    @property
    def n_episodes(self) -> int:
        """Number of episodes."""
        return len(self.accuracies)

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} +- {100 * self.ci95:.2f} % ({self.n_episodes} episodes)"


def evaluate(model: nn.Module, dataset: FewShotDataset, n_way: int, k_shot: int, n_query: int,
             n_episodes: int = 600, seed: int = 0, device: torch.device | str | None = None,
             batch_episodes: int = 1, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Mean accuracy over fixed-seed episodes, with the 95% confidence interval.

    Episodes ``0 .. n_episodes-1`` of ``EpisodeSampler(dataset.labels, n_way, k_shot, n_query,
    n_episodes, seed)``: two models evaluated with the same arguments see identical episodes. Each is
    built with :func:`nsl.fewshot.make_episode` (on ``device``; put ``dataset`` there once with
    ``dataset.to(device)`` to gather images on the device). The model runs in eval mode under
    ``torch.no_grad()`` and its training mode is restored afterwards.

    Per episode ``acc_e = (1/(n_way*n_query)) sum_i [argmax logits_i == y_i]``; the result is
    ``mean = (1/E) sum_e acc_e`` and ``ci95 = 1.96 * std(acc) / sqrt(E)``, ``std`` over episodes with
    ``ddof=0`` (see :func:`confidence_interval`).

    Args:
        model: a :class:`FewShotClassifier` (or a module called as ``model(support, support_labels,
            query) -> logits``, then with ``batch_episodes=1``).
        dataset: the split to evaluate (usually ``test``).
        n_way, k_shot, n_query: episode shape (``n_query`` queries per class, >= 1).
        n_episodes: number of episodes ``E`` (600 is standard).
        seed: episode seed.
        device: where episodes are built and the model runs; default: the model's device.
        batch_episodes: episodes whose images go through the backbone in one batch (the backbone is
            per-image in eval mode, so the result does not depend on it; larger is faster on a GPU).
        mean, std: per-channel normalisation passed to make_episode (after scaling to ``[0, 1]``).
        progress: show a tqdm progress bar (with the running mean accuracy).
        desc: progress bar label.

    Returns:
        :class:`EvalResult` (``.mean``, ``.ci95``, ``.std``, ``.accuracies``), accuracies as fractions.
    """
    from tqdm import tqdm

    if n_query < 1:
        raise ValueError(f"evaluation needs n_query >= 1, got {n_query}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if batch_episodes < 1:
        raise ValueError(f"batch_episodes must be >= 1, got {batch_episodes}")
    batched = hasattr(model, "embed") and hasattr(model, "head")
    if batch_episodes > 1 and not batched:
        raise ValueError("batch_episodes > 1 needs a model with .embed and .head (a FewShotClassifier)")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else dataset.images.device
    device = torch.device(device)
    sampler = EpisodeSampler(dataset.labels, n_way, k_shot, n_query, n_episodes, seed)
    was_training = model.training
    model.eval()
    correct: list[Tensor] = []  # per episode: number of correctly classified queries
    per_episode = n_way * n_query
    every = max(1, n_episodes // 50)
    bar = tqdm(total=n_episodes, desc=desc, disable=not progress, unit="ep", leave=False)
    try:
        with torch.no_grad():
            for start in range(0, n_episodes, batch_episodes):
                eps = [make_episode(dataset.images, sampler.episode(i), device=device, mean=mean, std=std)
                       for i in range(start, min(start + batch_episodes, n_episodes))]
                if batched:
                    z = model.embed(torch.cat([t for xs, _, xq, _ in eps for t in (xs, xq)]))
                    offset = 0
                    for xs, ys, xq, yq in eps:
                        zs, zq = z[offset: offset + len(xs)], z[offset + len(xs): offset + len(xs) + len(xq)]
                        offset += len(xs) + len(xq)
                        correct.append((model.head(zs, ys, zq).argmax(1) == yq).sum())
                else:
                    for xs, ys, xq, yq in eps:
                        correct.append((model(xs, ys, xq).argmax(1) == yq).sum())
                bar.update(len(eps))
                done = len(correct)
                if progress and (done // every != (done - len(eps)) // every or done == n_episodes):
                    bar.set_postfix(acc=f"{100 * torch.stack(correct).sum().item() / (done * per_episode):.2f}")
    finally:
        bar.close()
        model.train(was_training)
    # exact fractions: correct counts (int64, summed on the device) / queries per episode, in float64
    a = torch.stack(correct).cpu().numpy().astype(np.float64) / per_episode
    m, ci = confidence_interval(a)
    return EvalResult(mean=m, ci95=ci, std=float(a.std(ddof=0)), accuracies=a)
