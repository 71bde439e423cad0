"""The training loop shared by every model and dataset: :func:`train` and :func:`evaluate_checkpoint`.

Run directory layout::

    RUN_DIR/config.json             the resolved TrainConfig (every departure from a protocol is here)
    RUN_DIR/metrics.jsonl           one JSON object per logged step ("kind": "train") or evaluation ("eval")
    RUN_DIR/checkpoints/last.pt     latest state: model, optimizer, schedule, RNG and loader state, step
    RUN_DIR/checkpoints/best.pt     the same, at the best test accuracy so far

Checkpoints are written atomically (temporary file, fsync, ``os.replace``) and read with
``torch.load(weights_only=True)``. Resuming restores everything the next step depends on, so on
the CPU a resumed run ends with bit-identical weights to an uninterrupted one.

Data parallel: launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment) the loop
initialises ``torch.distributed`` (nccl on CUDA, gloo on CPU), wraps the model in
``DistributedDataParallel``, gives each rank its shard of every epoch, reduces losses and test
metrics across ranks, and only rank 0 writes files. ``batch_size`` is per rank.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import GPULoader, TensorImageDataset, dataset_info, get_dataset, imagefolder_loader
from ..layers import NSConv2d
from ..models import build_model, count_parameters
from ..regularizers import ORTHOGONALITY_TYPES, orthogonality_penalty
from ..shape import KernelShapeGate
from .config import ConfigError, TrainConfig
from .shaping import KernelShapeSchedule

__all__ = ["train", "TrainingDiverged", "CheckpointError", "load_checkpoint", "evaluate_checkpoint",
           "lr_factor", "param_groups", "recalibrate_bn", "evaluate", "build_from_checkpoint", "orthogonality_filters",
           "build_model_for", "atomic_save", "rng_state", "set_rng_state", "resolve_device", "load_data", "open_run",
           "start_run_files"]

CHECKPOINT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an nsl training checkpoint."""


# -- schedule and optimiser -----------------------------------------------------------------------
def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if cfg.schedule == "multistep":
        f = cfg.lr_gamma ** sum(step >= round(m * total) for m in cfg.lr_milestones)
    elif cfg.schedule == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * step / total))
    elif cfg.schedule == "onecycle":
        warm = max(1, round(cfg.onecycle_pct * total))
        if step < warm:
            f = (step + 1) / warm
        else:
            f = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    else:
        f = 1.0
    if cfg.warmup_iters and step < cfg.warmup_iters:
        f *= (step + 1) / cfg.warmup_iters
    return f


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups with the protocol's weight decay: static diagonal ``M`` (``wd_static_diagonal``),
    static full ``M`` (``wd_static_full``), BN parameters and biases (``weight_decay`` if
    ``decay_bn`` else 0), the parameters named by ``model.no_weight_decay()`` if the model defines it
    (0; e.g. the cosine filters of ``sphere-attention``, as the authors) and everything else (``weight_decay``).
    The logits of kernel-shape gates are left out: :class:`KernelShapeSchedule` optimises them."""
    special: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, KernelShapeGate):
            special[id(m.logits)] = "shape"
        if isinstance(m, NSConv2d) and m.similarity_kind in ("diagonal", "full"):
            special[id(m.similarity)] = m.similarity_kind
        if isinstance(m, nn.modules.batchnorm._NormBase) and not cfg.decay_bn:
            for p in m.parameters(recurse=False):
                special[id(p)] = "nodecay"
    if not cfg.decay_bn:
        for name, p in model.named_parameters():
            if name.endswith(".bias") and id(p) not in special:
                special[id(p)] = "nodecay"
    exempt = getattr(model, "no_weight_decay", None)
    if callable(exempt):
        names = set(exempt())
        for name, p in model.named_parameters():
            if name in names:
                special[id(p)] = "nodecay"
    groups = {"default": [], "diagonal": [], "full": [], "nodecay": []}
    for p in model.parameters():
        if p.requires_grad and special.get(id(p)) != "shape":
            groups[special.get(id(p), "default")].append(p)
    wd = {"default": cfg.weight_decay, "diagonal": cfg.wd_static_diagonal, "full": cfg.wd_static_full,
          "nodecay": 0.0}
    return [{"params": ps, "weight_decay": wd[k], "name": k} for k, ps in groups.items() if ps]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":  # coupled L2 (grad += wd * p), as TF's l2 loss under AdamOptimizer
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def orthogonality_filters(model: nn.Module) -> list:
    """What ``cfg.orthogonality`` penalises: ``model.orthogonality_filters()`` if the model defines it
    (``sphere-attention``: every conv filter), else every conv/linear module but the last one (the classifier)."""
    own = getattr(model, "orthogonality_filters", None)
    if callable(own):
        return list(own())
    return [m for m in model.modules() if isinstance(m, ORTHOGONALITY_TYPES)][:-1]


# -- batch norm -----------------------------------------------------------------------------------
def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in _bns(model):
        m.momentum = momentum


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> None:
    """Recompute every BN layer's running mean and variance as the plain average over ``batches``
    (forward passes in train mode, no gradient); the model's mode and momenta are restored."""
    bns = _bns(model)
    if not bns:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    for x, _ in batches:
        model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)


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


def _subset(ds: TensorImageDataset, n: int, seed: int | None) -> TensorImageDataset:
    if not n or n >= len(ds):
        return ds
    if seed is None:
        return ds.subset(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=g)[:n])


def load_data(cfg: TrainConfig, device, rank: int = 0, world_size: int = 1, train_split: bool = True):
    """``(train_loader or None, test_loader, meta)`` for ``cfg``; meta has num_classes, in_channels,
    image_size, mean, std."""
    info = dataset_info(cfg.dataset)
    if info.name == "imagefolder":
        if cfg.data_dir is None:
            raise ConfigError("imagefolder needs --data-dir, the folder with train/ and val/ class folders")
        train_loader = _StreamLoader(cfg.data_dir, cfg, rank, world_size) if train_split else None
        test = imagefolder_loader(_split_dir(cfg.data_dir, "test"), cfg.eval_batch_size, train=False,
                                  image_size=cfg.image_size,
                                  num_workers=cfg.num_workers, rank=rank, world_size=world_size, drop_last=False)
        classes = test.dataset.classes
        meta = dict(num_classes=len(classes), in_channels=3, image_size=cfg.image_size, mean=None, std=None)
        train_loader = _ToDevice(train_loader, device, cfg.channels_last) if train_split else None
        return train_loader, _ToDevice(test, device, cfg.channels_last), meta
    if info.name != "digits" and cfg.data_dir is None:
        raise ConfigError(f"{info.name} needs --data-dir (the folder holding its files)")
    mean, std = info.mean, info.std
    common = dict(output=cfg.input, mean=mean, std=std, channels_last=cfg.channels_last, device=device,
                  rank=rank, world_size=world_size)
    train_loader = None
    if train_split:
        train = _subset(get_dataset(info.name, cfg.data_dir, "train"), cfg.train_subset, 0)
        train_loader = GPULoader(train, cfg.batch_size, shuffle=True, drop_last=True, augment=cfg.augment,
                                 padding=cfg.pad, flip=cfg.flip, seed=cfg.seed, **common)
    test = _subset(get_dataset(info.name, cfg.data_dir, "test"), cfg.test_subset, 1)
    test_loader = GPULoader(test, cfg.eval_batch_size, shuffle=False, augment=False, even_shards=False, **common)
    c, h, _ = test.image_shape
    meta = dict(num_classes=len(test.classes) if test.classes else info.num_classes, in_channels=c, image_size=h,
                mean=list(mean), std=list(std))
    return train_loader, test_loader, meta


# -- checkpoints ---------------------------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader never sees a half-written file; on any error the temporary file is removed and ``path``
    keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, format: str = "nsl-train",
                    what: str = "an nsl training checkpoint (written by `nsl train`)") -> dict:
    """Read an nsl checkpoint (``weights_only=True``) whose ``format`` field is ``format``.

    Raises :class:`CheckpointError` naming the reason (a directory, missing, corrupt or truncated,
    or not ``what``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file such as {path}/checkpoints/best.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != format or "model" not in ckpt:
        raise CheckpointError(f"{path} is not {what}")
    return ckpt


def build_from_checkpoint(ckpt: dict) -> tuple[nn.Module, TrainConfig]:
    """The model of a checkpoint with its weights loaded (on the CPU, eval mode), and its config."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    meta = ckpt["meta"]
    model = build_model_for(cfg, meta)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


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
    model = build_model(cfg.model, cfg.layer, meta["num_classes"], meta["in_channels"], **kw)
    KernelShapeSchedule.attach(cfg, model)
    set_bn_momentum(model, cfg.bn_momentum)
    if cfg.bn_zero_init:  # TensorFlow's moving mean and variance both start at zero
        for m in _bns(model):
            m.running_var.zero_()
    return model


def rng_state() -> dict:
    """The torch (CPU and CUDA) and Python random states, as checkpoint-safe tensors and lists."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the loop ------------------------------------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(cfg, local_rank: int = 0) -> torch.device:
    """``cfg.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a ``torch.device``; ``auto`` and ``cuda`` take
    GPU ``local_rank``. Raises ConfigError for CUDA without a GPU or an unknown name."""
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available")
        return torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    if cfg.device != "cpu":
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {cfg.device!r}")
    return torch.device("cpu")


def _amp(cfg: TrainConfig, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return nullcontext, None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA; use amp=bf16 or none on the CPU")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


_STRUCTURAL = ("dataset", "model", "layer", "width", "paper_init", "train_subset", "batch_size", "seed", "bn_eps",
               "input", "shape_active", "shape_method", "shape_per_filter")


def train(cfg: TrainConfig, resume: bool = False, echo=print) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset`` into run directory ``cfg.out``; return a summary dict.

    Args:
        cfg: the resolved configuration (``cfg.out`` must be set).
        resume: continue the run in ``cfg.out`` from ``checkpoints/last.pt``. Settings that define
            the run (dataset, model, layer, batch size, seed, ...) must match the saved ones.
        echo: where messages go (rank 0 only).

    Returns:
        ``{run_dir, step, iters, test_acc, test_loss, best_acc, best_step, params, seconds,
        images_per_s, stopped}``.

    Raises:
        TrainingDiverged: the loss became NaN/inf (last.pt keeps the last good state).
        ConfigError, CheckpointError, DatasetError: bad settings, run directory or data.
    """
    if not cfg.out:
        raise ConfigError("set the run directory (--out RUN_DIR)")
    cfg.validate()
    run_dir = Path(cfg.out).expanduser()
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    rank, world_size, local_rank = _dist_env()
    distributed = world_size > 1
    device = resolve_device(cfg, local_rank)
    own_group = False
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    try:
        return _train(cfg, resume, echo, run_dir, last_path, best_path, rank, world_size, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def open_run(cfg, run_dir: Path, last_path: Path, resume: bool, structural: tuple[str, ...],
             load=load_checkpoint) -> dict | None:
    """The checkpoint to resume from (``None`` for a new run), after checking the run directory.

    With ``resume``: ``last_path`` must exist and the saved config must equal ``cfg`` on every field
    in ``structural`` (``ConfigError`` listing the differences). Without: ``run_dir`` must not hold a
    run already. ``load`` reads the checkpoint (format-checked).
    """
    if resume:
        if not last_path.exists():
            raise CheckpointError(f"nothing to resume: {last_path} does not exist")
        ckpt = load(last_path)
        saved = type(cfg).from_dict(ckpt["config"])
        diff = [k for k in structural if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise ConfigError("cannot resume with different " + ", ".join(
                f"{k} (run: {getattr(saved, k)!r}, now: {getattr(cfg, k)!r})" for k in diff))
        return ckpt
    if last_path.exists():
        raise ConfigError(f"{run_dir} already holds a run ({last_path}); pass --resume to continue it or "
                          "choose another --out")
    return None


def start_run_files(run_dir: Path, cfg, ckpt: dict | None, done: int, key: str) -> Path:
    """Write ``run_dir/config.json`` and prepare ``run_dir/metrics.jsonl``; return the metrics path.

    A new run (``ckpt`` None) starts an empty metrics file; a resumed one keeps only the records with
    ``record[key] <= done`` (those written after the checkpoint are replayed by the continuation).
    """
    metrics_path = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    if ckpt is not None and metrics_path.exists():
        keep = [ln for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get(key, 0) <= done]
        metrics_path.write_text("".join(ln + "\n" for ln in keep))
    elif ckpt is None:
        metrics_path.write_text("")
    return metrics_path


def _train(cfg, resume, echo, run_dir, last_path, best_path, rank, world_size, device) -> dict:
    distributed = world_size > 1
    main = rank == 0
    say = echo if main else (lambda *a, **k: None)

    ckpt = open_run(cfg, run_dir, last_path, resume, _STRUCTURAL)
    if ckpt is not None and ckpt.get("world_size", 1) != world_size:
        raise ConfigError(f"the run was saved with {ckpt.get('world_size', 1)} processes; resume with the same "
                          f"number (now {world_size})")

    train_loader, test_loader, meta = load_data(cfg, device, rank, world_size)
    iters = cfg.iters if cfg.iters is not None else max(1, math.ceil(cfg.epochs * len(train_loader)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model_for(cfg, meta).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = count_parameters(model)
    opt = _optimizer(model, cfg)
    shaper = KernelShapeSchedule(cfg, model, iters) if cfg.shape_active else None
    base_lrs = [g["lr"] for g in opt.param_groups]
    amp_ctx, scaler = _amp(cfg, device)
    step, best_acc, best_step = 0, -1.0, -1
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        states = ckpt["loader"]
        train_loader.load_state_dict(states[rank] if isinstance(states, list) else states)
        set_rng_state(ckpt["rng"])
        if shaper is not None:
            shaper.load_state_dict(ckpt["shape"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step, best_acc, best_step = int(ckpt["step"]), float(ckpt["best_acc"]), int(ckpt["best_step"])
        if step >= iters:
            say(f"the run in {run_dir} is already complete ({step} of {iters} steps)")
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = run_dir / "metrics.jsonl"
    if main:
        start_run_files(run_dir, cfg, ckpt, step, "step")

    def log(record: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(path: Path) -> None:
        loader_state = train_loader.state_dict()
        if distributed:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, loader_state)
            loader_state = gathered
        if not main:
            return
        state = {"format": "nsl-train", "version": CHECKPOINT_VERSION, "step": step, "iters": iters,
                 "config": cfg.to_dict(), "meta": meta, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": {"schedule": cfg.schedule, "step": step, "base_lrs": base_lrs},
                 "loader": loader_state, "rng": rng_state(), "best_acc": best_acc, "best_step": best_step,
                 "world_size": world_size, "params": params}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if shaper is not None:
            state["shape"] = shaper.state_dict()
        atomic_save(state, path)

    def run_eval() -> dict:
        if cfg.bn_recalibrate:
            recal = GPULoader(train_loader.data, cfg.batch_size, shuffle=True, drop_last=True, augment=False,
                              output=cfg.input, mean=meta["mean"], std=meta["std"], channels_last=cfg.channels_last,
                              seed=cfg.seed + 1, rank=rank, world_size=world_size) \
                if isinstance(train_loader, GPULoader) else \
                _ToDevice(_StreamLoader(cfg.data_dir, cfg, rank, world_size), device, cfg.channels_last)
            batches = (b for _, b in zip(range(cfg.bn_recalibrate), recal))
            with amp_ctx():
                recalibrate_bn(model, batches)
            if distributed:
                for b in model.buffers():
                    dist.broadcast(b, 0)
        return evaluate(model, test_loader, device, amp_ctx)

    def batches():
        while True:
            yield from train_loader

    say(f"run {run_dir}: {cfg.model} / {cfg.layer} on {cfg.dataset} ({len(train_loader)} batches of "
        f"{cfg.batch_size} per epoch{f' per rank, {world_size} ranks' if distributed else ''}), {params:,} parameters, "
        f"{iters} steps, protocol {cfg.protocol}, device {device}" + (f", resuming at step {step}" if ckpt else ""))
    from tqdm import tqdm

    bar = tqdm(total=iters, initial=min(step, iters), disable=not (cfg.progress and main), unit="it",
               dynamic_ncols=True, desc=f"{cfg.model}/{cfg.layer}")
    stream = batches()
    net.train()
    window = {"loss": 0.0, "correct": 0.0, "n": 0, "steps": 0, "orth": 0.0, "t": time.perf_counter()}
    ema_loss = None
    orth_filters = orthogonality_filters(model) if cfg.orthogonality else None
    shape_log = (lambda: {"active": shaper.active_fraction()}) if shaper is not None else dict
    t_start, trained_images, last_eval = time.perf_counter(), 0, None
    stopped = False
    try:
        while step < iters:
            if cfg.stop_at and step >= cfg.stop_at:
                stopped = True
                break
            x, y = next(stream)
            if shaper is not None:
                shaper.before_step(step)
            f = lr_factor(cfg, step, iters)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            with amp_ctx():
                out = net(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            if orth_filters is not None:  # "loss" below (and in metrics.jsonl) includes it; "orth" is its value
                orth = orthogonality_penalty(orth_filters, cfg.orthogonality)
                loss = loss + orth
                window["orth"] += orth.item()
            shape_term = shaper.loss(step) if shaper is not None else None
            if shape_term is not None:  # the kernel-shape budget penalty (learned shapes), also in "loss"
                loss = loss + shape_term
            loss_value = loss.detach().clone()
            if distributed:
                dist.all_reduce(loss_value)
                loss_value /= world_size
            lv = loss_value.item()
            if not math.isfinite(lv):
                kept = f"{last_path} (step {torch.load(last_path, weights_only=True)['step']})" \
                    if last_path.exists() else "none (no checkpoint was written yet)"
                raise TrainingDiverged(
                    f"loss became {lv} at step {step + 1} (lr {base_lrs[0] * f:g}); stopped. Last good checkpoint: "
                    f"{kept}. Try a lower lr, warmup_iters, or grad_clip.")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if shaper is not None:
                shaper.step(step)
            step += 1
            trained_images += len(y) * world_size
            window["loss"] += lv
            window["correct"] += (out.detach().argmax(1) == y).sum().item()
            window["n"] += len(y)
            window["steps"] += 1
            ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
            elapsed = time.perf_counter() - t_start
            bar.update(1)
            if main and cfg.progress:
                bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{window['correct'] / max(1, window['n']):.3f}",
                                img_s=f"{trained_images / max(elapsed, 1e-9):.0f}", refresh=False)
            if cfg.log_every and (step % cfg.log_every == 0 or step == iters):
                dt = time.perf_counter() - window["t"]
                log({"kind": "train", "step": step, "loss": window["loss"] / window["steps"],
                     "acc": window["correct"] / max(1, window["n"]), "lr": base_lrs[0] * f,
                     "images_per_s": window["n"] * world_size / max(dt, 1e-9), "time": round(elapsed, 3),
                     **({"orth": window["orth"] / window["steps"]} if orth_filters is not None else {}),
                     **shape_log()})
                window = {"loss": 0.0, "correct": 0.0, "n": 0, "steps": 0, "orth": 0.0, "t": time.perf_counter()}
            evaluated = False
            if step == iters or (cfg.eval_every and step % cfg.eval_every == 0):
                last_eval = run_eval()
                evaluated = True
                log({"kind": "eval", "step": step, **last_eval, "time": round(time.perf_counter() - t_start, 3),
                     **shape_log()})
                if main and cfg.progress:
                    bar.write(f"step {step}: test acc {100 * last_eval['test_acc']:.2f}%, "
                              f"loss {last_eval['test_loss']:.4f}")
                if last_eval["test_acc"] > best_acc:
                    best_acc, best_step = last_eval["test_acc"], step
                    save(best_path)
            if evaluated or step == iters or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
                    or (cfg.stop_at and step == cfg.stop_at):
                save(last_path)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    if stopped or (cfg.stop_at and step == cfg.stop_at and step < iters):
        stopped = True
        say(f"stopped at step {step} of {iters} (stop_at); continue with --resume")
    if last_eval is None and not stopped and ckpt is not None and step >= iters:
        last_eval = evaluate(model, test_loader, device, amp_ctx)
    summary = {"run_dir": str(run_dir), "step": step, "iters": iters, "params": params, "seconds": round(seconds, 3),
               "images_per_s": trained_images / max(seconds, 1e-9), "best_acc": best_acc, "best_step": best_step,
               "stopped": stopped, **(last_eval or {})}
    if main and not stopped and last_eval is not None:
        say(f"done: step {step}, test accuracy {100 * last_eval['test_acc']:.2f}% (best {100 * best_acc:.2f}% at "
            f"step {best_step}), {summary['images_per_s']:.0f} images/s")
    return summary


def evaluate_checkpoint(path: str | Path, data_dir: str | None = None, fold: bool = False, device: str = "cpu",
                        batch_size: int | None = None) -> dict:
    """Test accuracy of a checkpoint's model (``fold``: of the folded model, and of the unfolded one).

    Returns ``{test_acc, test_loss, test_samples, step, model, layer, dataset}`` and, with ``fold``,
    ``unfolded_acc``, ``fold_matches`` (equal accuracies), ``folded_static_layers`` and
    ``max_abs_logit_diff`` (over the first test batch).
    """
    from ..convert import fold as fold_model

    ckpt = load_checkpoint(path)
    model, cfg = build_from_checkpoint(ckpt)
    if data_dir is not None:
        cfg.data_dir = str(data_dir)
    if batch_size:
        cfg.eval_batch_size = batch_size
    cfg.channels_last = False
    dev = torch.device(device)
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
