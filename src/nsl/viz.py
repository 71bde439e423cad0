"""``nsl viz``: figures of what an NSL model learned, from a training checkpoint.

::

    nsl viz --checkpoint runs/cnn9-dd/checkpoints/best.pt --out figs [--image digit.png] [--data-dir DATA]

Draws only the figures that apply to the model and prints the paths written:

* ``static_similarity.png``: the static ``M`` of every :class:`nsl.NSConv2d` layer (``P x P``; a
  diagonal ``M`` as the ``k x k`` map of ``m``), as ``M - I`` on one diverging colour scale centred at
  0 = the identity (a plain convolution).
* ``kernel_shapes.png``: the learned kernel shape ``D`` of every gated layer (:mod:`nsl.shape`), or,
  for a static diagonal ``M``, the ``|m|`` maps (how strongly each kernel position is used).
* ``dynamic_deviation.png`` and ``dynamic_mean_similarity.png`` (dynamic NSL models): for the
  ``--image`` (resized to the model's input size) or the first test images, the per-location
  ``||M(y) - I||_F`` of every dynamic layer next to the image, and ``M(y)`` averaged over the
  image(s) per layer.
* ``training_curves.png``: training loss and test accuracy of the run (``RUN_DIR/metrics.jsonl``
  next to ``RUN_DIR/checkpoints/``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["VizError", "visualize", "load_model", "static_layers", "dynamic_layers", "dynamic_similarities",
           "add_parser"]

MAX_TEST_IMAGES = 3


class VizError(ValueError):
    """A bad argument of ``nsl viz`` (path, checkpoint, image)."""


# -- model ---------------------------------------------------------------------------------------
def load_model(checkpoint: str | Path) -> tuple[nn.Module, object, dict]:
    """``(model, TrainConfig, checkpoint dict)``; kernel gates are re-attached when the weights have them."""
    from .train import CheckpointError, build_from_checkpoint, load_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise VizError(str(e)) from None
    state = ckpt["model"]
    try:
        if any(".kernel_gate." in k for k in state):
            from .shape import attach_kernel_shape
            from .train import TrainConfig, build_model_for

            cfg = TrainConfig.from_dict(ckpt["config"])
            model = build_model_for(cfg, ckpt["meta"])
            gated = {k.split(".kernel_gate.")[0] for k in state if ".kernel_gate." in k}
            per_filter = any(v.dim() == 2 for k, v in state.items() if k.endswith(".kernel_gate.logits"))
            attach_kernel_shape(model, per_filter=per_filter, include=lambda name, m: name in gated)
            model.load_state_dict(state)
            model.eval()
        else:
            model, cfg = build_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise VizError(f"cannot rebuild the model of {checkpoint}: the checkpoint does not match its config "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return model, cfg, ckpt


def static_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers import NSConv2d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, NSConv2d) and m.similarity_kind != "identity"]


def dynamic_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers import DynamicNSConv2d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicNSConv2d)]


@torch.no_grad()
def dynamic_similarities(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``M(y)`` of every dynamic layer for the batch ``x``, recorded during one forward pass (eval mode):
    ``[N, P, H, W]`` (diagonal ``m``) or ``[N, P, P, H, W]`` (full)."""
    layers = dynamic_layers(model)
    for _, m in layers:
        m.record_similarity, m.last_similarity = True, None
    try:
        model.eval()
        model(x)
        return {n: m.last_similarity.float().cpu() for n, m in layers}
    finally:
        for _, m in layers:
            m.record_similarity, m.last_similarity = False, None


def deviation_map(sim: Tensor, kind: str) -> Tensor:
    """``||M(y) - I||_F`` per location: ``[N, H, W]``."""
    if kind == "diagonal":
        return (sim - 1).pow(2).sum(1).sqrt()
    P = sim.shape[1]
    eye = torch.eye(P).view(1, P, P, 1, 1)
    return (sim - eye).pow(2).sum((1, 2)).sqrt()


# -- images --------------------------------------------------------------------------------------
def _transform(img01: Tensor, cfg, meta: dict) -> Tensor:
    """Pixels in 0..1 ``[N, C, H, W]`` -> the model's input (the run's ``input`` setting)."""
    if cfg.dataset in ("imagefolder", "image-folder", "image_folder"):
        from .data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        return (img01 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if cfg.input == "raw":
        return img01 * 255.0
    if cfg.input == "unit":
        return img01
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    return (img01 - mean) / std


def _untransform(x: Tensor, cfg, meta: dict) -> Tensor:
    if cfg.dataset in ("imagefolder", "image-folder", "image_folder"):
        from .data import IMAGENET_MEAN, IMAGENET_STD

        return (x * torch.tensor(IMAGENET_STD).view(1, -1, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
                ).clamp(0, 1)
    if cfg.input == "raw":
        return (x / 255.0).clamp(0, 1)
    if cfg.input == "unit":
        return x.clamp(0, 1)
    return (x * torch.tensor(meta["std"]).view(1, -1, 1, 1) + torch.tensor(meta["mean"]).view(1, -1, 1, 1)).clamp(0, 1)


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as ``[1, channels, size, size]`` pixels in 0..1 (grayscale or RGB, bilinear resize)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise VizError(f"--image {path} does not exist" if not path.exists() else f"--image {path} is not a file")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise VizError(f"cannot read --image {path}: not a readable PNG/JPEG image ({e})") from None
    return data.view(size, size, channels).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def _test_images(cfg, data_dir: str | None, n: int) -> tuple[Tensor, list[str]]:
    from .data import DatasetError
    from .train import ConfigError, load_data

    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise VizError(f"--data-dir {data_dir} is not a directory")
        cfg.data_dir = str(data_dir)
    cfg.channels_last = False
    try:
        _, loader, _ = load_data(cfg, torch.device("cpu"), train_split=False)
        x, y = next(iter(loader))
    except (ConfigError, DatasetError, ValueError, OSError) as e:
        raise VizError(f"cannot load test images of {cfg.dataset} ({e}); pass --image PATH or --data-dir DIR") \
            from None
    picked, seen = [], set()
    for i, label in enumerate(y.tolist()):  # one image per class first
        if label not in seen:
            picked.append(i)
            seen.add(label)
        if len(picked) == n:
            break
    return x[picked].float().cpu(), [f"test image {i} (class {y[i].item()})" for i in picked]


# -- drawing -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, max_cols: int = 5) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _short(name: str) -> str:
    return name.replace(".conv", "").replace("stage", "stage ") or "(model)"


def _shown(img: Tensor):
    """``[C, H, W]`` in 0..1 -> an array for imshow (grayscale 2-D, colour H x W x 3)."""
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def _sim_panel(ax, mat: Tensor, kind: str, kernel: tuple[int, int], norm, cmap: str):
    """Draw ``M - I`` of one layer; returns the image artist."""
    kh, kw = kernel
    if kind == "diagonal":
        dev = (mat - 1).reshape(kh, kw)
        im = ax.imshow(dev.numpy(), cmap=cmap, norm=norm)
        for i in range(kh):
            for j in range(kw):
                dark = abs(dev[i, j].item()) > 0.6 * max(abs(norm.vmin), abs(norm.vmax))
                ax.text(j, i, f"{mat.reshape(kh, kw)[i, j].item():.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        ax.set_xticks(range(kw))
        ax.set_yticks(range(kh))
        ax.set_xlabel("kernel column")
        ax.set_ylabel("kernel row")
    else:
        P = mat.shape[-1]
        im = ax.imshow((mat - torch.eye(P)).numpy(), cmap=cmap, norm=norm)
        ticks = list(range(P))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("input position q (row-major)")
        ax.set_ylabel("weight position p")
    return im


def _sym_norm(values: list[Tensor]):
    from matplotlib.colors import Normalize

    lim = max((v.abs().max().item() for v in values), default=0.0) or 1e-3
    return Normalize(-lim, lim)


def _fig_static(model, title_model: str, out: Path) -> Path | None:
    layers = static_layers(model)
    if not layers:
        return None
    plt = _plt()
    mats = []
    for _, m in layers:
        M = m.similarity_matrix().detach().float().cpu()
        if M.dim() == 3:  # similarity groups: show the first group
            M = M[0]
        mats.append(M.diagonal() if m.similarity_kind == "diagonal" else M)
    devs = [(M - 1) if m.similarity_kind == "diagonal" else (M - torch.eye(M.shape[-1]))
            for M, (_, m) in zip(mats, layers)]
    norm = _sym_norm(devs)
    rows, cols = _grid(len(layers), 3 if layers[0][1].similarity_kind != "diagonal" else 5)
    side = 3.4 if layers[0][1].similarity_kind != "diagonal" else 2.4
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.2, side * rows + 1.0), squeeze=False,
                             layout="constrained")
    im = None
    for ax, M, (name, m) in zip(axes.flat, mats, layers):
        im = _sim_panel(ax, M, m.similarity_kind, m.kernel_size, norm, "RdBu_r")
        extra = " (group 1)" if m.similarity_groups > 1 else ""
        ax.set_title(f"{_short(name)}: {m.similarity_kind} M{extra}", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    kind = layers[0][1].similarity_kind
    what = ("diagonal M = diag(m), drawn as the k x k kernel map of m (numbers: m)" if kind == "diagonal"
            else "full M (P x P, P = kernel positions): row p = weight position, column q = input position")
    fig.suptitle(f"Learned static similarity M of every NSL layer of {title_model}\n{what}; colour: M - I "
                 "(white = identity, i.e. a plain convolution; red > I, blue < I)", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="M - I  (shared scale, 0 = identity)")
    path = out / "static_similarity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fig_shapes(model, title_model: str, out: Path) -> Path | None:
    from .shape import gated_layers, kernel_shapes

    maps, subtitle, label = [], "", ""
    if gated_layers(model):
        for name, d in kernel_shapes(model).items():
            if d.dim() == 3:
                maps.append((f"{_short(name)} (mean over {d.shape[0]} filters)", d.mean(0)))
            else:
                maps.append((_short(name), d))
        subtitle = "kernel shape D per layer (1 = position used, 0 = removed; per-filter gates averaged)"
        label, vmax = "D", 1.0
    else:
        layers = [(n, m) for n, m in static_layers(model) if m.similarity_kind == "diagonal"]
        if not layers:
            return None
        for name, m in layers:
            s = m.similarity.detach().float().cpu()
            s = s[0] if s.dim() == 2 else s
            maps.append((_short(name), s.abs().reshape(m.kernel_size)))
        subtitle = "|m| of the static diagonal M: how strongly each kernel position is used (0 = unused)"
        label = "|m|"
        vmax = max(v.max().item() for _, v in maps) or 1.0
    plt = _plt()
    rows, cols = _grid(len(maps))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols + 1.2, 2.3 * rows + 1.0), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (name, d) in zip(axes.flat, maps):
        im = ax.imshow(d.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        for i in range(d.shape[0]):
            for j in range(d.shape[1]):
                v = d[i, j].item()
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * vmax else "white")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(d.shape[1]))
        ax.set_yticks(range(d.shape[0]))
        ax.set_xlabel("kernel column", fontsize=8)
        ax.set_ylabel("kernel row", fontsize=8)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.suptitle(f"Learned kernel shapes of {title_model}\n{subtitle}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    path = out / "kernel_shapes.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fig_dynamic(model, cfg, meta, title_model: str, out: Path, image: str | None,
                 data_dir: str | None) -> list[Path]:
    layers = dynamic_layers(model)
    if not layers:
        return []
    size, channels = meta["image_size"], meta["in_channels"]
    if image is not None:
        img01 = load_image(image, channels, size)
        x, labels = _transform(img01, cfg, meta), [f"{Path(image).name} (resized to {size}x{size})"]
    else:
        x, labels = _test_images(cfg, data_dir, MAX_TEST_IMAGES)
        img01 = _untransform(x, cfg, meta)
    sims = dynamic_similarities(model, x)
    kinds = {n: m.similarity_kind for n, m in layers}
    devs = {n: deviation_map(s, kinds[n]) for n, s in sims.items()}
    plt = _plt()
    n_img, n_lay = x.shape[0], len(layers)
    fig, axes = plt.subplots(n_img, n_lay + 1, figsize=(1.7 * (n_lay + 1) + 0.5, 1.8 * n_img + 2.4), squeeze=False,
                             layout="constrained")
    for c in range(n_lay + 1):
        name = layers[c - 1][0] if c else None
        # per-layer scale from its minimum to its maximum over the images shown
        lo, hi = (devs[name].min().item(), devs[name].max().item()) if c else (0.0, 1.0)
        hi = max(hi, lo + 1e-9)
        im = None
        for r in range(n_img):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if not c:
                ax.imshow(_shown(img01[r]), cmap="gray", vmin=0, vmax=1, extent=(0, size, size, 0))
                ax.set_title(labels[r], fontsize=7)
                continue
            d = devs[name][r]
            # the map spans the image's extent, so each cell is drawn where its input region lies
            im = ax.imshow(d.numpy(), cmap="magma", vmin=lo, vmax=hi, extent=(0, size, size, 0),
                           interpolation="nearest")
            ax.set_xlabel(f"mean {d.mean().item():.3g}, range {d.max().item() - d.min().item():.2g}", fontsize=6)
            if r == 0:
                ax.set_title(f"{_short(name)}\n({d.shape[0]}x{d.shape[1]} output grid)", fontsize=8)
        if im is not None:
            cb = fig.colorbar(im, ax=axes[:, c], location="bottom", shrink=0.9, aspect=12)
            digits = max(2, math.ceil(-math.log10(hi - lo)) + 1)  # enough decimals to tell min from max
            cb.set_ticks([lo, hi], labels=[f"{lo:.{digits}f}", f"{hi:.{digits}f}"])
            cb.ax.tick_params(labelsize=6, rotation=20)
            cb.set_label("||M(y) - I||_F (min, max)", fontsize=7)
    fig.suptitle(f"How far the dynamic similarity M(y) is from the identity, per location, in {title_model}\n"
                 "left: the input; then ||M(y) - I||_F at each output location y of each dynamic layer, aligned with "
                 "the input (0 = a plain convolution there)\ncolour: each layer's min to max over these images; "
                 "below each map: its mean and spatial range",
                 fontsize=10)
    p1 = out / "dynamic_deviation.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    # mean M over the image(s), per layer
    means = []
    for name, _ in layers:
        s = sims[name]
        means.append(s.mean((0, 2, 3)) if kinds[name] == "diagonal" else s.mean((0, 3, 4)))
    devm = [(M - 1) if kinds[n] == "diagonal" else (M - torch.eye(M.shape[-1])) for M, (n, _) in zip(means, layers)]
    norm = _sym_norm(devm)
    full = layers[0][1].similarity_kind == "full"
    rows, cols = _grid(n_lay, 3 if full else 5)
    side = 3.4 if full else 2.4
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.2, side * rows + 1.1), squeeze=False,
                             layout="constrained")
    im = None
    for ax, M, (name, m) in zip(axes.flat, means, layers):
        im = _sim_panel(ax, M, m.similarity_kind, m.kernel_size, norm, "RdBu_r")
        ax.set_title(f"{_short(name)}: mean {m.similarity_kind} M(y)", fontsize=9)
    for ax in list(axes.flat)[n_lay:]:
        ax.axis("off")
    src = labels[0] if image is not None else f"{n_img} test images"
    what = "diagonal M(y) as the k x k map of m(y), numbers: mean m" if not full else \
        "full M(y), P x P: row p = weight position, column q = input position"
    fig.suptitle(f"Dynamic similarity M(y) of {title_model}, averaged over all locations of {src}\n{what}; "
                 "colour: mean M - I (white = identity)", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean M(y) - I  (shared scale, 0 = identity)")
    p2 = out / "dynamic_mean_similarity.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def visualize(checkpoint: str | Path, out: str | Path, image: str | None = None,
              data_dir: str | None = None) -> list[Path]:
    """Draw every figure that applies to the checkpoint's model into ``out``; returns the paths."""
    from .report import RunError, load_run, plot_curves

    checkpoint = Path(checkpoint).expanduser()
    if image is not None and not Path(image).expanduser().is_file():
        raise VizError(f"--image {image} does not exist" if not Path(image).expanduser().exists()
                       else f"--image {image} is not a file")
    model, cfg, ckpt = load_model(checkpoint)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise VizError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = ckpt["meta"]
    title_model = f"{cfg.model} / {cfg.layer} on {cfg.dataset} (step {ckpt.get('step')})"
    paths = [p for p in (_fig_static(model, title_model, out), _fig_shapes(model, title_model, out)) if p]
    paths += _fig_dynamic(model, cfg, meta, title_model, out, image, data_dir)
    run_dir = checkpoint.parent.parent
    try:
        run = load_run(run_dir)
    except RunError:
        print(f"nsl viz: note: no training curves ({run_dir} has no config.json + metrics.jsonl)", file=sys.stderr)
    else:
        paths.append(plot_curves([run], out / "training_curves.png",
                                 title=f"Training curves of run {run.name}: {cfg.model} / {cfg.layer} on "
                                       f"{cfg.dataset}"))
    if not paths:
        print(f"nsl viz: note: {cfg.layer} has no NSL similarity to draw", file=sys.stderr)
    return paths


# -- command line --------------------------------------------------------------------------------
def _cli(args: argparse.Namespace) -> int:
    try:
        paths = visualize(args.checkpoint, args.out, image=args.image, data_dir=args.data_dir)
    except VizError as e:
        print(f"nsl viz: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def add_parser(sub) -> None:
    """Add ``nsl viz`` to the subcommands ``sub`` of the ``nsl`` parser."""
    p = sub.add_parser("viz", help="PNG figures of a checkpoint's learned similarities, shapes and curves",
                       description="Draw the static M of every NSL layer, learned kernel shapes, per-location "
                                   "||M(y) - I|| maps and mean M(y) of dynamic layers for an image (or test "
                                   "images), and the run's training curves. Only the figures that apply are drawn.")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by nsl train (RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--image", help="a PNG/JPEG image for the dynamic-layer maps (default: test images)")
    p.add_argument("--data-dir", dest="data_dir", help="dataset folder for test images (default: the run's)")
    p.set_defaults(func=_cli)
