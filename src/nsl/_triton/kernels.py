"""Triton kernels of dynamic neural similarity convolution (undecorated; see ``nsl._triton``).

The functions here are plain Python written in Triton's language. ``nsl._triton`` wraps each one
lazily in :class:`triton.runtime.jit.JITFunction` (GPU) or the interpreter's
``InterpretedFunction`` (``TRITON_INTERPRET=1``, CPU tensors), so that which of the two runs is
decided at launch time, not when this module is imported.

Layouts (all contiguous): ``x [N, C, H, W]``; ``wt [G, P, Cg, Og]`` (the weight
``[C_out, Cg, kh, kw]`` regrouped so that output channels are contiguous); ``sim [N, P, L]``
(diagonal) or ``[N, P, P, L]`` (full) with ``L = Ho * Wo``; ``gout``/``out`` ``[N, C_out, L]``.
Row index ``r = n * L + yh * Wo + yw`` (output positions) or ``n * H * W + ih * W + iw`` (input
positions); position ``q = i * KW + j`` reads ``x[n, c, yh * SH + i * DH - PH, yw * SW + j * DW - PW]``
(zero outside the image). Padded taps load 0 and are still multiplied by ``M`` (0 * NaN = NaN).

Constexprs shared by every kernel: ``FULL`` (full ``M`` instead of diagonal), the block sizes,
``DOT_F32`` (cast both dot operands to float32: the interpreter's bfloat16 path) and
``PRECISION`` (``tl.dot``'s input_precision for float32 operands: "tf32" or "ieee").
"""

import triton.language as tl


def ns_fwd_kernel(x_ptr, wt_ptr, sim_ptr, out_ptr,
                  NL, C, H, W, Cg, Og, Ho, Wo, KW, P, SH, SW, PH, PW, DH, DW,
                  FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """out[n, g*Og + o](y) = sum_{c, p} W[o, c, p] xt_p[n, c](y); xt_p = m_p x_p or sum_q M[p, q] x_q.

    Grid (cdiv(NL, BLOCK_M), cdiv(Og, BLOCK_N), G): a tile of output positions x output channels;
    the modulated input tile xt_p [BLOCK_M, BLOCK_K] is built in registers and fed to tl.dot.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    L = Ho * Wo
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NL
    n = rows // L
    l = rows % L
    yh = l // Wo
    yw = l % Wo
    ocols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = ocols < Og
    kk = tl.arange(0, BLOCK_K)
    HW = H * W
    x_row = n.to(tl.int64) * C * HW + g * Cg * HW
    if FULL:
        sim_row = n.to(tl.int64) * P * P * L + l
    else:
        sim_row = n.to(tl.int64) * P * L + l
    dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for p in range(0, P):
        for c0 in range(0, Cg, BLOCK_K):
            cc = c0 + kk
            c_ok = cc < Cg
            if FULL:
                a = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
                for q in range(0, P):
                    ih = yh * SH + (q // KW) * DH - PH
                    iw = yw * SW + (q % KW) * DW - PW
                    ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    xv = tl.load(x_ptr + (x_row + ih * W + iw)[:, None] + cc[None, :] * HW,
                                 mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                    mv = tl.load(sim_ptr + sim_row + (p * P + q) * L, mask=row_ok, other=0.0).to(tl.float32)
                    a += xv * mv[:, None]
            else:
                ih = yh * SH + (p // KW) * DH - PH
                iw = yw * SW + (p % KW) * DW - PW
                ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + (x_row + ih * W + iw)[:, None] + cc[None, :] * HW,
                             mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                mv = tl.load(sim_ptr + sim_row + p * L, mask=row_ok, other=0.0).to(tl.float32)
                a = xv * mv[:, None]
            wv = tl.load(wt_ptr + ((g * P + p) * Cg + cc)[:, None] * Og + ocols[None, :],
                         mask=c_ok[:, None] & o_ok[None, :], other=0.0)
            acc = tl.dot(a.to(dot_ty), wv.to(dot_ty), acc, input_precision=PRECISION)
    C_out = Og * tl.num_programs(2)
    out_off = (n.to(tl.int64) * C_out * L + l)[:, None] + (g * Og + ocols)[None, :] * L
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


def ns_dx_kernel(g_ptr, wt_ptr, sim_ptr, dx_ptr, x_ptr, dsim_ptr,
                 NHW, C, H, W, Cg, Og, Ho, Wo, KW, P, SH, SW, PH, PW, DH, DW,
                 FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DSIM: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """dx[n, g*Cg + c](i') = sum_{q, p, o} W[o, c, p] M[p, q](y) gout[n, o](y), y the output reading i' at q.

    Transposed (gather) formulation, no atomics: grid (cdiv(N*H*W, BLOCK_M), cdiv(Cg, BLOCK_N), G), a
    tile of input positions x input channels; for each tap q the rows whose ``i' + pad - dil * off(q)``
    is a multiple of the stride gather ``gout`` and contract it with ``W_p`` over output channels
    (diagonal: p = q only), scaled by ``M[p, q](y)``.

    ``DSIM`` (diagonal ``M`` only): the same tile also gives ``dm``'s share of its channels, from the same
    GEMM. Its ``h_q(y) = W_q^T gout(y)`` (this tile's channels) is exactly what ``dm[q](y) = sum_c h_q[c](y)
    x_q[c](y)`` contracts, and ``x_q(y)`` is ``x`` at this tile's own input position ``i'``: so ``h_q`` is
    computed unscaled, added to ``dx`` times ``m[q](y)``, and its channel sum against the ``x`` tile is stored
    to the float32 partial buffer ``dsim_ptr [G * C_TILES, N, P, L]`` (slot ``g * C_TILES + pid_n``; each
    ``(y, q)`` has one input position, so every entry has one writer and the launcher sums the slots in a
    fixed order; taps in the padding are never written and stay 0, also where a non-finite ``gout`` would give
    the separate kernel NaN there). This replaces the separate ``dM`` kernel's GEMM whenever ``dx`` is needed
    too, for ``G * C_TILES`` float32 copies of ``dm`` (``P`` values per location) in memory. Full ``M`` keeps
    the separate kernel: the shared GEMMs would be ``P`` of its ``P * P + 2 P`` and the buffer ``P * P`` float32
    values per location and slot. Without ``DSIM`` the tile ``gout * M`` is scaled before the dot (``x_ptr``,
    ``dsim_ptr`` unused): one accumulator, which the ``dx`` config's wider, pipelined reduction needs to fit.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    L = Ho * Wo
    HW = H * W
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NHW
    n = rows // HW
    s = rows % HW
    ih = s // W
    iw = s % W
    ccols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = ccols < Cg
    kk = tl.arange(0, BLOCK_K)
    C_out = Og * tl.num_programs(2)
    g_row = n.to(tl.int64) * C_out * L + g * Og * L
    if FULL:
        sim_row = n.to(tl.int64) * P * P * L
    else:
        sim_row = n.to(tl.int64) * P * L
    dot_ty = tl.float32 if DOT_F32 else g_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if DSIM:
        tl.static_assert(not FULL, "DSIM: diagonal M only")
        x_row = n.to(tl.int64) * C * HW + s
        col = tl.arange(0, 16)  # the channel sum as a dot with a one-hot [BLOCK_N, 16] (see ns_dsim_kernel)
        onehot = tl.where((ccols[:, None] >= 0) & (col[None, :] == 0), 1.0, 0.0)
        slot = g * tl.num_programs(1) + pid_n
        part_row = (slot.to(tl.int64) * (NHW // HW) + n) * P * L
    for q in range(0, P):
        th = ih + PH - (q // KW) * DH
        tw = iw + PW - (q % KW) * DW
        yh = th // SH
        yw = tw // SW
        ok = row_ok & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0) & (yh < Ho) & (yw < Wo)
        y = yh * Wo + yw
        if FULL:
            p_lo = 0
            p_hi = P
        else:
            p_lo = q
            p_hi = q + 1
        for p in range(p_lo, p_hi):
            if FULL:
                mv = tl.load(sim_ptr + sim_row + (p * P + q) * L + y, mask=ok, other=0.0).to(tl.float32)
            else:
                mv = tl.load(sim_ptr + sim_row + q * L + y, mask=ok, other=0.0).to(tl.float32)
            if DSIM:
                h = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for o0 in range(0, Og, BLOCK_K):
                    oo = o0 + kk
                    o_ok = oo < Og
                    gv = tl.load(g_ptr + (g_row + y)[:, None] + oo[None, :] * L,
                                 mask=ok[:, None] & o_ok[None, :], other=0.0)
                    wv = tl.load(wt_ptr + ((g * P + p) * Cg + ccols)[None, :] * Og + oo[:, None],
                                 mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                    h = tl.dot(gv.to(dot_ty), wv.to(dot_ty), h, input_precision=PRECISION)
                acc += h * mv[:, None]
                xv = tl.load(x_ptr + x_row[:, None] + (g * Cg + ccols)[None, :] * HW,  # the same tile each tap: cached
                             mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                red = tl.dot(h * xv, onehot, input_precision="ieee")
                off = part_row + q * L + y
                tl.store(dsim_ptr + off[:, None] + col[None, :], red, mask=ok[:, None] & (col[None, :] == 0))
            else:
                for o0 in range(0, Og, BLOCK_K):
                    oo = o0 + kk
                    o_ok = oo < Og
                    gv = tl.load(g_ptr + (g_row + y)[:, None] + oo[None, :] * L,
                                 mask=ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
                    a = gv * mv[:, None]
                    wv = tl.load(wt_ptr + ((g * P + p) * Cg + ccols)[None, :] * Og + oo[:, None],
                                 mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                    acc = tl.dot(a.to(dot_ty), wv.to(dot_ty), acc, input_precision=PRECISION)
    dx_off = (n.to(tl.int64) * C * HW + s)[:, None] + (g * Cg + ccols)[None, :] * HW
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


def ns_dw_kernel(g_ptr, x_ptr, sim_ptr, dw_ptr,
                 NL, C, H, W, Cg, Og, Ho, Wo, KW, P, SH, SW, PH, PW, DH, DW, ROWS_PER_SPLIT, O_TILES, C_TILES,
                 FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """dW[g*Og + o, c, p] = sum_{n, y} gout[n, o](y) xt_p[n, c](y), xt_p as in the forward.

    Grid (O_TILES * C_TILES * G * P, SPLIT): a [BLOCK_M (out ch), BLOCK_N (in ch)] tile of dW for one
    group and position, reduced on chip over ROWS_PER_SPLIT output positions in BLOCK_K chunks, then
    atomically added to the float32 ``dw`` buffer ([C_out, Cg, P]); SPLIT > 1 splits the reduction
    over positions so that small weights still fill the GPU (order of the additions is not fixed).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t_o = pid % O_TILES
    t_c = (pid // O_TILES) % C_TILES
    gp = pid // (O_TILES * C_TILES)
    g = gp // P
    p = gp % P
    L = Ho * Wo
    HW = H * W
    G = C // Cg
    oo = t_o * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = oo < Og
    cc = t_c * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cc < Cg
    kk = tl.arange(0, BLOCK_K)
    dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    r_lo = split * ROWS_PER_SPLIT
    for r0 in range(r_lo, r_lo + ROWS_PER_SPLIT, BLOCK_K):
        rows = r0 + kk
        row_ok = (rows < NL) & (rows < r_lo + ROWS_PER_SPLIT)
        n = rows // L
        l = rows % L
        yh = l // Wo
        yw = l % Wo
        gv = tl.load(g_ptr + (n.to(tl.int64) * G * Og * L + l)[None, :] + (g * Og + oo)[:, None] * L,
                     mask=o_ok[:, None] & row_ok[None, :], other=0.0)
        x_row = n.to(tl.int64) * C * HW + g * Cg * HW
        if FULL:
            sim_row = n.to(tl.int64) * P * P * L + l
            a = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
            for q in range(0, P):
                ih = yh * SH + (q // KW) * DH - PH
                iw = yw * SW + (q % KW) * DW - PW
                ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + (x_row + ih * W + iw)[:, None] + cc[None, :] * HW,
                             mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                mv = tl.load(sim_ptr + sim_row + (p * P + q) * L, mask=row_ok, other=0.0).to(tl.float32)
                a += xv * mv[:, None]
        else:
            sim_row = n.to(tl.int64) * P * L + l
            ih = yh * SH + (p // KW) * DH - PH
            iw = yw * SW + (p % KW) * DW - PW
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (x_row + ih * W + iw)[:, None] + cc[None, :] * HW,
                         mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            mv = tl.load(sim_ptr + sim_row + p * L, mask=row_ok, other=0.0).to(tl.float32)
            a = xv * mv[:, None]
        acc = tl.dot(gv.to(dot_ty), a.to(dot_ty), acc, input_precision=PRECISION)
    dw_off = ((g * Og + oo) * Cg)[:, None] * P + cc[None, :] * P + p
    tl.atomic_add(dw_ptr + dw_off, acc, mask=o_ok[:, None] & c_ok[None, :])


def ns_dsim_kernel(g_ptr, x_ptr, wt_ptr, dsim_ptr,
                   NL, C, H, W, Cg, Og, Ho, Wo, KW, P, SH, SW, PH, PW, DH, DW,
                   FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_Q: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """dM[n, p, q](y) = sum_c h_p[n, c](y) x_q[n, c](y), h_p = W_p^T gout (per group, summed over groups).

    Grid (cdiv(NL, BLOCK_M), P, cdiv(P, BLOCK_Q)): a tile of output positions for one position p;
    h_p [BLOCK_M, BLOCK_N] = tl.dot(gout tile, W_p) over output channels, then reduced against the
    (zero-padded) input taps on chip. Diagonal: q = p only (axis 2 has size 1, column 0 of the
    accumulator); full: the BLOCK_Q taps q of block ``program_id(2)``, one accumulator column each.
    The channel sum of ``h_p * x_q`` is a float32 (IEEE) ``tl.dot`` with a one-hot [BLOCK_N, BLOCK_Q]
    matrix that puts it in the tap's column (no reduction helpers, which the interpreter cannot mix
    with compiled ones).
    """
    pid_m = tl.program_id(0)
    p = tl.program_id(1)
    qb = tl.program_id(2)
    L = Ho * Wo
    HW = H * W
    G = C // Cg
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NL
    n = rows // L
    l = rows % L
    yh = l // Wo
    yw = l % Wo
    kk = tl.arange(0, BLOCK_K)
    cn = tl.arange(0, BLOCK_N)
    qq = tl.arange(0, BLOCK_Q)
    dot_ty = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    acc = tl.full((BLOCK_M, BLOCK_Q), 0.0, tl.float32)
    if FULL:
        q_lo = qb * BLOCK_Q
        q_hi = tl.minimum(P, q_lo + BLOCK_Q)
    else:
        q_lo = p
        q_hi = p + 1
    for g in range(0, G):
        g_row = n.to(tl.int64) * G * Og * L + g * Og * L + l
        x_row = n.to(tl.int64) * C * HW + g * Cg * HW
        for c0 in range(0, Cg, BLOCK_N):
            cc = c0 + cn
            c_ok = cc < Cg
            h = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for o0 in range(0, Og, BLOCK_K):
                oo = o0 + kk
                o_ok = oo < Og
                gv = tl.load(g_ptr + g_row[:, None] + oo[None, :] * L,
                             mask=row_ok[:, None] & o_ok[None, :], other=0.0)
                wv = tl.load(wt_ptr + ((g * P + p) * Cg + cc)[None, :] * Og + oo[:, None],
                             mask=o_ok[:, None] & c_ok[None, :], other=0.0)
                h = tl.dot(gv.to(dot_ty), wv.to(dot_ty), h, input_precision=PRECISION)
            for q in range(q_lo, q_hi):
                ih = yh * SH + (q // KW) * DH - PH
                iw = yw * SW + (q % KW) * DW - PW
                ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + (x_row + ih * W + iw)[:, None] + cc[None, :] * HW,
                             mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                onehot = tl.where((cn[:, None] >= 0) & (qq[None, :] == q - q_lo), 1.0, 0.0)
                acc = tl.dot(h * xv, onehot, acc, input_precision="ieee")
    if FULL:
        q_all = q_lo + qq
        off = (n.to(tl.int64) * P * P * L + p * P * L + l)[:, None] + q_all[None, :] * L
        q_ok = q_all < P
    else:
        off = (n.to(tl.int64) * P * L + p * L + l)[:, None] + qq[None, :]
        q_ok = qq == 0
    tl.store(dsim_ptr + off, acc.to(dsim_ptr.dtype.element_ty), mask=row_ok[:, None] & q_ok[None, :])
