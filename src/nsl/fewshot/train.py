"""Episodic training and evaluation of few-shot classifiers (Prototypical Networks and NSL).

Same run-directory layout and checkpoint discipline as :mod:`nsl.train.engine`::

    RUN_DIR/config.json             the resolved FewShotConfig
    RUN_DIR/metrics.jsonl           one JSON object per logged episode window ("kind": "train") or
                                    validation ("kind": "val")
    RUN_DIR/checkpoints/last.pt     latest state: model, optimizer, RNG, episode counter
    RUN_DIR/checkpoints/best.pt     the same, at the best validation accuracy so far

Checkpoints are written atomically (``nsl.train.engine.atomic_save``) and read with
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

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..models import LAYER_KINDS
from ..train.config import ConfigError, apply_overrides, check_keys
from ..train.engine import (
    TrainingDiverged,
    atomic_save,
    load_checkpoint,
    open_run,
    resolve_device,
    rng_state,
    set_rng_state,
    start_run_files,
)
from .data import FEWSHOT_DATASETS, FewShotDataset, get_fewshot_dataset
from .models import BACKBONES, build_backbone
from .protonet import (
    BilinearSimilarityHead,
    EvalResult,
    FewShotClassifier,
    PrototypicalHead,
    confidence_interval,
    episode_loss_and_accuracy,
    evaluate,
)
from .sampler import EpisodeSampler, make_episode

__all__ = ["FEWSHOT_HEADS", "FewShotConfig", "apply_fewshot_overrides", "build_fewshot_model",
           "channel_stats", "compare_results", "evaluate_fewshot_checkpoint", "load_fewshot_checkpoint",
           "load_fewshot_split", "train_fewshot"]

CHECKPOINT_FORMAT = "nsl-fewshot"
CHECKPOINT_VERSION = 1
#: Episode heads: ``protonet`` (squared Euclidean), ``protonet-cosine`` (cosine, learnable scale),
#: ``bilinear`` (``q^T M p - p^T M p / 2``, M learned, starting as ProtoNet).
FEWSHOT_HEADS = ("protonet", "protonet-cosine", "bilinear")


@dataclass
class FewShotConfig:
    """Everything an episodic training run depends on.

    Data: ``dataset`` (``cifar-fs``, ``fc100``, ``omniglot``, ``mini-imagenet``), ``data_dir``,
    ``rotations`` (Omniglot: 90/180/270-degree rotated characters as extra classes, train split only).
    Normalisation: per-channel mean / std computed from the train split's pixels (scaled to [0, 1]),
    stored in the checkpoint and reused by evaluation.

    Model: ``backbone`` (``conv4``, ``resnet12``), ``layer`` (any NSL layer kind), ``head``
    (:data:`FEWSHOT_HEADS`), ``bilinear_rank`` (``0``: full ``M``).

    Episodes: ``ways`` / ``shots`` / ``queries`` (validation and default evaluation shape);
    ``train_ways`` (``0``: same as ``ways``; Snell et al. train with more, e.g. 20 or 30),
    ``train_shots`` (``0``: same as ``shots``); ``episodes`` training episodes.

    Optimisation: Adam (``lr``, ``weight_decay``), lr multiplied by ``lr_gamma`` every ``lr_step``
    episodes (Snell et al.: 1e-3, halved every 2000 episodes); ``grad_clip`` (0: off).

    Validation: every ``val_every`` episodes (and at the end) on ``val_episodes`` fixed episodes of
    the val split (seed ``val_seed``); ``best.pt`` keeps the best. ``checkpoint_every``: extra
    ``last.pt`` saves. ``log_every``: episodes per metrics.jsonl train record.
    """

    dataset: str = "cifar-fs"
    data_dir: str | None = None
    rotations: bool = False
    backbone: str = "conv4"
    layer: str = "conv"
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
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    @property
    def n_train_ways(self) -> int:
        return self.train_ways or self.ways

    @property
    def n_train_shots(self) -> int:
        return self.train_shots or self.shots

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FewShotConfig:
        check_keys(cls, d)
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`~nsl.train.ConfigError` for values out of range or unknown choices."""
        key = str(self.dataset).lower().replace("_", "-")
        if key not in FEWSHOT_DATASETS:
            raise ConfigError(f"unknown few-shot dataset {self.dataset!r}; valid names: {', '.join(FEWSHOT_DATASETS)}")
        self.dataset = key
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; valid backbones: {', '.join(BACKBONES)}")
        if self.layer not in LAYER_KINDS:
            raise ConfigError(f"unknown layer kind {self.layer!r}; valid kinds: {', '.join(LAYER_KINDS)}")
        if self.head not in FEWSHOT_HEADS:
            raise ConfigError(f"unknown head {self.head!r}; valid heads: {', '.join(FEWSHOT_HEADS)}")
        for name in ("ways", "shots", "queries", "episodes", "val_episodes", "lr_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_ways", "train_shots", "val_every", "checkpoint_every", "log_every", "seed", "val_seed",
                     "bilinear_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
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
        raise ConfigError(f"{dataset} needs --data-dir (the folder holding its files)")
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
    backbone = build_backbone(cfg.backbone, cfg.layer, in_channels)
    if cfg.head == "protonet":
        head: nn.Module = PrototypicalHead("euclidean")
    elif cfg.head == "protonet-cosine":
        head = PrototypicalHead("cosine")
    else:
        head = BilinearSimilarityHead(backbone.embedding_dim(image_size), rank=cfg.bilinear_rank or None,
                                      prototype_bias=True)
    return FewShotClassifier(backbone, head)


# -- checkpoints ---------------------------------------------------------------------------------
def load_fewshot_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``nsl fewshot train`` (``weights_only=True``); CheckpointError otherwise."""
    return load_checkpoint(path, CHECKPOINT_FORMAT, "a few-shot checkpoint (written by `nsl fewshot train`)")


def _model_from_checkpoint(ckpt: dict) -> tuple[FewShotClassifier, FewShotConfig]:
    cfg = FewShotConfig.from_dict(ckpt["config"])
    meta = ckpt["meta"]
    model = build_fewshot_model(cfg, meta["in_channels"], meta["image_size"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


# -- training ------------------------------------------------------------------------------------
_STRUCTURAL = ("dataset", "rotations", "backbone", "layer", "head", "bilinear_rank", "ways", "shots", "queries",
               "train_ways", "train_shots", "seed", "lr", "lr_step", "lr_gamma", "weight_decay", "val_seed",
               "val_episodes")


def train_fewshot(cfg: FewShotConfig, resume: bool = False, echo=print) -> dict:
    """Episodic training of ``cfg`` into run directory ``cfg.out``; return a summary dict.

    Args:
        cfg: the resolved configuration (``cfg.out`` and ``cfg.data_dir`` set).
        resume: continue the run in ``cfg.out`` from ``checkpoints/last.pt`` (``episodes`` may be raised
            to extend a finished run; the settings in ``_STRUCTURAL`` must match the saved ones).
        echo: where messages go.

    Returns:
        ``{run_dir, episode, episodes, val_acc, val_ci95, best_acc, best_episode, params, seconds,
        episodes_per_s}`` (accuracies are fractions).

    Raises:
        TrainingDiverged: the loss became NaN/inf (last.pt keeps the last good state).
        ConfigError, CheckpointError, DatasetError, ValueError: bad settings, run directory or data
        (e.g. more shots + queries than images in a class).
    """
    from tqdm import tqdm

    if not cfg.out:
        raise ConfigError("set the run directory (--out RUN_DIR)")
    cfg.validate()
    run_dir = Path(cfg.out).expanduser()
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    device = resolve_device(cfg, 0)

    ckpt = open_run(cfg, run_dir, last_path, resume, _STRUCTURAL, load=load_fewshot_checkpoint)

    train_ds = load_fewshot_split(cfg.dataset, cfg.data_dir, "train", cfg.rotations)
    val_ds = load_fewshot_split(cfg.dataset, cfg.data_dir, "val")
    # fail before any work if an episode cannot be drawn (the sampler's message names the class)
    sampler = EpisodeSampler(train_ds.labels, cfg.n_train_ways, cfg.n_train_shots, cfg.queries, cfg.episodes,
                             cfg.seed)
    EpisodeSampler(val_ds.labels, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, cfg.val_seed)
    if ckpt is not None:
        meta = ckpt["meta"]
    else:
        mean, std = channel_stats(train_ds.images)
        meta = {"in_channels": int(train_ds.images.shape[1]), "image_size": int(train_ds.images.shape[2]),
                "mean": mean, "std": std, "train_classes": train_ds.n_classes, "val_classes": val_ds.n_classes}
    train_ds, val_ds = train_ds.to(device), val_ds.to(device)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_fewshot_model(cfg, meta["in_channels"], meta["image_size"]).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best_acc, best_step = 0, -1.0, -1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        step, best_acc, best_step = int(ckpt["episode"]), float(ckpt["best_acc"]), int(ckpt["best_episode"])
        if step >= cfg.episodes:
            echo(f"the run in {run_dir} is already complete ({step} of {cfg.episodes} episodes)")

    metrics_path = start_run_files(run_dir, cfg, ckpt, step, "episode")

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(path: Path) -> None:
        atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "episode": step,
                      "episodes": cfg.episodes, "config": cfg.to_dict(), "meta": meta, "model": model.state_dict(),
                      "optimizer": opt.state_dict(), "rng": rng_state(), "best_acc": best_acc,
                      "best_episode": best_step, "params": params}, path)

    def validate() -> EvalResult:
        return evaluate(model, val_ds, cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes, seed=cfg.val_seed,
                        device=device, mean=meta["mean"], std=meta["std"], progress=False)

    echo(f"run {run_dir}: {cfg.backbone}/{cfg.layer} + {cfg.head} on {cfg.dataset} ({train_ds.n_classes} train "
         f"classes), {cfg.n_train_ways}-way {cfg.n_train_shots}-shot {cfg.queries}-query training episodes, "
         f"{params:,} parameters, {cfg.episodes} episodes, device {device}"
         + (f", resuming at episode {step}" if ckpt else ""))
    bar = tqdm(total=cfg.episodes, initial=min(step, cfg.episodes), disable=not cfg.progress, unit="ep",
               dynamic_ncols=True, desc=f"{cfg.backbone}/{cfg.layer}")
    model.train()
    window = {"loss": 0.0, "acc": 0.0, "n": 0, "t": time.perf_counter()}
    ema_loss = ema_acc = None
    t_start, done, last_val = time.perf_counter(), 0, None
    try:
        while step < cfg.episodes:
            f = cfg.lr_factor(step)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f
            xs, ys, xq, yq = make_episode(train_ds.images, sampler.episode(step), device=device, mean=meta["mean"],
                                          std=meta["std"])
            loss, acc = episode_loss_and_accuracy(model, xs, ys, xq, yq)
            lv = loss.item()
            if not math.isfinite(lv):
                kept = f"{last_path} (episode {torch.load(last_path, weights_only=True)['episode']})" \
                    if last_path.exists() else "none (no checkpoint was written yet)"
                raise TrainingDiverged(f"loss became {lv} at episode {step + 1} (lr {cfg.lr * f:g}); stopped. Last "
                                       f"good checkpoint: {kept}. Try a lower lr or grad_clip.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            done += 1
            av = acc.item()
            window["loss"] += lv
            window["acc"] += av
            window["n"] += 1
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            ema_acc = av if ema_acc is None else 0.95 * ema_acc + 0.05 * av
            elapsed = time.perf_counter() - t_start
            bar.update(1)
            if cfg.progress:
                bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", ep_s=f"{done / max(elapsed, 1e-9):.1f}",
                                refresh=False)
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.episodes):
                dt = time.perf_counter() - window["t"]
                log({"kind": "train", "episode": step, "loss": window["loss"] / window["n"],
                     "acc": window["acc"] / window["n"], "lr": cfg.lr * f,
                     "episodes_per_s": window["n"] / max(dt, 1e-9), "time": round(elapsed, 3)})
                window = {"loss": 0.0, "acc": 0.0, "n": 0, "t": time.perf_counter()}
            validated = False
            if step == cfg.episodes or (cfg.val_every and step % cfg.val_every == 0):
                last_val = validate()
                validated = True
                log({"kind": "val", "episode": step, "val_acc": last_val.mean, "val_ci95": last_val.ci95,
                     "val_episodes": last_val.n_episodes, "time": round(time.perf_counter() - t_start, 3)})
                if cfg.progress:
                    bar.write(f"episode {step}: val acc {last_val}")
                if last_val.mean > best_acc:
                    best_acc, best_step = last_val.mean, step
                    save(best_path)
            if validated or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save(last_path)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    if last_val is None and ckpt is not None:
        last_val = validate()
    summary = {"run_dir": str(run_dir), "episode": step, "episodes": cfg.episodes, "params": params,
               "seconds": round(seconds, 3), "episodes_per_s": done / max(seconds, 1e-9), "best_acc": best_acc,
               "best_episode": best_step, "val_acc": None if last_val is None else last_val.mean,
               "val_ci95": None if last_val is None else last_val.ci95}
    if last_val is not None:
        echo(f"done: episode {step}, val accuracy {last_val} (best {100 * best_acc:.2f}% at episode {best_step}), "
             f"{summary['episodes_per_s']:.1f} episodes/s")
    return summary


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
    model, cfg = _model_from_checkpoint(ckpt)
    n_way = cfg.ways if n_way is None else n_way
    k_shot = cfg.shots if k_shot is None else k_shot
    n_query = cfg.queries if n_query is None else n_query
    dev = torch.device(device)
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

