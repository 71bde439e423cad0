"""Episodic training and evaluation of few-shot classifiers (Prototypical Networks and NSL).

Few-shot training is a task (:class:`FewShotTask`) of the one training loop :func:`nsl.train.fit`, so it
has the run-directory layout and checkpoint discipline of every run (:mod:`nsl.train.run`)::

    RUN_DIR/config.json             the resolved FewShotConfig
    RUN_DIR/metrics.jsonl           one JSON object per logged episode window ("kind": "train") or
                                    validation ("kind": "val")
    RUN_DIR/checkpoints/last.pt     latest state: model, optimizer, RNG, episode counter
    RUN_DIR/checkpoints/best.pt     the same, at the best validation accuracy so far

Checkpoints are written atomically (:class:`nsl.train.RunDir`) and read with
``torch.load(weights_only=True)``. Training episode ``i`` is episode ``i`` of
``EpisodeSampler(train.labels, train_ways, shots, queries, seed=seed)``: it depends only on
``(seed, i)``, so a resumed run sees the same episodes as an uninterrupted one and, on the CPU, ends
with bit-identical weights. Validation uses ``val_episodes`` fixed episodes of the ``val`` split
(seed ``val_seed``), the same at every validation, so ``best.pt`` is selected on a fixed set.

::

    from nsl.fewshot.train import FewShotConfig, train_fewshot, evaluate_fewshot_checkpoint
    cfg = FewShotConfig(dataset="cifar-fs", data_dir="data", layer="dynamic-diagonal", out="runs/fs-dd")
    summary = train_fewshot(cfg)
    res = evaluate_fewshot_checkpoint("runs/fs-dd/checkpoints/best.pt", n_way=5, k_shot=1, n_episodes=600)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..train.config import ConfigBase, ConfigError, apply_overrides, check_predictor_options
from ..train.domains import check_domains
from ..train.loop import Task, fit
from ..train.run import Process, load_checkpoint, model_from_checkpoint, resolve_device
from .data import FewShotDataset, get_fewshot_dataset
from .domains import FEWSHOT_DOMAINS, FEWSHOT_HEADS
from .models import build_backbone
from .protonet import (
    BilinearSimilarityHead,
    FewShotClassifier,
    PrototypicalHead,
    confidence_interval,
    episode_loss_and_accuracy,
    evaluate,
)
from .sampler import EpisodeSampler, make_episode

__all__ = ["FEWSHOT_HEADS", "FewShotConfig", "apply_fewshot_overrides", "build_fewshot_model",
           "channel_stats", "compare_results", "evaluate_fewshot_checkpoint", "load_fewshot_checkpoint",
           "load_fewshot_split", "train_fewshot", "FewShotTask"]

CHECKPOINT_FORMAT = "nsl-fewshot"


@dataclass
class FewShotConfig(ConfigBase):
    """Everything an episodic training run depends on.

    Data: ``dataset`` (``cifar-fs``, ``fc100``, ``omniglot``, ``mini-imagenet``), ``data_dir``,
    ``rotations`` (Omniglot: 90/180/270-degree rotated characters as extra classes, train split only).
    Normalisation: per-channel mean / std computed from the train split's pixels (scaled to [0, 1]),
    stored in the checkpoint and reused by evaluation.

    Model: ``backbone`` (``conv4``, ``resnet12``), ``layer`` (any kind of :data:`nsl.layers.LAYER_KINDS`),
    ``predictor_width`` / ``share_predictor`` / ``predictor_norm`` (as :class:`~nsl.train.TrainConfig`), ``head``
    (:data:`FEWSHOT_HEADS`), ``bilinear_rank`` (``0``: full ``M``).

    Episodes: ``ways`` / ``shots`` / ``queries`` (validation and default evaluation shape);
    ``train_ways`` (``0``: same as ``ways``; Snell et al. train with more, e.g. 20 or 30),
    ``train_shots`` (``0``: same as ``shots``); ``episodes`` training episodes.

    Optimisation: Adam (``lr``, ``weight_decay``), lr multiplied by ``lr_gamma`` every ``lr_step``
    episodes (Snell et al.: 1e-3, halved every 2000 episodes); ``grad_clip`` (0: off).

    Validation: every ``val_every`` episodes (and at the end) on ``val_episodes`` fixed episodes of
    the val split (seed ``val_seed``); ``best.pt`` keeps the best. ``checkpoint_every``: extra
    ``last.pt`` saves. ``log_every``: episodes per metrics.jsonl train record.

    Engine (as :class:`~nsl.train.TrainConfig`): ``amp``, ``stop_at`` (stop after this many episodes
    with a checkpoint, as if interrupted), ``compile`` / ``compile_backend`` (``torch.compile`` of the model).
    """

    DOMAINS = FEWSHOT_DOMAINS

    dataset: str = "cifar-fs"
    data_dir: str | None = None
    rotations: bool = False
    backbone: str = "conv4"
    layer: str = "conv"
    predictor_width: int = 0  # hidden channels of the layers' predictors (kinds with a predictor); 0: default
    share_predictor: bool = False  # one predictor per stage (kinds with a predictor)
    predictor_norm: str = "batch"  # the predictors' normalisation: batch (authors'), group or none
    head: str = "protonet"
    bilinear_rank: int = 0
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_ways: int = 0
    train_shots: int = 0
    episodes: int = 20_000
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_step: int = 2000
    lr_gamma: float = 0.5
    grad_clip: float = 0.0
    val_every: int = 500
    val_episodes: int = 200
    val_seed: int = 0
    checkpoint_every: int = 0
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    progress: bool = True
    amp: str = "none"  # none | bf16 | fp16 | auto (bf16 on CUDA, none on CPU)
    stop_at: int = 0
    compile: str = "none"  # torch.compile mode (as TrainConfig.compile); checkpoints hold the uncompiled weights
    compile_backend: str = "inductor"
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    @property
    def n_train_ways(self) -> int:
        return self.train_ways or self.ways

    @property
    def n_train_shots(self) -> int:
        return self.train_shots or self.shots

    def validate(self) -> None:
        """Check every field against its domain (:mod:`nsl.fewshot.domains`) and then the rules between fields
        (predictor options, ``rotations``); raise :class:`~nsl.train.ConfigError` naming the field."""
        check_domains(self)
        check_predictor_options(self)
        if self.rotations and self.dataset != "omniglot":
            raise ConfigError("rotations is an Omniglot option")

    def lr_factor(self, episode: int) -> float:
        """Multiplier of ``lr`` for training episode ``episode`` (0-based): ``lr_gamma ** (episode // lr_step)``."""
        return self.lr_gamma ** (episode // self.lr_step)


def apply_fewshot_overrides(cfg: FewShotConfig, pairs: list[str]) -> FewShotConfig:
    """Apply ``key=value`` strings (``--set``) to ``cfg``: a new, validated config; unknown keys rejected.

    The shared :func:`nsl.train.config.apply_overrides` (typed by :class:`FewShotConfig`'s defaults).
    """
    return apply_overrides(cfg, pairs)


# -- data ----------------------------------------------------------------------------------------
def load_fewshot_split(dataset: str, data_dir: str | Path | None, split: str, rotations: bool = False
                       ) -> FewShotDataset:
    """Split ``split`` of ``dataset`` from ``data_dir``, with a clear error when the folder is missing."""
    if data_dir is None:
        raise ConfigError(f"{dataset} needs {{data_dir}} (the folder holding its files)", "data_dir")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data directory {data_dir} does not exist or is not a directory")
    return _load_cached(str(dataset), str(root.resolve()), split, bool(rotations), _stamp(root))


def _stamp(root: Path) -> float:
    """Modification time of ``root``: part of the cache key, so a refreshed folder is read again."""
    return root.stat().st_mtime


@functools.lru_cache(maxsize=3)
def _load_cached(dataset: str, root: str, split: str, rotations: bool, stamp: float) -> FewShotDataset:
    # A few recently loaded splits are kept (a process that trains then evaluates, or evaluates two
    # checkpoints, reads CIFAR-100 once per split); callers never modify the returned tensors in place.
    kw = {"rotations": True} if rotations else {}
    return get_fewshot_dataset(dataset, root, split, **kw)


@torch.no_grad()
def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std of uint8 ``[N, C, H, W]`` images scaled to ``[0, 1]``.

    From each channel's 256-bin histogram (``torch.bincount``), so no float copy of the images is made.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"channel_stats expects uint8 images, got {images.dtype}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(images.shape[1]):
        h = torch.bincount(images[:, c].reshape(-1), minlength=256).cpu().to(torch.float64)
        n = h.sum()
        m = (h * values).sum() / n
        v = (h * (values - m).square()).sum() / n
        mean.append(float(m))
        std.append(float(v.clamp_min(1e-12).sqrt()))
    return mean, std


# -- model ---------------------------------------------------------------------------------------
def build_fewshot_model(cfg: FewShotConfig, in_channels: int, image_size: int) -> FewShotClassifier:
    """Backbone ``cfg.backbone`` of layer kind ``cfg.layer`` and head ``cfg.head``."""
    kw = {}
    if cfg.predictor_width:
        kw["predictor_width"] = cfg.predictor_width
    if cfg.share_predictor:
        kw["share_predictor"] = True
    if cfg.predictor_norm != "batch":
        kw["predictor_norm"] = cfg.predictor_norm
    backbone = build_backbone(cfg.backbone, cfg.layer, in_channels, **kw)
    if cfg.head == "protonet":
        head: nn.Module = PrototypicalHead("euclidean")
    elif cfg.head == "protonet-cosine":
        head = PrototypicalHead("cosine")
    else:
        head = BilinearSimilarityHead(backbone.embedding_dim(image_size), rank=cfg.bilinear_rank or None,
                                      prototype_bias=True)
    return FewShotClassifier(backbone, head)


# -- checkpoints ---------------------------------------------------------------------------------
def load_fewshot_checkpoint(path: str | Path, resume: bool = False) -> dict:
    """Read a checkpoint written by ``nsl fewshot train`` (``weights_only=True``), its fields checked with the
    few-shot counters (``episode``, ``episodes``, ``best_episode``: :func:`nsl.train.run.check_checkpoint`);
    CheckpointError otherwise."""
    return load_checkpoint(path, CHECKPOINT_FORMAT, "a few-shot checkpoint (written by `nsl fewshot train`)",
                           (FewShotTask.unit, FewShotTask.total_key, FewShotTask.best_key), resume)


def _model_from_checkpoint(ckpt: dict, path) -> tuple[FewShotClassifier, FewShotConfig]:
    """The model of a few-shot checkpoint read from ``path`` (eval mode) and its config; CheckpointError naming
    the file when the saved config is invalid or the weights do not fit the model it describes."""
    return model_from_checkpoint(ckpt, path, FewShotConfig,
                                 lambda cfg, meta: build_fewshot_model(cfg, meta["in_channels"], meta["image_size"]))


# -- training ------------------------------------------------------------------------------------
_STRUCTURAL = ("dataset", "rotations", "backbone", "layer", "predictor_width", "share_predictor", "predictor_norm",
               "head", "bilinear_rank", "ways", "shots", "queries", "train_ways", "train_shots", "seed", "lr",
               "lr_step", "lr_gamma", "weight_decay", "val_seed", "val_episodes")


class FewShotTask(Task):
    """Episodic training of :func:`build_fewshot_model`'s classifier: step ``i`` is episode ``i`` of
    ``EpisodeSampler(train.labels, train_ways, train_shots, queries, seed=seed)``, loss and accuracy by
    :func:`~nsl.fewshot.protonet.episode_loss_and_accuracy`; validated on ``val_episodes`` fixed episodes of
    the val split (``val_acc`` selects ``best.pt``)."""

    unit, total_key, best_key, eval_kind, score_key = "episode", "episodes", "best_episode", "val", "val_acc"
    items, rate_digits, bar_unit = "episodes", 1, "ep"
    checkpoint_format = CHECKPOINT_FORMAT
    structural = _STRUCTURAL
    divergence_hint = "a lower lr or grad_clip"
    supports_distributed = False

    @property
    def chance_loss(self) -> float:
        """``ln(train_ways)``: the episode loss of a prediction that ignores the query."""
        return math.log(self.cfg.n_train_ways)

    def __init__(self, cfg: FewShotConfig):
        self.cfg = cfg
        self.eval_every = cfg.val_every
        self.name = f"{cfg.backbone}/{cfg.layer}"

    def load_checkpoint(self, path, resume: bool = False):
        return load_fewshot_checkpoint(path, resume)

    def setup(self, process: Process, ckpt: dict | None) -> None:
        cfg = self.cfg
        self.device = process.device
        train_ds = load_fewshot_split(cfg.dataset, cfg.data_dir, "train", cfg.rotations)
        val_ds = load_fewshot_split(cfg.dataset, cfg.data_dir, "val")
        # fail before any work if an episode cannot be drawn (the sampler's message names the class)
        self.sampler = EpisodeSampler(train_ds.labels, cfg.n_train_ways, cfg.n_train_shots, cfg.queries,
                                      cfg.episodes, cfg.seed)
        EpisodeSampler(val_ds.labels, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)
        if ckpt is not None:
            self.meta = ckpt["meta"]
        else:
            mean, std = channel_stats(train_ds.images)
            self.meta = {"in_channels": int(train_ds.images.shape[1]), "image_size": int(train_ds.images.shape[2]),
                         "mean": mean, "std": std, "train_classes": train_ds.n_classes,
                         "val_classes": val_ds.n_classes}
        self.train_ds, self.val_ds = train_ds.to(self.device), val_ds.to(self.device)
        self.total = cfg.episodes

    def build_model(self) -> nn.Module:
        return build_fewshot_model(self.cfg, self.meta["in_channels"], self.meta["image_size"]).to(self.device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def lr_factor(self, step: int) -> float:
        return self.cfg.lr_factor(step)

    def batches(self, step: int):
        while True:
            yield make_episode(self.train_ds.images, self.sampler.episode(step), device=self.device,
                               mean=self.meta["mean"], std=self.meta["std"])
            step += 1

    def loss(self, net, batch, autocast):
        xs, ys, xq, yq = batch
        with autocast():
            loss, acc = episode_loss_and_accuracy(net, xs, ys, xq, yq)
        return loss, {"acc": (acc.detach(), 1)}, 1

    def evaluate(self, model: nn.Module, autocast) -> dict:
        cfg = self.cfg
        with autocast():
            res = evaluate(model, self.val_ds, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, seed=cfg.val_seed,
                           device=self.device, mean=self.meta["mean"], std=self.meta["std"], progress=False)
        return {"val_acc": res.mean, "val_ci95": res.ci95, "val_episodes": res.n_episodes}

    def describe(self, params: int) -> str:
        cfg = self.cfg
        return (f"{cfg.backbone}/{cfg.layer} + {cfg.head} on {cfg.dataset} ({self.train_ds.n_classes} train "
                f"classes), {cfg.n_train_ways}-way {cfg.n_train_shots}-shot {cfg.queries}-query training episodes, "
                f"{params:,} parameters, {cfg.episodes} episodes")

    def eval_message(self, result: dict) -> str:
        return (f"val accuracy {100 * result['val_acc']:.2f} +- {100 * result['val_ci95']:.2f} % "
                f"({result['val_episodes']} episodes)")

    def summary(self, result: dict | None) -> dict:
        return {"val_acc": None if result is None else result["val_acc"],
                "val_ci95": None if result is None else result["val_ci95"]}


def train_fewshot(cfg: FewShotConfig, resume: bool = False, echo=print) -> dict:
    """Episodic training of ``cfg`` into run directory ``cfg.out``: :func:`nsl.train.fit` of a
    :class:`FewShotTask`; return a summary dict.

    Args:
        cfg: the resolved configuration (``cfg.out`` and ``cfg.data_dir`` set).
        resume: continue the run in ``cfg.out`` from ``checkpoints/last.pt`` (``episodes`` may be raised
            to extend a finished run; the settings in ``_STRUCTURAL`` must match the saved ones).
        echo: where messages go.

    Returns:
        ``{run_dir, episode, episodes, val_acc, val_ci95, best_acc, best_episode, params, seconds,
        train_seconds, episodes_per_s, stopped}`` (accuracies are fractions; ``episodes_per_s`` per second of
        training time).

    Raises:
        TrainingDiverged: the loss became NaN/inf (last.pt keeps the last good state).
        ConfigError, CheckpointError, DatasetError, ValueError: bad settings, run directory or data
        (e.g. more shots + queries than images in a class).
    """
    if not isinstance(cfg, FewShotConfig):
        raise TypeError(f"train_fewshot expects a FewShotConfig, got {type(cfg).__name__}")
    return fit(FewShotTask(cfg), cfg, resume=resume, echo=echo)


# -- evaluation ----------------------------------------------------------------------------------
def evaluate_fewshot_checkpoint(path: str | Path, n_way: int | None = None, k_shot: int | None = None,
                                n_query: int | None = None, n_episodes: int = 600, seed: int = 0,
                                split: str = "test", data_dir: str | None = None, device: str = "cpu",
                                progress: bool = False, dataset: FewShotDataset | None = None) -> dict:
    """Evaluate a few-shot checkpoint on ``n_episodes`` fixed episodes (seed ``seed``) of ``split``.

    ``n_way`` / ``k_shot`` / ``n_query`` default to the run's ``ways`` / ``shots`` / ``queries``;
    ``data_dir`` to the run's. Normalisation is the run's (train-split statistics).

    Returns:
        ``{checkpoint, dataset, split, backbone, layer, head, episode, ways, shots, queries, episodes,
        seed, mean, ci95, std, accuracies}``; ``accuracies`` is the list of per-episode accuracies
        (fractions), episode ``i`` being episode ``i`` of the seed, for paired comparisons.
    """
    ckpt = load_fewshot_checkpoint(path)
    model, cfg = _model_from_checkpoint(ckpt, path)
    n_way = cfg.ways if n_way is None else n_way
    if n_way < 2:
        raise ValueError(f"ways must be >= 2 (a 1-way episode has nothing to classify), got {n_way}")
    k_shot = cfg.shots if k_shot is None else k_shot
    n_query = cfg.queries if n_query is None else n_query
    dev = resolve_device(str(device))  # ConfigError naming device: cuda without CUDA
    if dataset is None:
        dataset = load_fewshot_split(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir, split)
        dataset = dataset.to(dev)
    meta = ckpt["meta"]
    if tuple(dataset.images.shape[1:3]) != (meta["in_channels"], meta["image_size"]):
        raise ValueError(f"the checkpoint was trained on {meta['in_channels']}-channel {meta['image_size']}-pixel "
                         f"images, {dataset.name} has shape {tuple(dataset.images.shape[1:])}")
    res = evaluate(model.to(dev), dataset, n_way, k_shot, n_query, n_episodes, seed=seed, device=dev,
                   mean=meta["mean"], std=meta["std"], progress=progress)
    return {"checkpoint": str(path), "dataset": cfg.dataset, "split": split, "backbone": cfg.backbone,
            "layer": cfg.layer, "head": cfg.head, "episode": int(ckpt["episode"]), "ways": n_way, "shots": k_shot,
            "queries": n_query, "episodes": n_episodes, "seed": seed, "mean": res.mean, "ci95": res.ci95,
            "std": res.std, "accuracies": res.accuracies.tolist()}


def compare_results(a: dict, b: dict) -> dict:
    """Paired difference ``a - b`` of two results of :func:`evaluate_fewshot_checkpoint` on the same episodes.

    Returns ``{mean_diff, ci95, std, episodes, wins, losses, ties}``: ``mean_diff`` is the mean of the
    per-episode differences and ``ci95 = 1.96 * std(diff) / sqrt(episodes)`` its 95% half-width.
    """
    keys = ("dataset", "split", "ways", "shots", "queries", "episodes", "seed")
    diff_keys = [k for k in keys if a[k] != b[k]]
    if diff_keys:
        raise ValueError("the two evaluations did not use the same episodes: they differ in " + ", ".join(
            f"{k} ({a[k]!r} vs {b[k]!r})" for k in diff_keys))
    d = np.asarray(a["accuracies"], dtype=np.float64) - np.asarray(b["accuracies"], dtype=np.float64)
    m, ci = confidence_interval(d)
    return {"mean_diff": m, "ci95": ci, "std": float(d.std(ddof=0)), "episodes": len(d),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}

