"""ONNX export of trained models: ``nsl export --checkpoint CKPT --out model.onnx [--fold]``.

:func:`export_onnx` rebuilds the model of a checkpoint written by ``nsl train`` (the whole
classifier: ``logits = f(x)``) or by ``nsl fewshot train`` (the embedding backbone only:
``z = g(x)``, the part a few-shot head compares; prototypes are computed from support embeddings at
run time), optionally folds every static NSL layer into the plain ``nn.Conv2d`` computing the same
function (:func:`nsl.fold`: ``W'[o, c, q] = sum_p W[o, c, p] M[p, q]``), and writes it with
``torch.onnx.export`` (the exporter PyTorch uses by default). Dynamic NSL layers export through
:mod:`nsl._export_math`: ``y = sum_p w_p^T M_p(x) x_p`` as a fixed one-hot grouped ``Conv`` (the ``P``
shifted copies of the input), a ``Mul`` (diagonal ``M``) or ``Mul`` + ``ReduceSum`` (full ``M``), and a 1x1
``Conv`` with the weight, so the file holds standard ONNX operators only (no custom op).

The file is written atomically (a temporary file in the same folder, then ``os.replace``). When
``onnxruntime`` is installed, the exported graph is run on a seeded random input and compared with
PyTorch before the file is put in place; a difference beyond the tolerance raises :class:`ExportError`
and keeps no file.

The input of the exported graph is what the model takes: a float32 ``[N, C, H, W]`` tensor, already
normalised with the training mean and std (stored, with the layer kind and the class names, in the
file's ``metadata_props`` when the ``onnx`` package is available). The batch dimension ``N`` is
dynamic.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .convert import fold as fold_model
from .layers import NSConv2d

__all__ = ["ExportError", "ExportedModel", "INSTALL_ONNX", "export_module", "export_onnx", "load_for_export"]

#: How to install what ONNX export needs (onnx, onnxscript, and onnxruntime for the check): the nsl[onnx] extra.
INSTALL_ONNX = "`pip install 'nsl[onnx]'`"


class ExportError(ValueError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


@dataclass
class ExportedModel:
    """A model ready to export: the module (eval mode, CPU), its input shape ``(C, H, W)`` and facts
    recorded in the ONNX file (``metadata``: str -> str)."""

    module: nn.Module
    input_chw: tuple[int, int, int]
    what: str
    metadata: dict


def _read_checkpoint(path: str | Path) -> tuple[dict, str]:
    from .fewshot.train import load_fewshot_checkpoint
    from .train import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path), "classification"
    except CheckpointError as e:
        if not e.wrong_format:  # a training checkpoint with a problem, or no readable checkpoint at all
            raise
    try:
        return load_fewshot_checkpoint(path), "fewshot"
    except CheckpointError as e:
        if not e.wrong_format:
            raise
    raise CheckpointError(f"{Path(path).expanduser()} is neither an nsl training checkpoint (written by `nsl train`) "
                          "nor a few-shot checkpoint (written by `nsl fewshot train`)") from None


def load_for_export(checkpoint: str | Path) -> ExportedModel:
    """The model of a ``nsl train`` checkpoint (the classifier) or of a ``nsl fewshot train``
    checkpoint (its embedding backbone), with its weights, on the CPU in eval mode.

    Raises :class:`nsl.train.CheckpointError` naming the file when it is missing, unreadable, of
    another format, or does not build the model its config describes.
    """
    from .train import CheckpointError

    ckpt, kind = _read_checkpoint(checkpoint)
    try:
        meta = ckpt["meta"]
        if kind == "classification":
            from .train import build_from_checkpoint

            model, cfg = build_from_checkpoint(ckpt, Path(checkpoint).expanduser())
            chw = (int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"]))
            info = {"task": "classification", "model": cfg.model, "layer": cfg.layer, "dataset": cfg.dataset,
                    "output": "logits [N, classes]", "mean": json.dumps(meta.get("mean")),
                    "std": json.dumps(meta.get("std")), "classes": json.dumps(meta.get("classes")),
                    "num_classes": int(meta["num_classes"])}
            what = f"{cfg.model}/{cfg.layer} classifier ({cfg.dataset})"
        else:
            from .fewshot.train import FewShotConfig, build_fewshot_model

            cfg = FewShotConfig.from_dict(ckpt["config"])
            model = build_fewshot_model(cfg, int(meta["in_channels"]), int(meta["image_size"]))
            from .train.run import load_model_state

            load_model_state(model, ckpt["model"], checkpoint)
            model = model.backbone.eval()
            chw = (int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"]))
            info = {"task": "fewshot-embedding", "model": cfg.backbone, "layer": cfg.layer, "dataset": cfg.dataset,
                    "output": "embeddings [N, D] (compare them with the few-shot head)",
                    "mean": json.dumps(meta.get("mean")), "std": json.dumps(meta.get("std"))}
            what = f"{cfg.backbone}/{cfg.layer} few-shot embedding backbone ({cfg.dataset})"
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = lines[0] if lines else type(e).__name__
        if "state_dict" in first:  # weights of another layer kind, width or model than the config says
            detail = lines[1] if len(lines) > 1 else ""
            first = ("its weights do not fit the model its config describes"
                     + (f" ({detail[:160]}{'...' if len(detail) > 160 else ''})" if detail else ""))
        raise CheckpointError(f"cannot build the model of {Path(checkpoint).expanduser()}: {type(e).__name__}: "
                              f"{first}") from None
    return ExportedModel(model.eval(), chw, what, {k: str(v) for k, v in info.items()})


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, warnings and info logs (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_out(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExportError(f"{out} is a directory; expected the path of the .onnx file to write")
    parent = out.parent
    if not parent.exists():
        raise ExportError(f"folder {parent} does not exist (create it first, or choose another output path)")
    if not parent.is_dir():
        raise ExportError(f"{parent} is not a folder, so {out} cannot be written")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"folder {parent} is not writable")
    return out


def export_module(module: nn.Module, out: str | Path, input_shape: tuple[int, ...], *, opset: int | None = None,
                  check: bool = True, atol: float = 1e-4, rtol: float = 1e-4, seed: int = 0,
                  metadata: dict | None = None) -> dict:
    """Export ``module`` to the ONNX file ``out`` for inputs of shape ``input_shape`` = ``[N, C, H, W]``.

    ``N`` (the check batch) becomes a dynamic dimension (traced with a batch of at least 2). The graph is written to a
    temporary file next to ``out``; with ``check`` and ``onnxruntime`` installed it is run on
    ``x ~ N(0, 1)`` (seeded) and compared with ``module(x)``: it fails when
    ``max |y_onnx - y_torch| > atol + rtol * max |y_torch|``. Only then is it moved to ``out``.

    Returns ``{"out", "input_shape", "output_shape", "opset", "onnx_ops" (sorted operator types, when
    ``onnx`` is installed), "checked" (bool), "max_abs_diff" (or None), "tolerance"}``.

    Raises:
        ExportError: the output path is unusable, the exporter (or its dependency ``onnxscript``)
            fails, or the check finds a difference beyond the tolerance.
    """
    out = _check_out(out)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ExportError(f"input_shape must be [N, C, H, W] with positive sizes, got {list(input_shape)}")
    if opset is not None and (not isinstance(opset, int) or opset < 7):
        raise ExportError(f"opset must be an integer >= 7, got {opset!r}")
    module = module.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    example = x if shape[0] >= 2 else torch.randn((2, *shape[1:]), generator=g)  # a batch of 1 would be fixed
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        try:
            with _quiet(), torch.no_grad():
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(module, (example,), str(tmp), input_names=["input"], output_names=["output"],
                                  opset_version=opset, dynamo=True, external_data=False,
                                  dynamic_shapes=({0: batch},))
        except ImportError as e:
            raise ExportError(f"ONNX export needs the packages of the nsl[onnx] extra ({e}); install them with "
                              f"{INSTALL_ONNX}") from None
        except Exception as e:  # noqa: BLE001 - any exporter failure becomes one line naming the model
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"torch.onnx.export failed for {type(module).__name__}"
                              f"{f' at opset {opset}' if opset else ''}: {type(e).__name__}: {text}") from None
        with torch.no_grad():
            ref = module(x)
        result = {"out": str(out), "input_shape": list(shape), "output_shape": list(ref.shape), "opset": opset,
                  "onnx_ops": None, "checked": False, "max_abs_diff": None, "tolerance": None}
        try:
            import onnx
        except ImportError:
            onnx = None
        if onnx is not None:
            proto = onnx.load(str(tmp))
            result["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
            result["onnx_ops"] = sorted({n.op_type for n in proto.graph.node})
            if metadata:
                for key, value in metadata.items():
                    entry = proto.metadata_props.add()
                    entry.key, entry.value = f"nsl.{key}", str(value)
                onnx.save(proto, str(tmp))
        if check:
            try:
                import onnxruntime as ort
            except ImportError:
                ort = None
            if ort is not None:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                session = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
                (y,) = session.run(None, {"input": x.numpy()})
                diff = (torch.from_numpy(y) - ref).abs().max().item()
                tol = atol + rtol * ref.abs().max().item()
                result.update(checked=True, max_abs_diff=diff, tolerance=tol)
                if not diff <= tol:
                    raise ExportError(f"the ONNX graph disagrees with PyTorch: max |onnx - torch| = {diff:.3e} > "
                                      f"tolerance {tol:.3e} on a random input of shape {list(shape)}; "
                                      f"{out} was not written")
        os.replace(tmp, out)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(checkpoint: str | Path, out: str | Path, *, fold: bool = False, opset: int | None = None,
                input_size: tuple[int, int] | None = None, batch: int = 2, check: bool = True,
                atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Export the model of a training checkpoint to ONNX.

    Args:
        checkpoint: ``RUN_DIR/checkpoints/{best,last}.pt`` of ``nsl train`` (exports the classifier,
            ``[N, C, H, W] -> logits [N, classes]``) or of ``nsl fewshot train`` (exports the embedding
            backbone, ``[N, C, H, W] -> [N, D]``).
        out: the ``.onnx`` file to write (its folder must exist).
        fold: first replace every static NSL layer by the equivalent plain convolution
            (:func:`nsl.fold`), so the graph is that of a plain CNN; dynamic layers stay dynamic.
        opset: ONNX opset (default: the exporter's).
        input_size: ``(H, W)`` of the example input (default: the training image size).
        batch: the example and check batch size (the exported batch dimension is dynamic).
        check: compare with onnxruntime when it is installed (see :func:`export_module`).
        atol, rtol: the check's tolerance, ``atol + rtol * max |y_torch|``.

    Returns:
        :func:`export_module`'s dict with ``"what"`` (the exported model in words) and
        ``"folded_static_layers"`` (0 without ``fold``).

    Raises:
        nsl.train.CheckpointError: the checkpoint is missing, unreadable or not an nsl checkpoint.
        ExportError: as :func:`export_module`, or bad ``input_size`` / ``batch``.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    if input_size is not None and (len(input_size) != 2 or min(int(s) for s in input_size) < 1):
        raise ExportError(f"input_size must be (H, W) with positive sizes, got {list(input_size)}")
    _check_out(out)  # before the (possibly long) model build
    model = load_for_export(checkpoint)
    module, folded = model.module, 0
    if fold:
        folded = sum(isinstance(m, NSConv2d) for m in module.modules())
        module = fold_model(module).eval()
    c, h, w = model.input_chw
    if input_size is not None:
        h, w = (int(s) for s in input_size)
    try:
        with torch.no_grad():
            y = module(torch.zeros(2, c, h, w))
    except Exception as e:  # noqa: BLE001 - a model that cannot take this input size
        raise ExportError(f"the {model.what} cannot take {h}x{w} inputs ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    n_classes = model.metadata.get("num_classes")
    if n_classes is not None and tuple(y.shape[1:]) != (int(n_classes),):
        raise ExportError(f"the {model.what} maps {h}x{w} inputs to outputs of shape [N, "
                          f"{', '.join(map(str, y.shape[1:]))}], not [N, {n_classes}] logits; it was built for "
                          f"{model.input_chw[1]}x{model.input_chw[2]} inputs")
    meta = {**{k: v for k, v in model.metadata.items() if v != "null"}, "folded": str(bool(fold))}
    result = export_module(module, out, (batch, c, h, w), opset=opset, check=check, atol=atol, rtol=rtol,
                           metadata=meta)
    result.update(what=model.what, folded_static_layers=folded)
    return result
