"""``nsl demo``: NSL layers, ``convert`` and ``fold`` on a real model and real data, offline: a first
result in about a minute, the full comparison one flag away (``nsl demo --full``).

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, split 1,347 / 450; no files, no
network). Three variants of CNN-9 at width 8 (``conv``; ``static-full``: ``w^T M x`` with one learned
``M`` per layer; ``dynamic-diagonal``: ``M(y)`` predicted at every location), trained by the
library's one training loop (:func:`nsl.train.train`, protocol ``demo``), so that every demo run is
also an ``nsl train`` run::

    nsl train --protocol demo --layer dynamic-diagonal --seed 0 --epochs 3 --out runs/demo-dd

By default each variant is trained once (seed 0, 3 epochs) and its test accuracy is printed as soon
as its run ends (conv first, the slower dynamic variant last); ``--full`` trains 3 seeds of 12
epochs and prints each variant's mean test accuracy with a 95% confidence interval over the seeds.
Then the demo checks on the trained models that :func:`nsl.convert` turns the conv model into NSL
models computing the same function, and that :func:`nsl.fold` turns the trained static model back
into a plain CNN with the same outputs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .convert import convert, fold
from .data import dataset_info
from .layers import NSConv2d
from .stats import mean_ci
from .train import build_from_checkpoint, load_checkpoint, load_data, make_config, train

__all__ = ["DemoConfig", "FULL", "VARIANTS", "run_demo"]

#: the layer kinds the demo trains, in this order (see :data:`nsl.layers.LAYER_KINDS`)
VARIANTS = ("conv", "static-full", "dynamic-diagonal")
#: ``nsl demo --full``: epochs and seeds of the comparison with confidence intervals
FULL = {"epochs": 12, "seeds": 3}


@dataclass
class DemoConfig:
    """Settings of ``nsl demo`` (each is a command-line flag); the rest is protocol ``demo``.

    The defaults give a first result fast (one seed, 3 epochs); :data:`FULL` is ``--full``.
    ``out``: keep the runs (``OUT/<kind>-s<seed>``, each a normal run directory) instead of a
    temporary folder.
    """

    epochs: int = 3
    seeds: int = 1
    batch_size: int = 64
    progress: bool = True
    out: str | None = None


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def run_demo(cfg: DemoConfig, echo=print) -> dict:
    """Run the demo; print a report through ``echo`` and return the measured numbers.

    Each variant's line is printed as soon as its runs end. Returns ``{kind: {"accuracies", "mean",
    "ci95", "params", "seconds_per_run"}, "convert": {...}, "fold": {...}, "seconds": wall time}``.
    """
    with tempfile.TemporaryDirectory(prefix="nsl-demo-") as tmp:
        root = Path(cfg.out).expanduser() if cfg.out else Path(tmp)
        return _run(cfg, root, echo)


def _line(kind: str, r: dict) -> str:
    if len(r["accuracies"]) == 1:
        return (f"   {kind:<17} {100 * r['mean']:6.2f}%   params {r['params']:>7,}   {r['seconds_per_run']:5.1f} s "
                "to train")
    ci = "n/a" if r["ci95"] != r["ci95"] else f"{100 * r['ci95']:4.2f}"
    return (f"   {kind:<17} {100 * r['mean']:6.2f}% +- {ci}   params {r['params']:>7,}   "
            f"{r['seconds_per_run']:5.1f} s/run   seeds: " + ", ".join(f"{100 * a:.2f}" for a in r["accuracies"]))


def _run(cfg: DemoConfig, root: Path, echo) -> dict:
    t_start = time.perf_counter()
    base = make_config("demo", epochs=cfg.epochs, batch_size=cfg.batch_size, progress=False)
    info = dataset_info(base.dataset)
    echo(f"data: scikit-learn digits ({info.image_size}x{info.image_size}, {info.train_size} train / "
         f"{info.test_size} test images), model {base.model} at width "
         f"{base.width}, protocol demo ({cfg.epochs} epochs, Adam one-cycle lr {base.lr}), {cfg.seeds} seed(s) "
         "per variant")
    echo(f"runs: {root if cfg.out else 'a temporary folder (keep them with --out DIR)'}\n")
    if cfg.seeds == 1:
        echo("1. test accuracy (seed 0; with one seed, differences of a point or so are within seed noise)")
    else:
        echo("1. test accuracy, mean +- 95% CI over seeds (Student t)")
    results: dict[str, dict] = {}
    bar = tqdm(total=len(VARIANTS) * cfg.seeds, desc="demo runs", unit="run", disable=not cfg.progress,
               dynamic_ncols=True, leave=False)
    try:  # a signal or an error mid-run: the bar is cleared before the message
        for kind in VARIANTS:
            accs, seconds, params = [], 0.0, None
            for seed in range(cfg.seeds):
                run_cfg = dataclasses.replace(base, layer=kind, seed=seed, out=str(root / f"{kind}-s{seed}"))
                bar.set_postfix_str(f"training {kind} seed {seed}")
                t0 = time.perf_counter()
                summary = train(run_cfg, resume=(root / f"{kind}-s{seed}" / "checkpoints" / "last.pt").exists(),
                                echo=lambda *a, **k: None)
                seconds += time.perf_counter() - t0
                accs.append(summary["test_acc"])
                params = summary["params"]
                bar.update()
            mean, ci = mean_ci(accs)
            results[kind] = {"accuracies": accs, "mean": mean, "ci95": ci, "params": params,
                             "seconds_per_run": seconds / cfg.seeds}
            with tqdm.external_write_mode():  # the result now, above the progress bar
                echo(_line(kind, results[kind]))
    finally:
        bar.close()
    if cfg.seeds > 1:
        echo("   (overlapping intervals mean the difference is within seed noise on this small set)")

    _, test_loader, _ = load_data(base, torch.device("cpu"), train_split=False)
    x = torch.cat([b[0] for b in test_loader])
    conv_model, _ = build_from_checkpoint(load_checkpoint(root / "conv-s0" / "checkpoints" / "last.pt"))
    ref = _logits(conv_model, x)
    echo("\n2. nsl.convert on the trained conv model (seed 0): same function, now with NSL layers")
    conv_diffs = {}
    for name, model in (("static full M = I", convert(conv_model, "static-full")),
                        ("dynamic diagonal, zero-init predictor", convert(conv_model, "dynamic-diagonal"))):
        diff = (_logits(model, x) - ref).abs().max().item()
        conv_diffs[name] = diff
        echo(f"   {name:<38} max |logit - conv logit| = {diff:.1e}")

    static, _ = build_from_checkpoint(load_checkpoint(root / "static-full-s0" / "checkpoints" / "last.pt"))
    folded = fold(static)
    n_ns = sum(isinstance(m, NSConv2d) for m in folded.modules())
    out_s, out_f = _logits(static, x), _logits(folded, x)
    y = torch.cat([b[1] for b in test_loader])
    acc_s, acc_f = (out_s.argmax(1) == y).float().mean().item(), (out_f.argmax(1) == y).float().mean().item()
    diff = (out_f - out_s).abs().max().item()
    m0 = next(m for m in static.modules() if isinstance(m, NSConv2d))
    moved = (m0.similarity - torch.eye(m0.similarity.shape[0])).abs().max().item()
    echo("\n3. nsl.fold on the trained static-full model (seed 0): a plain CNN again")
    echo(f"   NSConv2d layers left: {n_ns};  max |folded - static| = {diff:.1e};  accuracy {100 * acc_s:.2f}% -> "
         f"{100 * acc_f:.2f}%;  learned M of the first NSL layer moved from I by up to {moved:.3f}")
    results["convert"] = conv_diffs
    results["fold"] = {"max_abs_diff": diff, "accuracy_static": acc_s, "accuracy_folded": acc_f,
                       "nsconv_left": n_ns}
    results["seconds"] = time.perf_counter() - t_start
    echo(f"\ndone in {results['seconds']:.0f} s.")
    if (cfg.epochs, cfg.seeds) != (FULL["epochs"], FULL["seeds"]):
        echo(f"The comparison over {FULL['seeds']} seeds of {FULL['epochs']} epochs with 95% confidence intervals: "
             "nsl demo --full (a few minutes on 2 CPU cores).")
    return results
