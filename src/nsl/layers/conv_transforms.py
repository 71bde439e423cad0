"""What some ``nn.Conv2d`` subclasses do around their convolution, as modules an NSL layer can keep.

:func:`nsl.convert` turns such a subclass into an NSL layer that computes exactly what it computed
(at ``M = I``) by attaching these as the layer's ``weight_transform`` (``W -> T(W)``) and
``input_padding`` (``x -> pad(x)``); see :func:`nsl.register_conv_subclass`.
"""

from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._geometry import pair

__all__ = ["StandardizedWeight", "SamePadding"]


class StandardizedWeight(nn.Module):
    """Weight standardisation per output filter, optionally with a learned gain (BiT's ``StdConv2d``,
    NFNet's ``ScaledStdConv2d``).

    ``T(W)[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps) * (gain[o] * scale)`` with the mean and the
    biased variance over the ``C_in/groups * kh * kw`` entries of filter ``o``; without a gain the
    factor is 1. Computed with ``F.batch_norm`` on ``W`` viewed ``[1, C_out, -1]``, as those layers do.

    Args:
        eps: added to the variance.
        gain: ``None`` or the initial gain ``[C_out, 1, 1, 1]`` (becomes the parameter ``gain``).
        scale: constant factor of the gain (NFNet: ``gamma / sqrt(fan_in)``).

    Shapes: ``W [C_out, C_in/groups, kh, kw]`` -> same.
    """

    def __init__(self, eps: float = 1e-6, gain: Tensor | None = None, scale: float = 1.0):
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"StandardizedWeight: eps must be positive, got {eps!r}")
        self.eps = float(eps)
        self.scale = float(scale)
        self.gain = None if gain is None else nn.Parameter(gain.detach().clone())

    def forward(self, weight: Tensor) -> Tensor:
        out = weight.shape[0]
        affine = None if self.gain is None else (self.gain * self.scale).view(-1)
        return F.batch_norm(weight.reshape(1, out, -1), None, None, weight=affine, training=True, momentum=0.0,
                            eps=self.eps).reshape_as(weight)

    def extra_repr(self) -> str:
        s = f"eps={self.eps}"
        if self.gain is not None:
            s += f", gain=[{self.gain.shape[0]}], scale={self.scale:g}"
        return s


class SamePadding(nn.Module):
    """TensorFlow's ``'SAME'`` padding, computed from the input size at every call (``Conv2dSame``).

    Per spatial dimension of size ``i`` with kernel ``k``, stride ``s``, dilation ``d``: total padding
    ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``, ``total // 2`` before and the rest after,
    so that the strided convolution's output has ``ceil(i / s)`` positions.

    Shapes: ``[N, C, H, W]`` -> ``[N, C, H + pad_h, W + pad_w]``.
    """

    def __init__(self, kernel_size, stride=1, dilation=1, value: float = 0.0):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.value = float(value)

    @staticmethod
    def _total(size: int, k: int, s: int, d: int) -> int:
        return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)

    def forward(self, input: Tensor) -> Tensor:
        ih, iw = input.shape[-2:]
        ph = self._total(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = self._total(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        return F.pad(input, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"

