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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._func import transforms_active

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


def light_predictor_forward(p, x: Tensor) -> Tensor:
    """:class:`~nsl.layers.dynamic.LightPredictor`'s ``g = tanh(out(ReLU(N(pw(ReLU(N(dw(x))))))))``,
    channels-last on CPU (float32 / bfloat16), the norms folded in eval mode.

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]`` (contiguous).
    """
    x, channels_last = _to_channels_last(x)
    h = F.relu(conv_then_norm(p.dw, p.bn0, x), inplace=True)  # in place: nothing saves the norm's output
    h = F.relu(conv_then_norm(p.pw, p.bn1, h), inplace=True)
    g = torch.tanh(p.out(h))
    return g.contiguous() if channels_last else g


def sphere_predictor_forward(p, x: Tensor) -> Tensor:
    """:class:`~nsl.layers.dynamic.SimilarityPredictor`'s ``g = N(conv2(ReLU(N(SphereConv(x)))))``,
    channels-last on CPU (float32 / bfloat16), the last norm folded into a plain ``conv2`` in eval mode.

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]`` (contiguous).
    """
    x, channels_last = _to_channels_last(x)
    h = F.relu(p.bn1(p.conv1(x)), inplace=True)  # in place: nothing saves the norm's output
    g = conv_then_norm(p.conv2, p.bn2, h) if type(p.conv2) is nn.Conv2d else p.bn2(p.conv2(h))
    return g.contiguous() if channels_last else g
