"""The dynamic NSL convolution in the operators ONNX exporters map one-to-one (Conv, Mul, ReduceSum, Reshape).

For a padded input ``xpad`` ``[N, C, H, W]``, weight ``w`` ``[C_out, C/groups, kh, kw]`` and a
predicted similarity ``M`` (diagonal ``[N, P, H_out, W_out]`` or full ``[N, P, P, H_out, W_out]``,
``P = kh * kw``):

1. ``cols = conv2d(xpad, E, stride, dilation, groups=C)`` with the fixed one-hot weight
   ``E`` ``[C * P, 1, kh, kw]`` (``E[c * P + p, 0] = e_p``): channel ``c * P + q`` of ``cols`` is input
   channel ``c`` read at kernel position ``q``, i.e. the columns ``[N, C, P, H_out, W_out]``;
2. mix: diagonal ``m_q * col_q`` (one broadcast ``Mul``); full ``sum_q M[p, q] col_q`` (``Mul`` then
   ``ReduceSum`` over ``q``);
3. ``out = conv2d(mixed, w.reshape(C_out, C/groups * P, 1, 1), groups=groups)``: the contraction with
   ``w`` as a 1x1 grouped convolution.

Runtimes run each step with their convolution kernels instead of the ``P`` strided slices, ``Stack``
and ``Einsum`` of the reference formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dynamic_ns_conv2d_export(xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry) -> Tensor:
    """``out[n, o, y] = sum_{c, p, q} w[o, c, p] M[p, q](y) xpad[n, c, y + q]`` in Conv/Mul/ReduceSum ops.

    ``geometry`` is the :class:`nsl._geometry.ConvGeometry` ``(kh, kw, stride, dilation, (H_out, W_out))``
    of the already padded ``xpad``. Returns ``[N, C_out, H_out, W_out]``.
    """
    c = xpad.shape[1]
    out_c, cg, kh, kw = weight.shape
    _, _, stride, dilation, (oh, ow) = geometry
    p = kh * kw
    onehot = torch.eye(p, dtype=xpad.dtype, device=xpad.device).reshape(p, 1, kh, kw).repeat(c, 1, 1, 1)
    cols = F.conv2d(xpad, onehot, stride=tuple(stride), dilation=tuple(dilation), groups=c)
    cols = cols.reshape(-1, c, p, oh, ow)
    if sim.dim() == 4:  # diagonal [n, P, H_out, W_out]
        mixed = cols * sim.unsqueeze(1)
    else:  # full [n, P, P, H_out, W_out]: sum_q M[p, q] col_q
        mixed = (sim.unsqueeze(1) * cols.unsqueeze(2)).sum(3)
    return F.conv2d(mixed.reshape(-1, c * p, oh, ow), weight.reshape(out_c, cg * p, 1, 1), groups=groups)
