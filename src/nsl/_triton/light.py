"""Triton kernels of the light predictor (undecorated; see ``nsl._triton.light_forward`` and ``light_backward``).

Like :mod:`nsl._triton.kernels`, this is plain Python in Triton's language, wrapped lazily by
``nsl._triton.jit_kernel`` (``JITFunction`` on a GPU, ``InterpretedFunction`` under
``TRITON_INTERPRET=1``), so importing ``nsl._triton`` never imports this module. The kernels' device
functions, named in ``HELPERS`` (``_tap``, the ``[BLOCK_M, BLOCK_C]`` tile of an input tap, and ``_depthwise_tile``,
that of ``a0``, which calls ``_tap``), are plain Python too: a compiled kernel can call only a ``JITFunction``,
which the interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel"), and both modes
would share this module's globals; so ``jit_kernel`` gives the kernel and the helpers one namespace of their own
(this module's globals, each helper wrapped as the kernel is) and wraps copies of the functions whose globals
are that namespace, so that a helper calling a helper calls it wrapped too (this module is not changed;
compiled code inlines the helpers).

The light predictor (``nsl._light_ops``) for one output location ``y`` of sample ``n``::

    a0[c]  = sum_p dw[c, p] x_p[n, c](y)                     depthwise conv, x_p the (zero-padded) tap p
    r0[c]  = ReLU((a0[c] - mean0[n, c]) * scale0[n, c] + shift0[n, c])
    a1[h]  = sum_c pw[h, c] r0[c]                            1x1 conv, C -> HID
    r1[h]  = ReLU((a1[h] - mean1[n, h]) * scale1[n, h] + shift1[n, h])
    sim[o] = tanh(sum_h ow[o, h] r1[h] + bias[o]) + (1 if ID_STEP > 0 and o % ID_STEP == 0)

Each norm is an affine map per (sample, channel) prepared by the launcher: ``mean = 0, scale = 1,
shift = 0`` (no norm), ``scale = gamma / sqrt(var + eps)``, ``shift = beta`` (batch, running and
group norms; ``NSTRIDE* = 0`` when the vectors are per channel, ``C`` or ``HID`` when per sample).

Layouts (all contiguous): ``x [N, C, H, W]``; ``dw [C, P]``; ``pw [HID, C]``; ``ow [OUTC, HID]``;
``bias [OUTC]``; the norm vectors float32 ``[N or 1, C or HID]``; ``sim [N, OUTC, Ho * Wo]``;
partial statistics float32 ``[N, TILES, C or HID]``. Grid ``(N * TILES, blocks)`` (program ``n * TILES + t``,
so the batch is not bound by the 65535 limit of the grid's other axes): a program takes
``BLOCK_M`` output locations of one sample (so a tile never mixes samples, which group statistics
need) and one block of channels (``STAGE`` 0: ``BLOCK_C`` of ``C``; 1: ``BLOCK_H`` of ``HID``; 2:
``BLOCK_O`` of ``OUTC``).

``STAGE`` (constexpr): 0 writes the tile's mean and sum of squared deviations from that mean
(``m2``) of ``a0`` per channel; 1 recomputes ``a0``, applies norm 0 and writes the same of ``a1``;
2 computes and writes ``sim`` (nothing else is written: ``a0``, ``a1`` live in registers, ``a0``
recomputed per ``BLOCK_H`` block of hidden channels). The launcher combines the per-tile
``(count, mean, m2)`` with Chan's formula in a fixed order (deterministic, no cancellation for
inputs with a large mean). The per-tile column sums are float32 IEEE ``tl.dot`` products with the
``[BLOCK_M, BLOCK_M]`` matrix ``J`` of valid rows (each result row holds the sums; row 0 is stored):
``tl.sum`` was wrapped once, when ``triton.language`` was imported (a ``JITFunction`` unless
``TRITON_INTERPRET=1`` was set then), so one of the two modes could not call it (as :mod:`nsl._triton.kernels`'
``dsim`` notes). ``DOT_F32``/``PRECISION`` as in :mod:`nsl._triton.kernels`.
"""

import triton.language as tl

#: The device functions the kernels call, by name: ``nsl._triton.jit_kernel`` wraps each like the kernel (module
#: docstring).
HELPERS = ("_tap", "_depthwise_tile")


def _tap(x_ptr, x_base, p, yh, yw, row_ok, cc, c_ok, H, W, KW, SH, SW, PH, PW, DH, DW):
    """``x_p [BLOCK_M, BLOCK_C]`` float32, input tap ``p`` of the sample at ``x_base`` for the output locations
    ``(yh, yw)`` (rows, valid where ``row_ok``) and the channels ``cc`` (columns, valid where ``c_ok``); 0 in invalid
    rows and columns and where the tap falls in the padding."""
    ih = yh * SH + (p // KW) * DH - PH
    iw = yw * SW + (p % KW) * DW - PW
    ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptr + (x_base + ih * W + iw)[:, None] + cc[None, :] * (H * W),
                   mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


def _depthwise_tile(x_ptr, dw_ptr, x_base, yh, yw, row_ok, cc, c_ok, H, W, KW, P, SH, SW, PH, PW, DH, DW,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``a0 [BLOCK_M, BLOCK_C]`` float32, the depthwise conv of the sample at ``x_base`` at the output locations
    ``(yh, yw)`` (rows, valid where ``row_ok``) for the channels ``cc`` (columns, valid where ``c_ok``); 0 in
    invalid rows and columns."""
    a0 = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for p in range(0, P):
        xv = _tap(x_ptr, x_base, p, yh, yw, row_ok, cc, c_ok, H, W, KW, SH, SW, PH, PW, DH, DW)
        wv = tl.load(dw_ptr + cc * P + p, mask=c_ok, other=0.0).to(tl.float32)
        a0 += xv * wv[None, :]
    return a0


def light_fwd_kernel(x_ptr, dw_ptr, pw_ptr, ow_ptr, bias_ptr, mean0_ptr, scale0_ptr, shift0_ptr,
                     mean1_ptr, scale1_ptr, shift1_ptr, out_ptr, m2_ptr,
                     C, H, W, Ho, Wo, KW, P, HID, OUTC, SH, SW, PH, PW, DH, DW, NSTRIDE0, NSTRIDE1, ID_STEP,
                     TILES,
                     STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_O: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """STAGE 0/1: per-tile (mean, m2) of a0/a1 into (out_ptr, m2_ptr) [N, TILES, C or HID]; STAGE 2:
    sim [N, OUTC, L] into out_ptr; STAGE 3 (for the backward): a1 [N, HID, L] float32 into out_ptr (module
    docstring)."""
    t = tl.program_id(0) % TILES
    n = tl.program_id(0) // TILES
    blk = tl.program_id(1)
    L = Ho * Wo
    HW = H * W
    l = t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = l < L
    yh = l // Wo
    yw = l % Wo
    x_base = n.to(tl.int64) * C * HW
    dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    count = tl.minimum(L - t * BLOCK_M, BLOCK_M).to(tl.float32)
    if STAGE == 0:
        cc = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        a0 = _depthwise_tile(x_ptr, dw_ptr, x_base, yh, yw, row_ok, cc, c_ok, H, W, KW, P, SH, SW, PH, PW, DH, DW,
                             BLOCK_M, BLOCK_C)
        # column sums as IEEE dots with the valid-rows matrix J (every row of the result the same sum)
        J = tl.where((tl.arange(0, BLOCK_M)[:, None] >= 0) & row_ok[None, :], 1.0, 0.0)
        mean = tl.dot(J, tl.where(row_ok[:, None], a0, 0.0), input_precision="ieee") / count
        d = tl.where(row_ok[:, None], a0 - mean, 0.0)
        m2 = tl.dot(J, d * d, input_precision="ieee")
        first = (tl.arange(0, BLOCK_M) == 0)[:, None] & c_ok[None, :]
        off = ((n.to(tl.int64) * TILES + t) * C + cc)[None, :] + tl.arange(0, BLOCK_M)[:, None] * 0
        tl.store(out_ptr + off, mean, mask=first)
        tl.store(m2_ptr + off, m2, mask=first)
    else:
        if STAGE == 2:
            h_lo = 0
            h_hi = HID
            oo = blk * BLOCK_O + tl.arange(0, BLOCK_O)
            o_ok = oo < OUTC
            acc = tl.full((BLOCK_M, BLOCK_O), 0.0, tl.float32)
        else:
            h_lo = blk * BLOCK_H
            h_hi = h_lo + BLOCK_H
        for h0 in range(h_lo, h_hi, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            h_ok = hh < HID
            a1 = tl.full((BLOCK_M, BLOCK_H), 0.0, tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + tl.arange(0, BLOCK_C)
                c_ok = cc < C
                a0 = _depthwise_tile(x_ptr, dw_ptr, x_base, yh, yw, row_ok, cc, c_ok, H, W, KW, P, SH, SW, PH, PW,
                                     DH, DW, BLOCK_M, BLOCK_C)
                nc = n * NSTRIDE0 + cc
                m0 = tl.load(mean0_ptr + nc, mask=c_ok, other=0.0)
                s0 = tl.load(scale0_ptr + nc, mask=c_ok, other=0.0)
                b0 = tl.load(shift0_ptr + nc, mask=c_ok, other=0.0)
                r0 = tl.maximum((a0 - m0[None, :]) * s0[None, :] + b0[None, :], 0.0)
                wp = tl.load(pw_ptr + hh[None, :] * C + cc[:, None], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
                a1 = tl.dot(r0.to(dot_ty), wp.to(dot_ty), a1, input_precision=PRECISION)
            if STAGE == 1:
                J = tl.where((tl.arange(0, BLOCK_M)[:, None] >= 0) & row_ok[None, :], 1.0, 0.0)
                mean = tl.dot(J, tl.where(row_ok[:, None], a1, 0.0), input_precision="ieee") / count
                d = tl.where(row_ok[:, None], a1 - mean, 0.0)
                m2 = tl.dot(J, d * d, input_precision="ieee")
                first = (tl.arange(0, BLOCK_M) == 0)[:, None] & h_ok[None, :]
                off = ((n.to(tl.int64) * TILES + t) * HID + hh)[None, :] + tl.arange(0, BLOCK_M)[:, None] * 0
                tl.store(out_ptr + off, mean, mask=first)
                tl.store(m2_ptr + off, m2, mask=first)
            elif STAGE == 3:
                off = (n.to(tl.int64) * HID + hh)[None, :] * L + l[:, None]
                tl.store(out_ptr + off, a1, mask=row_ok[:, None] & h_ok[None, :])
            else:
                nh = n * NSTRIDE1 + hh
                m1 = tl.load(mean1_ptr + nh, mask=h_ok, other=0.0)
                s1 = tl.load(scale1_ptr + nh, mask=h_ok, other=0.0)
                b1 = tl.load(shift1_ptr + nh, mask=h_ok, other=0.0)
                r1 = tl.maximum((a1 - m1[None, :]) * s1[None, :] + b1[None, :], 0.0)
                wo = tl.load(ow_ptr + oo[None, :] * HID + hh[:, None], mask=h_ok[:, None] & o_ok[None, :],
                             other=0.0)
                acc = tl.dot(r1.to(dot_ty), wo.to(dot_ty), acc, input_precision=PRECISION)
        if STAGE == 2:
            z = acc + tl.load(bias_ptr + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            e = tl.exp(-2.0 * tl.abs(z))  # tanh(z) = sign(z) (1 - e) / (1 + e), no overflow
            th = (1.0 - e) / (1.0 + e)
            g = tl.where(z < 0, -th, th)
            if ID_STEP > 0:
                g += tl.where((oo % tl.maximum(ID_STEP, 1)) == 0, 1.0, 0.0)[None, :]
            off = (n.to(tl.int64) * OUTC + oo)[None, :] * L + l[:, None]
            tl.store(out_ptr + off, g.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


def light_bwd_kernel(x_ptr, dw_ptr, pw_ptr, da1_ptr, mean0_ptr, scale0_ptr, shift0_ptr, rstd0_ptr, gamma0_ptr,
                     e1_ptr, e2_ptr, s_dy_ptr, s_dyx_ptr, dpw_ptr, da0_ptr, ddw_ptr,
                     C, H, W, Ho, Wo, KW, P, HID, SH, SW, PH, PW, DH, DW, NSTRIDE0, TILES,
                     STAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """The depthwise half of the backward, for ``da1 = dL/da1 [N, HID, L]`` (float32, computed by the launcher)::

        a0 = dw(x), xhat0 = (a0 - mean0) * rstd0, y0 = (a0 - mean0) * scale0 + shift0, r0 = ReLU(y0)
        dy0[c] = (sum_h da1[h] pw[h, c]) * (y0[c] > 0)
        da0[c] = rstd0[c] (gamma0[c] dy0[c] - e1[c] - xhat0[c] e2[c])   (running/none: e1 = e2 = 0)

    STAGE 0: per-tile sums of ``dy0`` and ``dy0 * xhat0`` per channel into ``s_dy``/``s_dyx``
    ``[N, TILES, C]`` (the norm's ``dbias0``/``dweight0`` and its batch/group means ``e1``, ``e2``), and
    ``dpw[h, c] += sum_y da1[h](y) r0[c](y)`` (float32 atomics). STAGE 1: writes ``da0 [N, C, L]``
    (float32) and ``ddw[c, p] += sum_y da0[c](y) x_p[c](y)`` (float32 atomics: the order of the additions
    varies run to run). Grid ``(N * TILES, cdiv(C, BLOCK_C))``; the per-(sample, channel) vectors as in
    :func:`light_fwd_kernel` (``NSTRIDE0``). Row sums are IEEE dots with the valid-rows matrix ``J``.
    """
    t = tl.program_id(0) % TILES
    n = tl.program_id(0) // TILES
    cb = tl.program_id(1)
    L = Ho * Wo
    HW = H * W
    rr = tl.arange(0, BLOCK_M)
    l = t * BLOCK_M + rr
    row_ok = l < L
    yh = l // Wo
    yw = l % Wo
    x_base = n.to(tl.int64) * C * HW
    dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    a0 = _depthwise_tile(x_ptr, dw_ptr, x_base, yh, yw, row_ok, cc, c_ok, H, W, KW, P, SH, SW, PH, PW, DH, DW,
                         BLOCK_M, BLOCK_C)
    nc = n * NSTRIDE0 + cc
    m0 = tl.load(mean0_ptr + nc, mask=c_ok, other=0.0)[None, :]
    y0 = (a0 - m0) * tl.load(scale0_ptr + nc, mask=c_ok, other=0.0)[None, :] \
        + tl.load(shift0_ptr + nc, mask=c_ok, other=0.0)[None, :]
    r0 = tl.maximum(y0, 0.0)
    xhat = (a0 - m0) * tl.load(rstd0_ptr + nc, mask=c_ok, other=0.0)[None, :]
    dy0 = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    da1_base = n.to(tl.int64) * HID * L
    for h0 in range(0, HID, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < HID
        g1 = tl.load(da1_ptr + da1_base + hh[None, :] * L + l[:, None], mask=row_ok[:, None] & h_ok[None, :],
                     other=0.0)
        wp = tl.load(pw_ptr + hh[:, None] * C + cc[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        dy0 = tl.dot(g1.to(dot_ty), wp.to(dot_ty), dy0, input_precision=PRECISION)
        if STAGE == 0:
            g1t = tl.load(da1_ptr + da1_base + hh[:, None] * L + l[None, :], mask=h_ok[:, None] & row_ok[None, :],
                          other=0.0)
            dpw = tl.dot(g1t.to(dot_ty), tl.where(row_ok[:, None], r0, 0.0).to(dot_ty), input_precision=PRECISION)
            tl.atomic_add(dpw_ptr + hh[:, None] * C + cc[None, :], dpw, mask=h_ok[:, None] & c_ok[None, :])
    dy0 = tl.where((y0 > 0) & row_ok[:, None], dy0, 0.0)
    J = tl.where((rr[:, None] >= 0) & row_ok[None, :], 1.0, 0.0)
    first = (rr == 0)[:, None] & c_ok[None, :]
    if STAGE == 0:
        off = ((n.to(tl.int64) * TILES + t) * C + cc)[None, :] + rr[:, None] * 0
        tl.store(s_dy_ptr + off, tl.dot(J, dy0, input_precision="ieee"), mask=first)
        tl.store(s_dyx_ptr + off, tl.dot(J, tl.where(row_ok[:, None], dy0 * xhat, 0.0), input_precision="ieee"),
                 mask=first)
    else:
        gamma = tl.load(gamma0_ptr + cc, mask=c_ok, other=0.0)[None, :]
        e1 = tl.load(e1_ptr + nc, mask=c_ok, other=0.0)[None, :]
        e2 = tl.load(e2_ptr + nc, mask=c_ok, other=0.0)[None, :]
        rstd = tl.load(rstd0_ptr + nc, mask=c_ok, other=0.0)[None, :]
        da0 = tl.where(row_ok[:, None], rstd * (gamma * dy0 - e1 - xhat * e2), 0.0)
        tl.store(da0_ptr + (n.to(tl.int64) * C + cc)[None, :] * L + l[:, None], da0,
                 mask=row_ok[:, None] & c_ok[None, :])
        for p in range(0, P):
            xv = _tap(x_ptr, x_base, p, yh, yw, row_ok, cc, c_ok, H, W, KW, SH, SW, PH, PW, DH, DW)
            ddw = tl.dot(J, da0 * xv, input_precision="ieee")
            tl.atomic_add(ddw_ptr + (cc * P + p)[None, :] + rr[:, None] * 0, ddw, mask=first)
