"""An independent brute-force evaluation of neural similarity convolution, for tests.

Written straight from the formula, with explicit index arithmetic (no unfold, no padding op, no
code shared with ``nsl.functional``)::

    out[n, o, y] = bias[o] + sum_{c, p, q} w[o, c, p] * M[p, q](y) * x[n, c, y*stride + dilation*offset(q) - pad]
"""

from __future__ import annotations

import torch


def brute_ns_conv2d(x, w, sim, bias=None, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """``pad`` is ``(top, bottom, left, right)``; ``sim`` as in ``ns_conv2d`` (static or dynamic)."""
    x, w, sim = x.double(), w.double(), sim.double()
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    P = kh * kw
    pt, pb, pl, pr = pad
    sh, sw = stride
    dh, dw = dilation
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(n, o, oh, ow, dtype=torch.float64)
    og = o // groups
    for q in range(P):
        i, j = divmod(q, kw)
        rows = torch.arange(oh) * sh + dh * i - pt
        cols = torch.arange(ow) * sw + dw * j - pl
        rvalid = (rows >= 0) & (rows < h)
        cvalid = (cols >= 0) & (cols < wd)
        patch = x[:, :, rows.clamp(0, h - 1)][:, :, :, cols.clamp(0, wd - 1)]
        patch = patch * (rvalid[:, None] & cvalid[None, :]).double()  # [n, c, oh, ow]
        for p in range(P):
            if sim.dim() == 1:
                mpq = sim[q] if p == q else None
            elif sim.dim() == 2:
                mpq = sim[p, q]
            elif sim.dim() == 4:
                mpq = sim[:, q, None] if p == q else None  # [n, 1, oh, ow]
            else:
                mpq = sim[:, p, q, None]
            if mpq is None:
                continue
            for g in range(groups):
                wp = w[g * og:(g + 1) * og, :, p // kw, p % kw]  # [og, cg]
                contrib = torch.einsum("oc,nchw->nohw", wp, patch[:, g * cg:(g + 1) * cg])
                out[:, g * og:(g + 1) * og] += contrib * mpq
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)
    return out
