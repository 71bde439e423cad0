"""The fused CPU kernel (``nsl._cpp``) against an independent float64 unfold + einsum reference.

Skipped when the kernel cannot be compiled here, unless ``NSL_REQUIRE_CPP=1`` (then it fails).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nsl import _cpp

pytestmark = pytest.mark.cpp


def reference(x, weight, sim, stride, padding, dilation, groups):
    """out[n, o](y) = sum_{c, p} W[o, c, p] sum_q M[n, p, q](y) col[n, c, q](y) (diagonal: M = diag(m))."""
    n, c_in, h, w = x.shape
    c_out, cg, kh, kw = weight.shape
    p = kh * kw
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(n, groups, cg, p, ho * wo)
    if sim.dim() == 4:
        mod = cols * sim.reshape(n, 1, 1, p, ho * wo)
    else:
        mod = torch.einsum("npql,ngcql->ngcpl", sim.reshape(n, p, p, ho * wo), cols)
    wg = weight.reshape(groups, c_out // groups, cg, p)
    return torch.einsum("gocp,ngcpl->ngol", wg, mod).reshape(n, c_out, ho, wo)


# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 3, 5, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 6, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2),  # N=1: fewer images than threads
    (3, 4, 7, 9, 11, (3, 5), (1, 2), (1, 2), (1, 1), 1),  # non-square kernel
    (2, 5, 3, 11, 10, (3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride 2
    (2, 3, 4, 10, 9, (3, 3), (1, 1), (2, 2), (2, 2), 1),  # dilation 2
    (3, 6, 4, 8, 7, (2, 3), (2, 1), (0, 1), (2, 1), 2),  # everything odd, groups 2
    (2, 4, 4, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 4),  # 1x1, depthwise-like groups
    (2, 2, 3, 6, 5, (5, 5), (1, 1), (3, 0), (1, 1), 1),  # padding larger than the halo
    (2, 3, 4, 8, 7, (5, 3), (1, 1), (1, 1), (1, 1), 1),  # W_out == W but H_out < H
    (2, 2, 3, 6, 5, (3, 5), (1, 1), (3, 2), (1, 1), 1),  # W_out == W, rows fully in the padding
    (2, 3, 4, 7, 7, (2, 2), (1, 1), (1, 1), (1, 1), 1),  # 2x2 kernel (P = 4), W_out = W + 1
]


def _geom_id(geom) -> str:
    n, c_in, c_out, h, w, (kh, kw), s, p, d, g = geom
    return f"n{n}c{c_in}o{c_out}-{h}x{w}-k{kh}x{kw}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{g}"


def _inputs(geom, layout, dtype, seed=0):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups = geom
    gen = torch.Generator().manual_seed(seed)
    kh, kw = k
    p = kh * kw
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, kh, kw, generator=gen, dtype=torch.float64)
    shape = (n, p, ho, wo) if layout == "diag" else (n, p, p, ho, wo)
    sim = torch.randn(shape, generator=gen, dtype=torch.float64)
    gout = torch.randn(n, c_out, ho, wo, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, weight, sim, gout)], (stride, padding, dilation, groups)


def _grads(fn, x, weight, sim, gout, geo):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, sim)]
    out = fn(*leaves, *geo)
    out.backward(gout)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["diag", "full"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_geom_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(geom, layout, dtype):
    tensors, geo = _inputs(geom, layout, torch.float64)
    ref_out, ref_grads = _grads(reference, *tensors, geo)
    out, grads = _grads(_cpp.dynamic_ns_conv2d, *[t.to(dtype) for t in tensors], geo)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for name, g, r in zip(("dx", "dweight", "dsim"), grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["diag", "full"])
@pytest.mark.parametrize("padding", [(1, 1), (0, 0)], ids=["same", "valid"])
@pytest.mark.parametrize("n", [1, 3])
def test_small_tiles_split_rows(layout, padding, n):
    """Tiles shorter than an output row (and not dividing it) still give the same result; with
    N=1 and 2 threads the tiles of one image are split across threads (per-thread dx). Runs the
    AVX-512 P x P loops (full layout) where the CPU has them."""
    geom = (n, 3, 4, 5, 45, (3, 3), (1, 1), padding, (1, 1), 1)
    tensors, geo = _inputs(geom, layout, torch.float64, seed=1)
    ref_out, ref_grads = _grads(reference, *tensors, geo)
    ext = _cpp._ext()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    old_bytes = ext.set_tile_bytes(1)  # with a minimum of 32 locations: tiles shorter than a row
    old_min = ext.set_min_tile(32)
    try:
        out, grads = _grads(_cpp.dynamic_ns_conv2d, *tensors, geo)
    finally:
        ext.set_tile_bytes(old_bytes)
        ext.set_min_tile(old_min)
        torch.set_num_threads(old_threads)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("layout", ["diag", "full"])
@pytest.mark.parametrize("backend", [1, 2], ids=["blas", "at-mm"])
def test_gemm_backends(layout, backend):
    """The slower GEMM backends (direct BLAS; at::mm, used where libtorch exports neither brgemm
    nor BLAS symbols) give the same result."""
    geom = GEOMETRIES[5]
    tensors, geo = _inputs(geom, layout, torch.float32, seed=4)
    ref_out, ref_grads = _grads(reference, *[t.double() for t in tensors], geo)
    ext = _cpp._ext()
    old = ext.set_gemm_backend(backend)
    try:
        out, grads = _grads(_cpp.dynamic_ns_conv2d, *tensors, geo)
    finally:
        ext.set_gemm_backend(old)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("geom", [
    (2, 12, 5, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 12 channels: blocks of 8 and 4; 63 locations
    (2, 10, 3, 9, 9, (5, 5), (1, 1), (2, 2), (1, 1), 1),  # P = 25, blocks of 8 and 2
    (1, 18, 4, 6, 11, (2, 2), (1, 1), (1, 1), (1, 1), 2),  # P = 4, 9 channels per group: blocks of 8 and 1
], ids=_geom_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_full_layout_channel_blocks(geom, dtype):
    """The full layout's register-blocked P x P loops over more than one block of 8 channels, with tiles
    that end in a two-vector step, a one-vector step and a scalar remainder."""
    tensors, geo = _inputs(geom, "full", torch.float64, seed=6)
    ref_out, ref_grads = _grads(reference, *tensors, geo)
    out, grads = _grads(_cpp.dynamic_ns_conv2d, *[t.to(dtype) for t in tensors], geo)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("layout", ["diag", "full"])
def test_wide_tiles_past_l2(layout):
    """Column tiles larger than L2 with more than 64 output channels: backend 0 sends dW's GEMM to BLAS
    instead of brgemm (gemm.cpp's L2 rule) and the forward's to brgemm; same result."""
    geom = (2, 64, 96, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    tensors, geo = _inputs(geom, layout, torch.float32, seed=5)
    ref_out, ref_grads = _grads(reference, *[t.double() for t in tensors], geo)
    ext = _cpp._ext()
    old = ext.set_tile_bytes(4 << 20)  # one 256-location tile per image: a [576, 256] float column tile
    try:
        out, grads = _grads(_cpp.dynamic_ns_conv2d, *tensors, geo)
    finally:
        ext.set_tile_bytes(old)
    tol = dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_thread_counts(num_threads):
    geom = (3, 4, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    tensors, geo = _inputs(geom, "diag", torch.float64, seed=2)
    ref_out, ref_grads = _grads(reference, *tensors, geo)
    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        out, grads = _grads(_cpp.dynamic_ns_conv2d, *tensors, geo)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [1, 2])
def test_identity_is_conv2d(dtype, groups):
    """m = 1 and M = I give exactly F.conv2d (up to float summation order)."""
    x = torch.randn(4, 4, 12, 10, dtype=dtype)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=dtype)
    ref = F.conv2d(x, w, stride=(2, 1), padding=1, dilation=(1, 2), groups=groups)
    n, _, ho, wo = ref.shape
    m = torch.ones(n, 9, ho, wo, dtype=dtype)
    eye = torch.eye(9, dtype=dtype).reshape(1, 9, 9, 1, 1).expand(n, 9, 9, ho, wo)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for sim in (m, eye):
        out = _cpp.dynamic_ns_conv2d(x, w, sim, (2, 1), (1, 1), (1, 2), groups)
        torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("layout", ["diag", "full"])
def test_gradcheck(layout):
    geom = (2, 2, 3, 5, 4, (2, 3), (2, 1), (1, 1), (1, 2), 1)
    (x, weight, sim, _), geo = _inputs(geom, layout, torch.float64, seed=3)
    leaves = [t.requires_grad_(True) for t in (x, weight, sim)]
    assert torch.autograd.gradcheck(lambda a, b, c: _cpp.dynamic_ns_conv2d(a, b, c, *geo), leaves)


def test_partial_needs_grad():
    """Only the requested gradients are computed; the others stay None."""
    (x, weight, sim, gout), geo = _inputs(GEOMETRIES[0], "diag", torch.float64)
    ref_out, ref_grads = _grads(reference, x, weight, sim, gout, geo)
    for i in range(3):
        leaves = [t.clone().requires_grad_(j == i) for j, t in enumerate((x, weight, sim))]
        _cpp.dynamic_ns_conv2d(*leaves, *geo).backward(gout)
        for j, t in enumerate(leaves):
            if j == i:
                torch.testing.assert_close(t.grad, ref_grads[j])
            else:
                assert t.grad is None


@pytest.mark.parametrize("layout", ["diag", "full"])
def test_empty_batch(layout):
    geom = (0, 3, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    (x, weight, sim, gout), geo = _inputs(geom, layout, torch.float32)
    out, (dx, dw, dsim) = _grads(_cpp.dynamic_ns_conv2d, x, weight, sim, gout, geo)
    assert out.shape == (0, 4, 6, 6)
    assert dx.shape == x.shape and dsim.shape == sim.shape
    assert torch.equal(dw, torch.zeros_like(weight))


def test_non_contiguous_inputs():
    (x, weight, sim, _), geo = _inputs(GEOMETRIES[2], "diag", torch.float64)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, channels-last-like strides
    simt = sim.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    torch.testing.assert_close(
        _cpp.dynamic_ns_conv2d(xt, weight, simt, *geo), reference(x, weight, sim, *geo)
    )


def test_type_errors():
    (x, weight, sim, _), geo = _inputs(GEOMETRIES[0], "diag", torch.float32)
    with pytest.raises(TypeError):
        _cpp.dynamic_ns_conv2d(x.half(), weight.half(), sim.half(), *geo)
    with pytest.raises(TypeError):
        _cpp.dynamic_ns_conv2d(x, weight.double(), sim, *geo)
    with pytest.raises(TypeError):
        _cpp.dynamic_ns_conv2d(x.to(torch.int32), weight, sim, *geo)
    with pytest.raises(RuntimeError):  # wrong sim shape is reported by the kernel
        _cpp.dynamic_ns_conv2d(x, weight, sim[:, :4], *geo)
