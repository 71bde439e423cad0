"""Optimisation of a classification run: lr schedules, parameter groups and optimisers, batch-norm handling."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..layers import NSConv2d
from ..regularizers import ORTHOGONALITY_TYPES
from ..shape import KernelShapeGate
from .config import TrainConfig

__all__ = ["lr_factor", "param_groups", "build_optimizer", "orthogonality_filters", "batch_norms",
           "set_bn_momentum", "recalibrate_bn"]


# -- schedule and optimiser -----------------------------------------------------------------------
def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total``.

    ``multistep``: ``lr_gamma ** #{m in lr_milestones : step >= round(m * total)}``; ``cosine``:
    ``(1 + cos(pi * step / total)) / 2``; ``onecycle``: linear warm-up ``(step + 1) / w`` for
    ``w = round(onecycle_pct * total)`` steps, then cosine to 0; ``constant``: 1. Times
    ``(step + 1) / warmup_iters`` during the first ``warmup_iters`` steps.
    """
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
    static full ``M`` (``wd_static_full``), BN (and the predictors' GroupNorm) parameters and biases
    (``weight_decay`` if ``decay_bn`` else 0), the parameters named by ``model.no_weight_decay()`` if the model
    defines it (0; e.g. the cosine filters of ``sphere-attention``, as the authors) and everything else
    (``weight_decay``).
    The logits of kernel-shape gates are left out: :class:`~nsl.train.shaping.KernelShapeSchedule` optimises them."""
    special: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, KernelShapeGate):
            special[id(m.logits)] = "shape"
        if isinstance(m, NSConv2d) and m.similarity_kind in ("diagonal", "full"):
            special[id(m.similarity)] = m.similarity_kind
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and not cfg.decay_bn:
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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (``sgd`` with ``momentum``/``nesterov``, ``adam``: coupled L2 as TF's l2 loss under
    AdamOptimizer, ``adamw``: decoupled decay) over :func:`param_groups`, base lr ``cfg.lr``."""
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
def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch-norm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BN layer of ``model``."""
    for m in batch_norms(model):
        m.momentum = momentum


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> None:
    """Recompute every BN layer's running mean and variance as the plain average over ``batches``
    (forward passes in train mode, no gradient); the model's mode and momenta are restored."""
    bns = batch_norms(model)
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
