"""The dynamic NSL convolution in the operators ONNX exporters map one-to-one (Slice, Mul, Add, Conv).

For a padded input ``xpad`` ``[N, C, H, W]``, weight ``w`` ``[C_out, C/groups, kh, kw]`` and a
predicted similarity ``M`` (diagonal ``[N, P, H_out, W_out]`` or full ``[N, P, P, H_out, W_out]``,
``P = kh * kw``), position ``q = i * kw + j`` reading ``xpad`` at offset ``(i * dh, j * dw)``:

1. ``col_q = xpad[:, :, i dh :: sh, j dw :: sw]`` cut to ``H_out x W_out``: one strided ``Slice`` per
   position, the input as position ``q`` of every filter reads it (``[N, C, H_out, W_out]`` each);
2. per filter position ``p``, the mixed input ``u_p = m_p col_p`` (diagonal, one ``Mul``) or
   ``u_p = sum_q M[p, q] col_q`` (full, ``Mul`` and ``Add``), ``M``'s channel broadcast over ``C``;
3. ``out = sum_p conv2d(u_p, w[:, :, i_p, j_p], groups)``: ``P`` 1x1 convolutions (GEMMs over ``C``),
   accumulated.

No tensor ``P`` times the input (or ``P * P`` times, full) is ever built: the one-hot grouped ``Conv`` of the
previous version materialised all ``P`` shifted copies at once and cost ONNX Runtime more than these ``P``
copies of one at a time (CNN-9 layer shapes at batch 32: 1.2-1.4x; ``benchmarks/onnx_runtime.py``). Slices
are exact copies, so a non-finite input only reaches the positions that read it (a one-hot weight's zeros
times an ``inf`` made ``NaN`` at every position of its window).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dynamic_ns_conv2d_export(xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry) -> Tensor:
    """``out[n, o, y] = sum_{c, p, q} w[o, c, p] M[p, q](y) xpad[n, c, y * s + d * offset(q)]`` in Slice, Mul,
    Add and 1x1 Conv ops (module docstring).

    ``geometry`` is the :class:`nsl._geometry.ConvGeometry` ``(kh, kw, stride, dilation, (H_out, W_out))``
    of the already padded ``xpad``; ``sim`` is ``[N, P, H_out, W_out]`` (diagonal) or
    ``[N, P, P, H_out, W_out]`` (full). Returns ``[N, C_out, H_out, W_out]``.
    """
    kh, kw, (sh, sw), (dh, dw), (oh, ow) = geometry
    kh, kw = int(kh), int(kw)  # the layer's constant kernel size (a traced size under torch.jit.trace)
    cols = [xpad[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    out = None
    for p in range(kh * kw):
        if sim.dim() == 4:  # diagonal: m_p col_p
            mixed = cols[p] * sim[:, p: p + 1]
        else:  # full: sum_q M[p, q] col_q
            mixed = cols[0] * sim[:, p, 0:1]
            for q in range(1, kh * kw):
                mixed = mixed + cols[q] * sim[:, p, q: q + 1]
        i, j = divmod(p, kw)
        term = F.conv2d(mixed, weight[:, :, i: i + 1, j: j + 1], groups=groups)
        out = term if out is None else out + term
    return out
