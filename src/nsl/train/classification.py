"""The classification task of :func:`nsl.train.fit`: image classifiers (CNN-9, ResNets, ...) on tensor
datasets or ImageFolder trees, trained by :func:`train` and evaluated by :func:`evaluate_checkpoint`.

Checkpoints (format ``nsl-train``) hold ``step``, ``iters``, ``config``, ``meta`` (``num_classes``,
``in_channels``, ``image_size``, ``mean``, ``std``), ``model``, ``optimizer``, ``scheduler``,
``loader`` (one state per rank), ``rng``, ``best_acc``, ``best_step``, ``world_size``, ``params`` and,
when used, ``shape`` (kernel-shape gates' optimizer) and ``scaler`` (fp16). Resuming restores
everything the next step depends on, so on the CPU a resumed run ends with bit-identical weights
to an uninterrupted one. With DDP, ``batch_size`` is per rank and each rank trains its shard.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import DatasetError, GPULoader, TensorImageDataset, dataset_info, get_dataset, imagefolder_loader
from ..data.imagefolder import class_folders
from ..layers import NSConv2d
from ..models import build_model
from ..regularizers import orthogonality_penalty
from .config import ConfigError, TrainConfig
from .loop import Task, fit
from .optim import batch_norms, build_optimizer, lr_factor, orthogonality_filters, recalibrate_bn, set_bn_momentum
from .run import Process, load_checkpoint, model_from_checkpoint, resolve_device
from .shaping import KernelShapeSchedule

__all__ = ["ClassificationTask", "train", "evaluate", "evaluate_checkpoint", "load_data", "build_model_for",
           "build_from_checkpoint", "STRUCTURAL"]

#: TrainConfig fields a resumed run must keep
STRUCTURAL = ("dataset", "model", "layer", "width", "predictor_width", "share_predictor", "predictor_norm",
              "predictor_stride", "share_prediction", "bias",
              "paper_init", "train_subset", "batch_size", "seed", "bn_eps", "input", "shape_active", "shape_method",
              "shape_per_filter",
              "optimizer", "decay_bn")  # another optimizer's state, or other parameter groups, cannot be continued


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_ctx=nullcontext) -> dict:
    """Test accuracy and mean cross-entropy (summed over ranks when distributed)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        with amp_ctx():
            out = model(x)
        stats[0] += (out.argmax(1) == y).sum()
        stats[1] += F.cross_entropy(out.float(), y, reduction="sum")
        stats[2] += len(y)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    model.train(was_training)
    n = max(1.0, stats[2].item())
    return {"test_acc": stats[0].item() / n, "test_loss": stats[1].item() / n, "test_samples": int(stats[2].item())}


# -- data ----------------------------------------------------------------------------------------
def _split_dir(root, split: str) -> Path:
    """``root/train`` for training; ``root/val`` (or ``root/test``) for testing; else ``root`` itself."""
    root = Path(root).expanduser()
    for cand in (("train",) if split == "train" else ("val", "test")):
        if (root / cand).is_dir():
            return root / cand
    return root


class _StreamLoader:
    """ImageFolder batches through DataLoader workers, with an epoch/position state for resuming.

    Each epoch's loader is built with seed ``seed + epoch``, so its order depends only on the
    epoch; resuming skips the batches already consumed in the current epoch.
    """

    def __init__(self, root, cfg: TrainConfig, rank: int, world_size: int):
        self.root, self.cfg, self.rank, self.world_size = root, cfg, rank, world_size
        self.epoch, self.position = 0, 0
        self._len = len(self._loader(0))

    def _loader(self, epoch):
        c = self.cfg
        return imagefolder_loader(_split_dir(self.root, "train"), c.batch_size, train=True,
                                  image_size=c.image_size,
                                  num_workers=c.num_workers, seed=c.seed + epoch, rank=self.rank,
                                  world_size=self.world_size)

    def __len__(self):
        return self._len

    def __iter__(self):
        loader = self._loader(self.epoch)
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(self.epoch)
        for i, batch in enumerate(loader):
            if i < self.position:
                continue
            self.position = i + 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _ToDevice:
    def __init__(self, loader, device, channels_last):
        self.loader, self.device, self.channels_last = loader, device, channels_last

    def __iter__(self):
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def _subset(ds: TensorImageDataset, n: int, seed: int | None, field: str) -> TensorImageDataset:
    """``n`` samples of ``ds`` (``0``: all): a seeded random subset (``seed``) or the first ``n``. A subset
    larger than the data is a ConfigError naming config field ``field`` (it would be recorded as asked)."""
    if n > len(ds):
        raise ConfigError(f"{{{field}}} {n} is larger than the {len(ds)} samples of the {ds.name or 'dataset'} "
                          f"{'training' if field == 'train_subset' else 'test'} split; use at most {len(ds)} "
                          "(0: all)", field)
    if not n or n == len(ds):
        return ds
    if seed is None:
        return ds.subset(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=g)[:n])


def _check_classes(n: int, what: str) -> None:
    if n < 2:
        raise DatasetError(f"{what} has {n} class{'' if n == 1 else 'es'}; classification needs at least 2 "
                           "(a one-class set would score 100% while learning nothing)")


def _check_folder_classes(train_dir: Path, test_dir: Path) -> None:
    """The training and evaluation image folders must name the same classes (labels are positions in the
    sorted class list, so another set would silently mislabel every evaluation image)."""
    if not (train_dir.is_dir() and test_dir.is_dir()) or train_dir == test_dir:
        return  # the data layer names a missing folder
    train, test = class_folders(train_dir), class_folders(test_dir)
    _check_classes(len(train), f"image folder {train_dir}")
    if train != test:
        missing, extra = sorted(set(train) - set(test)), sorted(set(test) - set(train))

        def show(names):
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        parts = ([f"{len(missing)} missing there ({show(missing)})"] if missing else []) + \
                ([f"{len(extra)} not in the training folder ({show(extra)})"] if extra else [])
        raise DatasetError(f"image folder {test_dir} does not have the classes of {train_dir}: "
                           f"{'; '.join(parts)}; both need the same class subfolders")


def load_data(cfg: TrainConfig, device, rank: int = 0, world_size: int = 1, train_split: bool = True):
    """``(train_loader or None, test_loader, meta)`` for ``cfg``; meta has num_classes, in_channels,
    image_size, mean, std."""
    info = dataset_info(cfg.dataset)
    if info.name == "imagefolder":
        if cfg.data_dir is None:
            raise ConfigError("imagefolder needs {data_dir}, the folder with train/ and val/ class folders", "data_dir")
        if train_split:
            _check_folder_classes(_split_dir(cfg.data_dir, "train"), _split_dir(cfg.data_dir, "test"))
        train_loader = _StreamLoader(cfg.data_dir, cfg, rank, world_size) if train_split else None
        test = imagefolder_loader(_split_dir(cfg.data_dir, "test"), cfg.eval_batch_size, train=False,
                                  image_size=cfg.image_size,
                                  num_workers=cfg.num_workers, rank=rank, world_size=world_size, drop_last=False)
        classes = test.dataset.classes
        meta = dict(num_classes=len(classes), in_channels=3, image_size=cfg.image_size, mean=None, std=None)
        train_loader = _ToDevice(train_loader, device, cfg.channels_last) if train_split else None
        return train_loader, _ToDevice(test, device, cfg.channels_last), meta
    if info.name != "digits" and cfg.data_dir is None:
        raise ConfigError(f"{info.name} needs {{data_dir}} (the folder holding its files)", "data_dir")
    mean, std = info.mean, info.std
    common = dict(output=cfg.input, mean=mean, std=std, channels_last=cfg.channels_last, device=device,
                  rank=rank, world_size=world_size)
    train_loader = None
    if train_split:
        train = _subset(get_dataset(info.name, cfg.data_dir, "train"), cfg.train_subset, 0, "train_subset")
        _check_classes(int(torch.unique(train.labels).numel()), f"the training set of {info.name}")
        train_loader = GPULoader(train, cfg.batch_size, shuffle=True, drop_last=True, augment=cfg.augment,
                                 padding=cfg.pad, flip=cfg.flip, seed=cfg.seed, **common)
    test = _subset(get_dataset(info.name, cfg.data_dir, "test"), cfg.test_subset, 1, "test_subset")
    test_loader = GPULoader(test, cfg.eval_batch_size, shuffle=False, augment=False, even_shards=False, **common)
    c, h, _ = test.image_shape
    meta = dict(num_classes=len(test.classes) if test.classes else info.num_classes, in_channels=c, image_size=h,
                mean=list(mean), std=list(std))
    return train_loader, test_loader, meta



# -- model ---------------------------------------------------------------------------------------
def build_from_checkpoint(ckpt: dict, path: str | Path | None = None) -> tuple[nn.Module, TrainConfig]:
    """The model of a checkpoint with its weights loaded (on the CPU, eval mode), and its config.

    :class:`CheckpointError` naming ``path`` (the file ``ckpt`` was read from) when its saved config is
    invalid or its weights do not fit the model that config describes."""
    return model_from_checkpoint(ckpt, path if path is not None else "the checkpoint", TrainConfig, build_model_for)


def build_model_for(cfg: TrainConfig, meta: dict) -> nn.Module:
    """The model of ``cfg`` (model, layer, width, inits, BN settings, kernel-shape gates) for data described
    by ``meta`` (``num_classes``, ``in_channels``, ``image_size``), freshly initialised on the CPU."""
    kw = dict(paper=cfg.paper_init, bn_eps=cfg.bn_eps)
    if cfg.model in ("cnn9", "sphere-attention"):
        kw["image_size"] = meta["image_size"]
    if cfg.model == "sphere-attention":
        kw["raw_input"] = cfg.input == "raw"  # the authors' (x - 127.5) / 128 on raw pixels
    if cfg.width:
        kw["width"] = cfg.width
    if cfg.predictor_width:
        kw["predictor_width"] = cfg.predictor_width
    if cfg.share_predictor:
        kw["share_predictor"] = True
    if cfg.predictor_norm != "batch":
        kw["predictor_norm"] = cfg.predictor_norm
    if cfg.predictor_stride != 1:
        kw["predictor_stride"] = cfg.predictor_stride
    if cfg.share_prediction:
        kw["share_prediction"] = True
    if not cfg.bias:
        kw["bias"] = False
    model = build_model(cfg.model, cfg.layer, meta["num_classes"], meta["in_channels"], **kw)
    KernelShapeSchedule.attach(cfg, model)
    set_bn_momentum(model, cfg.bn_momentum)
    if cfg.bn_zero_init:  # TensorFlow's moving mean and variance both start at zero
        for m in batch_norms(model):
            m.running_var.zero_()
    return model



# -- the task ------------------------------------------------------------------------------------
class ClassificationTask(Task):
    """Image classification with cross-entropy (``label_smoothing``), the optional orthogonality penalty and
    kernel-shape schedule of ``cfg``; evaluated by test accuracy and loss (``test_acc`` selects ``best.pt``)."""

    unit, total_key, best_key, eval_kind, score_key = "step", "iters", "best_step", "eval", "test_acc"
    items, rate_digits, bar_unit = "images", 0, "it"
    checkpoint_format = "nsl-train"
    structural = STRUCTURAL
    divergence_hint = "a lower lr, warmup_iters, or grad_clip"

    @property
    def chance_loss(self) -> float | None:
        """``ln(num_classes)``: the cross-entropy of a uniform prediction (set once ``setup`` has run)."""
        classes = getattr(self, "meta", {}).get("num_classes", 0)
        return math.log(classes) if classes > 1 else None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.eval_every = cfg.eval_every
        self.name = f"{cfg.model}/{cfg.layer}"
        self.shaper = None

    def load_checkpoint(self, path, resume: bool = False):
        return load_checkpoint(path, resume=resume)

    def setup(self, process: Process, ckpt: dict | None) -> None:
        cfg = self.cfg
        self.process = process
        self.train_loader, self.test_loader, self.meta = load_data(cfg, process.device, process.rank,
                                                                   process.world_size)
        self.total = cfg.iters if cfg.iters is not None else max(1, math.ceil(cfg.epochs * len(self.train_loader)))

    def build_model(self) -> nn.Module:
        model = build_model_for(self.cfg, self.meta).to(self.process.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg)

    def attach(self, model: nn.Module, optimizer) -> None:
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.shaper = KernelShapeSchedule(self.cfg, model, self.total) if self.cfg.shape_active else None
        self.orth_filters = orthogonality_filters(model) if self.cfg.orthogonality else None

    def lr_factor(self, step: int) -> float:
        return lr_factor(self.cfg, step, self.total)

    def batches(self, step: int):
        empty = 0  # passes in a row that yielded nothing (a resumed epoch may end at once: allow one)
        while True:
            empty += 1
            for batch in self.train_loader:
                empty = 0
                yield batch
            if empty >= 2:  # whatever the loader, an epoch without a batch would make the loop spin forever
                raise DatasetError(f"the training data of {self.cfg.dataset} yields no batch of {self.cfg.batch_size} "
                                   "in an epoch (fewer samples than one batch, per process); lower batch_size")

    def before_step(self, step: int) -> None:
        self._step = step
        if self.shaper is not None:
            self.shaper.before_step(step)

    def loss(self, net, batch, autocast):
        x, y = batch
        with autocast():
            out = net(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=self.cfg.label_smoothing)
        stats = {}
        if self.orth_filters is not None:  # "loss" (in metrics.jsonl too) includes it; "orth" is its value
            orth = orthogonality_penalty(self.orth_filters, self.cfg.orthogonality)
            loss = loss + orth
            stats["orth"] = (orth.detach(), 1)
        shape_term = self.shaper.loss(self._step) if self.shaper is not None else None
        if shape_term is not None:  # the kernel-shape budget penalty (learned shapes), also in "loss"
            loss = loss + shape_term
        stats = {"acc": ((out.detach().argmax(1) == y).sum(), len(y)), **stats}
        return loss, stats, len(y)

    def after_step(self, step: int) -> None:
        if self.shaper is not None:
            self.shaper.step(step)

    def evaluate(self, model: nn.Module, autocast) -> dict:
        cfg, p = self.cfg, self.process
        if cfg.bn_recalibrate:
            train_loader = self.train_loader
            recal = GPULoader(train_loader.data, cfg.batch_size, shuffle=True, drop_last=True, augment=False,
                              output=cfg.input, mean=self.meta["mean"], std=self.meta["std"],
                              channels_last=cfg.channels_last, seed=cfg.seed + 1, rank=p.rank,
                              world_size=p.world_size) \
                if isinstance(train_loader, GPULoader) else \
                _ToDevice(_StreamLoader(cfg.data_dir, cfg, p.rank, p.world_size), p.device, cfg.channels_last)
            batches = (b for _, b in zip(range(cfg.bn_recalibrate), recal))
            with autocast():
                recalibrate_bn(model, batches)
            if p.distributed:
                for b in model.buffers():
                    dist.broadcast(b, 0)
        return evaluate(model, self.test_loader, p.device, autocast)

    def record_extras(self) -> dict:
        return {"active": self.shaper.active_fraction()} if self.shaper is not None else {}

    def loader_state(self):
        return self.train_loader.state_dict()

    def load_loader_state(self, state) -> None:
        self.train_loader.load_state_dict(state)

    def state_dict(self, step: int) -> dict:
        state = {"scheduler": {"schedule": self.cfg.schedule, "step": step, "base_lrs": self.base_lrs}}
        if self.shaper is not None:
            state["shape"] = self.shaper.state_dict()
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        if self.shaper is not None:
            self.shaper.load_state_dict(ckpt["shape"])

    def describe(self, params: int) -> str:
        cfg, p = self.cfg, self.process
        return (f"{cfg.model} / {cfg.layer} on {cfg.dataset} ({len(self.train_loader)} batches of {cfg.batch_size} "
                f"per epoch{f' per rank, {p.world_size} ranks' if p.distributed else ''}), {params:,} parameters, "
                f"{self.total} steps, protocol {cfg.protocol}")

    def eval_message(self, result: dict) -> str:
        return f"test accuracy {100 * result['test_acc']:.2f}%"


def train(cfg: TrainConfig, resume: bool = False, echo=print) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` into run directory ``cfg.out``: :func:`nsl.train.fit` of a
    :class:`ClassificationTask`; return the summary dict.

    Args:
        cfg: the resolved configuration (``cfg.out`` must be set).
        resume: continue the run in ``cfg.out`` from ``checkpoints/last.pt``. Settings that define
            the run (:data:`STRUCTURAL`: dataset, model, layer, batch size, seed, ...) must match the saved ones.
        echo: where messages go (rank 0 only).

    Returns:
        ``{run_dir, step, iters, test_acc, test_loss, test_samples, best_acc, best_step, params, seconds,
        train_seconds, images_per_s, stopped}`` (``images_per_s``: trained images per second of training time).

    Raises:
        TrainingDiverged: the loss became NaN/inf (last.pt keeps the last good state).
        ConfigError, CheckpointError, DatasetError: bad settings, run directory or data.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train expects a TrainConfig, got {type(cfg).__name__}")
    return fit(ClassificationTask(cfg), cfg, resume=resume, echo=echo)


# -- evaluation of a checkpoint ------------------------------------------------------------------
def evaluate_checkpoint(path: str | Path, data_dir: str | None = None, fold: bool = False, device: str = "cpu",
                        batch_size: int | None = None) -> dict:
    """Test accuracy of a checkpoint's model (``fold``: of the folded model, and of the unfolded one).

    Returns ``{test_acc, test_loss, test_samples, step, model, layer, dataset}`` and, with ``fold``,
    ``unfolded_acc``, ``fold_matches`` (equal accuracies), ``folded_static_layers`` and
    ``max_abs_logit_diff`` (over the first test batch).
    """
    from ..convert import fold as fold_model

    dev = resolve_device(str(device))  # ConfigError naming device: cuda without CUDA
    ckpt = load_checkpoint(path)
    model, cfg = build_from_checkpoint(ckpt, path)
    if data_dir is not None:
        cfg.data_dir = str(data_dir)
    if batch_size:
        cfg.eval_batch_size = batch_size
    cfg.channels_last = False
    _, test_loader, _ = load_data(cfg, dev, train_split=False)
    model = model.to(dev)
    result = {"step": ckpt["step"], "model": cfg.model, "layer": cfg.layer, "dataset": cfg.dataset}
    if fold:
        n_static = sum(isinstance(m, NSConv2d) for m in model.modules())
        folded = fold_model(model).eval()
        plain = evaluate(model, test_loader, dev)
        res = evaluate(folded, test_loader, dev)
        diff = 0.0
        with torch.no_grad():
            for x, _ in test_loader:
                diff = max(diff, (folded(x) - model(x)).abs().max().item())
                break
        result.update(res, unfolded_acc=plain["test_acc"], folded_static_layers=n_static, max_abs_logit_diff=diff,
                      fold_matches=res["test_acc"] == plain["test_acc"])
    else:
        result.update(evaluate(model, test_loader, dev))
    return result
