"""Faster forward paths of the built-in similarity predictors, computing exactly their formulas.

* Eval mode: a ``BatchNorm2d`` (running statistics) right after a plain convolution is folded into
  it, ``BN(conv(x, w) + b) = conv(x, w * s) + (b * s + beta - mu * s)`` with ``s = gamma / sqrt(var + eps)``
  per output channel, so the convolution's own bias add replaces the norm's pass over the feature
  map. The fold is computed at every call from the current parameters and buffers (a few
  ``C_out x C_in x k x k`` multiply-adds), so nothing is cached that could go stale, and training
  mode (batch statistics, running-statistics updates) is never folded.
* CPU, float32 / bfloat16: the predictors run channels-last. PyTorch's contiguous (NCHW)
  depthwise convolution on CPU takes a slow path, channels-last goes to oneDNN; oneDNN's
  convolutions with few output channels (the last conv's ``P`` = 9) and its batch norms are faster
  channels-last too (measured, ``benchmarks/layers.py`` ``pred-diag/*``). ``g`` (``P`` or ``P * P``
  channels) is made contiguous again for the op. Inside ``torch.func`` transforms the input keeps its layout
  (``vmap`` cannot convert a batched tensor to channels-last).
* The light predictor on CPU and CUDA: the fused operator ``torch.ops.nsl.light_predictor``
  (:mod:`nsl._light_ops`; a C++ kernel on CPU, the Triton kernel on CUDA, each writing nothing but ``g``, or
  ``M = I + g`` for the layer) wherever :func:`nsl._light_ops.fused_ready` allows and the predictor is the built-in
  one (plain ``nn.Conv2d`` modules of its shapes, its two norms both ``BatchNorm2d``, both ``GroupNorm`` or both
  absent, no hooks on them: ``nsl.report.count_macs`` counts with forward hooks) and, on CPU, its maps are large
  enough to gain (:data:`nsl._light_ops.MIN_LOCATIONS`, measured on CPU only); the running statistics are then
  updated here exactly as ``nn.BatchNorm2d`` updates them.
  Everywhere else (other devices, ``torch.func`` transforms, ONNX export and tracing, the C++ kernel not
  built, Triton unusable on the GPU) the modules run as below.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import _light_ops
from .._func import transforms_active
from .._geometry import output_size

__all__ = ["conv_then_norm", "light_predictor_forward", "sphere_predictor_forward"]

_CHANNELS_LAST_DTYPES = (torch.float32, torch.bfloat16)


def _eval_batch_norm(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(s, t)`` with ``norm(h) = h * s + t`` per channel, for a ``BatchNorm2d`` that uses its running
    statistics (eval mode, statistics tracked); ``None`` for anything else (batch statistics, other norms)."""
    if not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_mean is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def conv_then_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))`` for a plain ``nn.Conv2d``; one convolution with the norm folded in where
    :func:`_eval_batch_norm` allows (eval-mode ``BatchNorm2d``), else the two modules in turn.

    Shapes: ``x [N, C_in, H, W]`` -> ``[N, C_out, H_out, W_out]``.
    """
    folded = _eval_batch_norm(norm)
    if folded is None or conv._forward_hooks or conv._forward_pre_hooks:  # hooks (e.g. MAC counts) see the conv
        return norm(conv(x))
    scale, shift = folded
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, weight, bias)


def _to_channels_last(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` channels-last where that layout is the faster one (CPU, float32 / bfloat16), and whether it is.

    Not inside ``torch.func`` transforms (:func:`nsl._func.transforms_active`): ``vmap`` cannot convert a
    batched tensor's memory format (it cannot query ``is_contiguous`` for channels-last), and the layout
    is only a speed choice; the values are the same either way.
    """
    if x.device.type == "cpu" and x.dtype in _CHANNELS_LAST_DTYPES and not transforms_active():
        return x.contiguous(memory_format=torch.channels_last), True
    return x, False


def _hooked(*modules: nn.Module) -> bool:
    """True when any of ``modules`` has forward or backward hooks (which must see the module run)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
               for m in modules)


def _dw_padding(dw: nn.Conv2d) -> tuple[int, int] | None:
    """The depthwise conv's symmetric padding ``(ph, pw)`` (``'valid'``: 0; ``'same'`` where it is symmetric), or
    None where it is not symmetric."""
    if not isinstance(dw.padding, str):
        return tuple(dw.padding)
    if dw.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(dw.dilation, dw.kernel_size)]
    return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)


def _norm_arguments(norm: nn.Module):
    """``(mode, groups, eps, [weight, bias, running mean, running var])`` of a predictor norm for the fused operator
    (mode: a key of :data:`nsl._light_ops.NORM_CODES`; statistics None where batch statistics are used), or None
    for a norm it does not compute. ``BatchNorm2d`` follows ``nn.BatchNorm2d.forward``: batch statistics in
    training mode or without running statistics, else the running ones."""
    kind = type(norm)
    if kind is nn.Identity:
        return "none", 1, 1e-5, [None] * 4
    if kind is nn.GroupNorm:
        return "group", norm.num_groups, norm.eps, [norm.weight, norm.bias, None, None]
    if kind is not nn.BatchNorm2d:
        return None
    if norm.training or (norm.running_mean is None and norm.running_var is None):
        return "batch", 1, norm.eps, [norm.weight, norm.bias, None, None]
    if norm.running_mean is None or norm.running_var is None:
        return None
    return "running", 1, norm.eps, [norm.weight, norm.bias, norm.running_mean, norm.running_var]


def _fusable(p) -> bool:
    """True when ``p``'s modules are the built-in light predictor's (plain convolutions of its shapes, no hooks)."""
    dw, pw, out = p.dw, p.pw, p.out
    if not (type(dw) is nn.Conv2d and type(pw) is nn.Conv2d and type(out) is nn.Conv2d):
        return False
    if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels or dw.bias is not None:
        return False
    if dw.padding_mode != "zeros" or pw.bias is not None:
        return False
    pointwise = all(m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid")
                    and m.groups == 1 and m.padding_mode == "zeros" for m in (pw, out))
    return pointwise and not _hooked(dw, pw, out, p.bn0, p.bn1)


def _track_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Update ``bn``'s running statistics with a batch's ``mean`` and biased ``var`` over ``count`` values, as
    ``nn.BatchNorm2d.forward`` in training mode does (``num_batches_tracked``, momentum or, with
    ``momentum=None``, the cumulative average; the unbiased variance ``var * count / (count - 1)``)."""
    if not (bn.training and bn.track_running_stats):
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    with torch.no_grad():  # ATen's order: momentum * batch + (1 - momentum) * running
        bn.running_mean.copy_(factor * mean + (1 - factor) * bn.running_mean)
        bn.running_var.copy_(factor * (var * (count / (count - 1))) + (1 - factor) * bn.running_var)


def _light_fused(p, x: Tensor, identity: bool) -> Tensor | None:
    """``g`` (``M = I + g`` with ``identity``) by the fused operator, ``[N, P or P*P, H_out, W_out]``, with the
    running statistics updated; None where the operator does not apply (the module docstring)."""
    if not (_light_ops.fused_ready(x) and _fusable(p)):
        return None
    norms = (_norm_arguments(p.bn0), _norm_arguments(p.bn1))
    padding = _dw_padding(p.dw)
    if norms[0] is None or norms[1] is None or norms[0][0] != norms[1][0] or padding is None:
        return None
    (mode, groups0, eps0, args0), (_, groups1, eps1, args1) = norms
    n, _, h, w = x.shape
    oh, ow = output_size((h, w), p.dw.kernel_size, p.dw.stride, padding, p.dw.dilation)
    threshold = _light_ops.MIN_LOCATIONS["multi-pass" if mode in ("batch", "group") else "one-pass"]
    if x.device.type == "cpu" and oh * ow < threshold:
        return None  # small maps: the modules are faster on CPU (CUDA: not measured, the operator always runs)
    count = n * oh * ow
    if mode == "batch" and (count == 1 or n == 0):  # nn.BatchNorm2d's error (or its empty-batch rule) there
        return None
    sim, mean0, var0, mean1, var1 = torch.ops.nsl.light_predictor(
        x, p.dw.weight, p.pw.weight, p.out.weight, p.out.bias, *args0, *args1, list(p.dw.stride), list(padding),
        list(p.dw.dilation), _light_ops.NORM_CODES[mode], groups0, groups1, eps0, eps1, identity)
    if mode == "batch":
        _track_running_stats(p.bn0, mean0, var0, count)
        _track_running_stats(p.bn1, mean1, var1, count)
    return sim


def light_predictor_forward(p, x: Tensor, identity: bool = False) -> Tensor:
    """:class:`~nsl.layers.dynamic.LightPredictor`'s ``g = tanh(out(ReLU(N(pw(ReLU(N(dw(x))))))))``, or with
    ``identity`` the similarity ``M = I + g`` (1 added to every channel for diagonal ``M``, to channels
    ``p * (P + 1)`` for full ``M``). On CPU and CUDA by the fused operator where it applies (module docstring), else the
    modules: channels-last on CPU (float32 / bfloat16), the norms folded in eval mode.

    Shapes: ``x [N, C_in, H, W]`` -> ``[N, P or P*P, H_out, W_out]`` (contiguous).
    """
    fused = _light_fused(p, x, identity)
    if fused is not None:
        return fused
    x, channels_last = _to_channels_last(x)
    h = F.relu(conv_then_norm(p.dw, p.bn0, x), inplace=True)  # in place: nothing saves the norm's output
    h = F.relu(conv_then_norm(p.pw, p.bn1, h), inplace=True)
    g = torch.tanh(p.out(h))
    g = g.contiguous() if channels_last else g
    if not identity:
        return g
    P = p.dw.kernel_size[0] * p.dw.kernel_size[1]
    if g.shape[1] == P:
        return g + 1.0
    return g + torch.eye(P, device=g.device, dtype=g.dtype).view(1, P * P, 1, 1)


def sphere_predictor_forward(p, x: Tensor) -> Tensor:
    """:class:`~nsl.layers.dynamic.SimilarityPredictor`'s ``g = N(conv2(ReLU(N(SphereConv(x)))))``,
    channels-last on CPU (float32 / bfloat16), the last norm folded into a plain ``conv2`` in eval mode.

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]`` (contiguous).
    """
    x, channels_last = _to_channels_last(x)
    h = F.relu(p.bn1(p.conv1(x)), inplace=True)  # in place: nothing saves the norm's output
    g = conv_then_norm(p.conv2, p.bn2, h) if type(p.conv2) is nn.Conv2d else p.bn2(p.conv2(h))
    return g.contiguous() if channels_last else g
