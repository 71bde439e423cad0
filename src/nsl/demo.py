"""``nsl demo``: the layers, ``convert`` and ``fold`` on a real model and real data, offline.

Data: scikit-learn's bundled handwritten digits (1,797 images, upscaled to 16 x 16), split
1,347 / 450. A small CNN is built once; :func:`nsl.convert` turns copies of it into a static
(full ``M``) and a dynamic (diagonal ``M``) NSL model that compute exactly the same function at
the start; all three train from that same initialisation for the same epochs and seeds, and the
static one is finally folded back into a plain CNN with :func:`nsl.fold`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .convert import convert, fold
from .data.digits import load_digits
from .layers import NSConv2d

__all__ = ["DemoConfig", "small_cnn", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of ``nsl demo`` (each is a command-line flag)."""

    epochs: int = 12
    seeds: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    size: int = 16
    progress: bool = True


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """Three 3x3 conv-BN-ReLU blocks (width, 2*width, 2*width), a max-pool, global pooling, linear."""
    w1, w2 = width, 2 * width
    return nn.Sequential(
        nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
        nn.Conv2d(w1, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w2, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, num_classes),
    )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0).sub_(0.5).div_(0.5)


def _train(model: nn.Module, data, cfg: DemoConfig, seed: int, label: str) -> float:
    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * ((len(xtr) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    bar = tqdm(total=steps, desc=f"{label:<16}", leave=False, disable=not cfg.progress, unit="step")
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    return _accuracy(model, xte, yte)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student t for n - 1 degrees of freedom)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(n - 1, 1.96)
    return mean, t * sd / n ** 0.5


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run the demo; print a report through ``echo`` and return the measured numbers."""
    xtr, ytr = load_digits("train", size=cfg.size)
    xte, yte = load_digits("test", size=cfg.size)
    data = (_normalise(xtr), ytr, _normalise(xte), yte)
    echo(f"data: scikit-learn digits upscaled to {cfg.size}x{cfg.size}, {len(xtr)} train / {len(xte)} test images")

    torch.manual_seed(0)
    base = small_cnn()
    variants = {
        "conv": base,
        "static-full": convert(base, "full"),
        "dynamic-diagonal": convert(base, "diagonal", dynamic=True, predictor="sphere"),
    }
    echo("\n1. nsl.convert: the same CNN with its 3x3 convolutions replaced, same weights")
    probe = data[2][:256]
    base.eval()
    reference = base(probe)
    for name, model in variants.items():
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        kinds = sorted({type(m).__name__ for n, m in model.named_modules()
                        if isinstance(m, nn.Conv2d) and "predictor" not in n})
        diff = (model(probe) - reference).abs().max().item()
        echo(f"   {name:<17} params {n_params:>7,}  layers {', '.join(kinds):<40} "
             f"max |out - conv out| at start = {diff:.1e}")

    echo(f"\n2. training each from that start: {cfg.epochs} epochs, Adam one-cycle lr {cfg.lr}, "
         f"{cfg.seeds} seed(s)")
    results: dict[str, dict] = {}
    trained_static = None
    for name, model in variants.items():
        accs, seconds = [], 0.0
        for seed in range(cfg.seeds):
            m = copy.deepcopy(model)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            accs.append(_train(m, data, cfg, seed, f"{name} s{seed}"))
            seconds += time.perf_counter() - t0
            if name == "static-full" and seed == 0:
                trained_static = m
        mean, ci = _mean_ci(accs)
        results[name] = {"accuracies": accs, "mean": mean, "ci95": ci, "seconds_per_run": seconds / cfg.seeds}
        echo(f"   {name:<17} test accuracy {100 * mean:6.2f}% +- {100 * ci:4.2f} (95% CI over {cfg.seeds} seeds)"
             f"   {seconds / cfg.seeds:5.1f} s/run")
    echo("   (overlapping intervals mean the difference is within seed noise on this small set)")

    echo("\n3. nsl.fold: the trained static-full model as a plain CNN")
    folded = fold(trained_static)
    n_ns = sum(isinstance(m, NSConv2d) for m in folded.modules())
    with torch.no_grad():
        trained_static.eval()
        folded.eval()
        diff = (folded(data[2]) - trained_static(data[2])).abs().max().item()
    acc_static, acc_folded = _accuracy(trained_static, data[2], yte), _accuracy(folded, data[2], yte)
    echo(f"   NSConv2d layers left: {n_ns};  max |folded - static| = {diff:.1e};  "
         f"accuracy {100 * acc_static:.2f}% -> {100 * acc_folded:.2f}%")
    m0 = next(m for m in trained_static.modules() if isinstance(m, NSConv2d))
    off = (m0.similarity - torch.eye(9)).abs().max().item()
    echo(f"   learned M of the first layer moved from I by up to {off:.3f}")
    results["fold"] = {"max_abs_diff": diff, "accuracy_static": acc_static, "accuracy_folded": acc_folded}
    return results
