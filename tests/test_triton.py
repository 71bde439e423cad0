"""The Triton kernels (``nsl._triton``) through Triton's interpreter, against the float64 brute-force reference.

On this CPU-only machine (and in CI) every kernel runs with ``TRITON_INTERPRET=1`` on CPU tensors:
forward and the gradients for x, W and M, diagonal and full M, odd sizes, stride 2, dilation 2,
groups 2, batch 0/1/3, 5x5 and 1x3 kernels, non-contiguous inputs and the NaN-at-padding rule.

float32 and float16 run the same code a GPU compiles (the interpreter's float16 ``tl.dot`` is exact).
bfloat16: the interpreter computes ``tl.dot`` on bfloat16 operands wrongly, so the launcher casts
bfloat16 dot operands to float32 there (``DOT_F32``); these tests therefore verify the bfloat16
loads, modulation, float32 accumulation and output casts, but NOT the bfloat16 dot instruction of
the compiled kernel (that is compiled in tests/test_triton_aot.py and run only by tests/test_cuda.py).

The environment variable is set per test (monkeypatch) and the kernels are wrapped for the
interpreter explicitly, so other tests in this process are unaffected; one test imports the module
in a subprocess where the variable is set before import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")

from nsl import _triton as NT  # noqa: E402
from nsl._ops import _TritonFn  # noqa: E402  (the triton backend's autograd glue on CPU tensors)
from nsl.functional import conv_output_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import brute_ns_conv2d  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(geom, full, seed=0):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups = geom
    gen = torch.Generator().manual_seed(seed)
    ho, wo = conv_output_size((h, w), k, stride, padding, dilation)
    p = k[0] * k[1]
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=torch.float64)
    sim = torch.randn((n, p, p, ho, wo) if full else (n, p, ho, wo), generator=gen, dtype=torch.float64)
    gout = torch.randn(n, c_out, ho, wo, generator=gen, dtype=torch.float64)
    return x, weight, sim, gout, (stride, padding, dilation, groups)


def _reference(x, weight, sim, gout, geo):
    stride, padding, dilation, groups = geo
    leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, sim)]
    out = brute_ns_conv2d(*leaves, stride=stride, pad=(padding[0], padding[0], padding[1], padding[1]),
                          dilation=dilation, groups=groups)
    out.backward(gout.double())
    return [out.detach()] + [t.grad for t in leaves]


def _triton(x, weight, sim, gout, geo, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, weight, sim)]
    out = _TritonFn.apply(*leaves, *geo)
    out.backward(gout.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # error relative to max |reference|


def _assert_close(got, want, dtype, names=("out", "dx", "dw", "dsim")):
    for g, r, name in zip(got, want, names):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        assert g.shape == r.shape, f"{name} shape {list(g.shape)} != {list(r.shape)}"
        if r.numel() == 0:
            continue
        err = (g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
        assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]}"


# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
DIAG_GEOMETRIES = {
    "odd-batch3": (3, 3, 5, 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2-groups2-batch1": (1, 4, 6, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    "k5x5-dilation2": (1, 2, 3, 7, 6, (5, 5), (1, 1), (3, 2), (2, 1), 1),
    "k1x3-split": (3, 2, 3, 5, 7, (1, 3), (1, 2), (0, 1), (1, 2), 1),
    "wide-channels": (1, 70, 68, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 2 channel tiles, 3-5 K blocks
}
FULL_GEOMETRIES = {
    "odd-3x2": (1, 3, 4, 5, 6, (3, 2), (1, 1), (1, 1), (1, 1), 1),
    "k1x3-stride2-dilation2-groups2": (3, 4, 2, 5, 7, (1, 3), (2, 2), (0, 2), (1, 2), 2),
}


@pytest.mark.parametrize("name", list(DIAG_GEOMETRIES))
def test_diagonal_float32(name):
    x, w, m, g, geo = _inputs(DIAG_GEOMETRIES[name], full=False)
    _assert_close(_triton(x, w, m, g, geo, torch.float32), _reference(x, w, m, g, geo), torch.float32)


@pytest.mark.parametrize("name", list(FULL_GEOMETRIES))
def test_full_float32(name):
    x, w, m, g, geo = _inputs(FULL_GEOMETRIES[name], full=True)
    _assert_close(_triton(x, w, m, g, geo, torch.float32), _reference(x, w, m, g, geo), torch.float32)


@pytest.mark.slow
def test_full_5x5_two_tap_blocks():
    """P = 25 > BLOCK_Q = 16: dM is computed in two blocks of taps (about 30 s in the interpreter)."""
    x, w, m, g, geo = _inputs((1, 2, 3, 6, 5, (5, 5), (1, 1), (2, 2), (1, 1), 1), full=True)
    _assert_close(_triton(x, w, m, g, geo, torch.float32), _reference(x, w, m, g, geo), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16-upcast-dot"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_half_precision(dtype, full):
    geom = FULL_GEOMETRIES["k1x3-stride2-dilation2-groups2"] if full else DIAG_GEOMETRIES["odd-batch3"]
    x, w, m, g, geo = _inputs(geom, full=full, seed=1)
    # The reference sees the same rounded inputs; the kernel rounds the modulated tile to `dtype`.
    x, w, m, g = (t.to(dtype).double() for t in (x, w, m, g))
    _assert_close(_triton(x, w, m, g, geo, dtype), _reference(x, w, m, g, geo), dtype)


# (need dx, dW, dM, fuse_dsim)
NEEDS = {"dx+dsim": (True, False, True, True), "dx+dsim-separate": (True, False, True, False),
         "dsim-only": (False, False, True, True), "dx-only": (True, False, False, True),
         "all": (True, True, True, True)}


@pytest.mark.parametrize("need", list(NEEDS))
@pytest.mark.parametrize("case", ["wide-channels", "stride2-groups2-batch1", "full-k1x3-stride2-dilation2-groups2"])
def test_backward_computes_what_is_asked(case, need):
    """dx and dM come from one kernel when both are asked and M is diagonal (``DSIM``: its per-channel-tile shares of
    dM, summed; wide-channels has two channel tiles, groups 2 two groups), from their own kernels when one is, with
    ``fuse_dsim=False`` or for full M; the rest None."""
    full = case.startswith("full-")
    geom = FULL_GEOMETRIES[case[5:]] if full else DIAG_GEOMETRIES[case]
    x, w, m, g, geo = _inputs(geom, full=full, seed=3)
    want = dict(zip(("dx", "dw", "dsim"), _reference(x, w, m, g, geo)[1:]))
    *needs, fuse = NEEDS[need]
    grads = NT.backward(g.float(), x.float(), w.float(), m.float(), *geo, *needs, fuse_dsim=fuse)
    got = dict(zip(("dx", "dw", "dsim"), grads))
    for name, asked in zip(("dx", "dw", "dsim"), needs):
        if not asked:
            assert got[name] is None, f"{name} was not asked for"
            continue
        _assert_close([got[name]], [want[name]], torch.float32, names=(name,))


def test_backward_is_reproducible():
    """The fused dx + dM kernel writes each dM share once and the shares are summed in a fixed order: two runs agree
    bit for bit (dW's atomic adds are excluded)."""
    x, w, m, g, geo = _inputs(DIAG_GEOMETRIES["wide-channels"], full=False, seed=4)
    runs = [NT.backward(g.float(), x.float(), w.float(), m.float(), *geo, True, False, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])


def test_dw_reduction_is_split():
    """The k1x3 case splits the dW reduction over positions (atomic adds of partial tiles)."""
    n, _, c_out, h, w, k, stride, padding, dilation, groups = DIAG_GEOMETRIES["k1x3-split"]
    ho, wo = conv_output_size((h, w), k, stride, padding, dilation)
    cfg = NT.pick_config("dw", c_out)
    block = cfg.constexprs(fp32_ieee=True)["BLOCK_K"]  # float32 on CPU: IEEE dots
    split, per = NT.dw_split(n * ho * wo, 1 * 1 * groups * k[0] * k[1], block, interpret=True)
    assert split > 1 and per % block == 0 and split * per >= n * ho * wo


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_empty_batch(full):
    x, w, m, g, geo = _inputs((0, 3, 4, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1), full=full)
    got = _triton(x, w, m, g, geo, torch.float32)
    assert [list(t.shape) for t in got] == [[0, 4, 5, 6], [0, 3, 5, 6], [4, 3, 3, 3], list(m.shape)]
    assert torch.count_nonzero(got[2]) == 0  # no positions: dW = 0


def test_non_contiguous_inputs():
    x, w, m, g, geo = _inputs(DIAG_GEOMETRIES["odd-batch3"], full=False, seed=2)
    want = _reference(x, w, m, g, geo)
    xs = x.float().to(memory_format=torch.channels_last)
    ws = w.float().transpose(2, 3).contiguous().transpose(2, 3)
    ms = m.float().transpose(0, 1).contiguous().transpose(0, 1)
    gs = g.float().to(memory_format=torch.channels_last)
    assert not (xs.is_contiguous() or ws.is_contiguous() or ms.is_contiguous() or gs.is_contiguous())
    leaves = [t.requires_grad_(True) for t in (xs, ws, ms)]
    out = _TritonFn.apply(*leaves, *geo)
    out.backward(gs)
    _assert_close([out.detach()] + [t.grad for t in leaves], want, torch.float32)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_nan_in_m_at_a_padded_tap_gives_nan(full):
    """0 (padded input) * NaN = NaN: the output at that location is NaN, as the reference says."""
    geom = (1, 2, 3, 4, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, w, m, g, geo = _inputs(geom, full=full)
    # tap q = 0 (offset (-1, -1)) of output (0, 0) reads the padding
    if full:
        m[0, 4, 0, 0, 0] = float("nan")  # M[p=4, q=0]
    else:
        m[0, 0, 0, 0] = float("nan")
    want = brute_ns_conv2d(x, w, m, pad=(1, 1, 1, 1))
    got = NT.forward(x.float(), w.float(), m.float(), *geo)
    assert torch.isnan(want[0, :, 0, 0]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.allclose(got[finite].double(), want[finite], atol=1e-4)


def test_unavailable_reason(monkeypatch):
    assert NT.unavailable_reason(torch.device("cpu")) is None
    assert "xla" in NT.unavailable_reason(torch.device("xla"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in NT.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert NT.unavailable_reason(torch.device("cuda")) == "no CUDA device"


def test_bad_inputs():
    x, w, m, g, geo = _inputs(DIAG_GEOMETRIES["odd-batch3"], full=False)
    with pytest.raises(TypeError, match="float64 is not supported"):
        NT.forward(x, w, m, *geo)
    with pytest.raises(TypeError, match="weight is torch.float16"):
        NT.forward(x.float(), w.half(), m.float(), *geo)
    with pytest.raises(ValueError, match=r"expected sim \[3, 9, 5, 7\]"):
        NT.forward(x.float(), w.float(), m.float()[:, :, :4], *geo)
    with pytest.raises(ValueError, match="grad_out has shape"):
        NT.backward(g.float()[:1], x.float(), w.float(), m.float(), *geo, True, True, True)


def test_interpret_set_before_import():
    """With TRITON_INTERPRET=1 in the environment before anything is imported, the module works too."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from nsl import _triton as NT\n"
        "x = torch.randn(2, 3, 5, 6); w = torch.randn(4, 3, 3, 3)\n"
        "out = NT.forward(x, w, torch.ones(2, 9, 5, 6), (1, 1), (1, 1), (1, 1), 1)\n"
        "assert NT.unavailable_reason(torch.device('cpu')) is None\n"
        "print(float((out - F.conv2d(x, w, padding=1)).abs().max()))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-4
