"""nsl.functional.ns_conv2d against F.conv2d and an independent float64 brute-force loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import nsl.functional as NF
from nsl import _ops
from nsl.functional import conv_output_size, ns_conv2d, use_backend
from reference import brute_ns_conv2d

BACKENDS = ["reference", "unfold", "ztrick", "cpp", "auto"]


def _params(cases):
    """``cases`` (names or tuples) as pytest parameters; those on the 'cpp' backend carry the ``cpp`` marker."""
    values = [case if isinstance(case, tuple) else (case,) for case in cases]
    return [pytest.param(*v, marks=[pytest.mark.cpp] if "cpp" in v else []) for v in values]


def _pads(padding, k, stride, dilation):
    return NF._resolve_padding(padding, k, stride, dilation)


GEOMETRIES = list(itertools.product([(1, 1), (3, 3), (5, 5), (3, 5)], [1, 2], [1, 2], [1, 2]))


@pytest.mark.parametrize("kernel,stride,dilation,groups", GEOMETRIES)
def test_identity_equals_conv2d(kernel, stride, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 13, 12)
    w = torch.randn(6, 4 // groups, *kernel)
    b = torch.randn(6)
    padding = (kernel[0] // 2, 1)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    P = kernel[0] * kernel[1]
    oh, ow = expected.shape[-2:]
    for sim in (torch.ones(P), torch.eye(P)):
        out = ns_conv2d(x, w, sim, b, stride, padding, dilation, groups)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for backend in ("reference", "unfold", "ztrick"):
        with use_backend(backend):
            for sim in (torch.ones(3, P, oh, ow), torch.eye(P).view(1, P, P, 1, 1).expand(3, P, P, oh, ow)):
                out = ns_conv2d(x, w, sim, b, stride, padding, dilation, groups)
                torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", [0, 2, (1, 2), "same", "valid"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_padding_forms(padding, dynamic):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 10)
    w = torch.randn(5, 3, 4, 3)  # even kernel height: 'same' pads asymmetrically
    expected = F.conv2d(x, w, None, 1, padding)
    P = 12
    sim = torch.ones(2, P, *expected.shape[-2:]) if dynamic else torch.ones(P)
    torch.testing.assert_close(ns_conv2d(x, w, sim, padding=padding), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("backend", _params(BACKENDS))
def test_batch_sizes(batch, backend):
    x = torch.randn(batch, 4, 7, 7, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    m = torch.rand(batch, 9, 7, 7, requires_grad=True)
    with use_backend(backend):
        out = ns_conv2d(x, w, m, padding=1)
        assert out.shape == (batch, 5, 7, 7)
        out.sum().backward()
    expected = brute_ns_conv2d(x.detach(), w.detach(), m.detach(), pad=(1, 1, 1, 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and m.grad.shape == m.shape


CASES = [
    # kernel, stride, padding, dilation, groups
    ((3, 3), (1, 1), 1, (1, 1), 1),
    ((3, 5), (2, 1), (2, 1), (1, 2), 2),
    ((5, 5), (1, 1), "same", (2, 1), 1),
    ((3, 3), (2, 2), 0, (1, 1), 2),
    ((1, 1), (1, 1), 0, (1, 1), 1),
]


# static similarity has a single path (a reparametrised weight); dynamic runs on every backend
LAYOUT_BACKENDS = [("static-diagonal", "auto"), ("static-full", "auto")] + [
    (layout, backend) for layout in ("dynamic-diagonal", "dynamic-full") for backend in BACKENDS
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", CASES)
@pytest.mark.parametrize("layout,backend", _params(LAYOUT_BACKENDS))
def test_against_brute_force(kernel, stride, padding, dilation, groups, layout, backend):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 10, 9, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    P = kernel[0] * kernel[1]
    oh, ow = conv_output_size((10, 9), kernel, stride, padding, dilation)
    shape = {"static-diagonal": (P,), "static-full": (P, P), "dynamic-diagonal": (3, P, oh, ow),
             "dynamic-full": (3, P, P, oh, ow)}[layout]
    sim = torch.randn(shape, dtype=torch.float64)
    with use_backend(backend):
        out = ns_conv2d(x, w, sim, b, stride, padding, dilation, groups)
    expected = brute_ns_conv2d(x, w, sim, b, stride, _pads(padding, kernel, stride, dilation), dilation, groups)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", CASES[:4])
@pytest.mark.parametrize("layout", ["dynamic-diagonal", "dynamic-full"])
@pytest.mark.parametrize("backend", _params(["unfold", "ztrick", "cpp"]))
def test_gradients_match_reference(kernel, stride, padding, dilation, groups, layout, backend):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, *kernel, dtype=torch.float64)
    P = kernel[0] * kernel[1]
    oh, ow = conv_output_size((9, 8), kernel, stride, padding, dilation)
    sim = torch.randn((2, P, oh, ow) if layout == "dynamic-diagonal" else (2, P, P, oh, ow), dtype=torch.float64)
    g = torch.randn(2, 6, oh, ow, dtype=torch.float64)
    grads = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (x, w, sim)]
        with use_backend(name):
            out = ns_conv2d(*leaves, None, stride, padding, dilation, groups)
        grads[name] = torch.autograd.grad(out, leaves, g)
    for a, r in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout,backend",
                         _params(lb for lb in LAYOUT_BACKENDS if lb[1] != "auto" or "static" in lb[0]))
def test_gradcheck(layout, backend):
    torch.manual_seed(4)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    oh, ow = conv_output_size((5, 4), (3, 2), 2, 1, 1)
    shape = {"static-diagonal": (6,), "static-full": (6, 6), "dynamic-diagonal": (2, 6, oh, ow),
             "dynamic-full": (2, 6, 6, oh, ow)}[layout]
    sim = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: ns_conv2d(*a, stride=2, padding=1), (x, w, sim, b),
                                        fast_mode=True)


@pytest.mark.parametrize("backend", _params(["reference", "unfold", "ztrick", "cpp"]))
def test_noncontiguous_and_channels_last(backend):
    torch.manual_seed(5)
    x = torch.randn(3, 4, 22, 11)[:, :, ::2]  # strided along H
    assert not x.is_contiguous()
    w = torch.randn(5, 4, 3, 3)
    m = torch.rand(3, 9, 11, 11).transpose(2, 3).contiguous().transpose(2, 3)
    full = torch.rand(3, 9, 9, 11, 11)[..., ::1]
    with use_backend(backend):
        ref = brute_ns_conv2d(x, w, m, pad=(1, 1, 1, 1))
        torch.testing.assert_close(ns_conv2d(x, w, m, padding=1).double(), ref, atol=1e-4, rtol=1e-4)
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ns_conv2d(xcl, w, m, padding=1).double(), ref, atol=1e-4, rtol=1e-4)
        reff = brute_ns_conv2d(x, w, full, pad=(1, 1, 1, 1))
        torch.testing.assert_close(ns_conv2d(xcl, w, full, padding=1).double(), reff, atol=1e-4, rtol=1e-4)


def test_unbatched_input():
    x = torch.randn(4, 6, 6)
    w = torch.randn(5, 4, 3, 3)
    m = torch.rand(9, 6, 6)
    out = ns_conv2d(x, w, m, padding=1)
    torch.testing.assert_close(out, ns_conv2d(x[None], w, m[None], padding=1)[0])
    torch.testing.assert_close(ns_conv2d(x, w, torch.ones(9), padding=1), F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    torch.manual_seed(6)
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(5, 4, 3, 3)
    m = torch.rand(2, 9, 8, 8)
    ref = brute_ns_conv2d(x, w, m, pad=(1, 1, 1, 1))
    out = ns_conv2d(x.to(dtype), w.to(dtype), m.to(dtype), padding=1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0.3, rtol=0.05)
    with torch.autocast("cpu", dtype=dtype):
        out = ns_conv2d(x, w, m, padding=1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=0.3, rtol=0.05)


def test_backend_selection():
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of auto, reference"):
        NF.set_backend("fast")
    with use_backend("reference"):
        assert NF.get_backend() == "reference"
    assert NF.get_backend() == "auto"


# ---------------------------------------------------------------------------------------------
# bad input: every message names the argument and what was expected
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match=r"input has 3 channels but weight of shape \[5, 4, 3, 3\] with groups = 1 "
                                         r"expects C_in = 4"):
        ns_conv2d(torch.randn(2, 3, 8, 8), w, torch.ones(9))
    with pytest.raises(ValueError, match=r"similarity has shape \[8\]; expected \[P\] or \[P, P\].*P = kh \* kw = 9"):
        ns_conv2d(x, w, torch.ones(8))
    with pytest.raises(ValueError, match=r"dynamic similarity has shape \[2, 9, 6, 6\]; expected \[2, 9, 8, 8\]"):
        ns_conv2d(x, w, torch.ones(2, 9, 6, 6), padding=1)
    with pytest.raises(ValueError, match=r"dynamic similarity has shape \[3, 9, 9, 8, 8\]; expected \[2, 9, 9, 8, 8\]"):
        ns_conv2d(x, w, torch.ones(3, 9, 9, 8, 8), padding=1)
    with pytest.raises(ValueError, match=r"expected input of shape \[N, C_in, H, W\] \(4-D\).*got shape \[4, 8\]"):
        ns_conv2d(torch.randn(4, 8), w, torch.ones(9))
    with pytest.raises(ValueError, match=r"expected weight of shape \[C_out, C_in / groups, kh, kw\]"):
        ns_conv2d(x, torch.randn(5, 4, 9), torch.ones(9))
    with pytest.raises(TypeError, match="must share one dtype; got input float32, weight float64"):
        ns_conv2d(x, w.double(), torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \[C_out\] = \[5\], got \[4\]"):
        ns_conv2d(x, w, torch.ones(9), torch.ones(4))
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        ns_conv2d(x, w, torch.ones(9), stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'same' or 'valid', got 'full'"):
        ns_conv2d(x, w, torch.ones(9), padding="full")
    with pytest.raises(TypeError, match="similarity must be a torch.Tensor, got list"):
        ns_conv2d(x, w, [1.0] * 9)
    with pytest.raises(ValueError, match="not divisible by groups = 2"):
        ns_conv2d(x, w, torch.ones(9), groups=2)
    with pytest.raises(ValueError, match="too small for kernel 3x3"):
        ns_conv2d(torch.randn(1, 4, 2, 2), w, torch.ones(1, 9, 1, 1))
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        with pytest.raises(ValueError, match="must be on one device; got input on cpu, weight on cuda"):
            ns_conv2d(x, w.cuda(), torch.ones(9))
    meta = torch.empty(2, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match="must be on one device; got input on meta, weight on cpu"):
        ns_conv2d(meta, w, torch.ones(9))


# ---------------------------------------------------------------------------------------------
# non-finite similarity at zero-padded positions: one IEEE semantics on every backend
# ---------------------------------------------------------------------------------------------
def _fused_backends(monkeypatch):
    """'cpp' where it compiled; 'triton' on CPU tensors through the interpreter where triton imports."""
    names = ["cpp"] if _ops.unavailable_reason("cpp") is None else []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _ops.unavailable_reason("triton", "cpu") is None:
        names.append("triton")
    return names


@pytest.mark.parametrize("layout", ["dynamic-diagonal", "dynamic-full"])
@pytest.mark.parametrize("stride,padding", [((1, 1), 1), ((2, 1), (1, 2))], ids=["same", "strided"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nonfinite_similarity_at_padding_propagates(layout, stride, padding, monkeypatch):
    """NaN/inf in M where the (zero) padding is read: 0 * NaN = NaN, so those outputs and dW are NaN,
    as with F.conv2d and a non-finite weight; dx and dM stay finite. Every backend agrees."""
    torch.manual_seed(11)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    oh, ow = conv_output_size((7, 6), 3, stride, padding)
    shape = (2, 9, oh, ow) if layout == "dynamic-diagonal" else (2, 9, 9, oh, ow)
    sim = torch.rand(shape, dtype=torch.float64)
    # offset (0, 0) at output (0, 0) and offset (2, 2) at the last output read the padding
    if layout == "dynamic-diagonal":
        sim[0, 0, 0, 0], sim[1, 8, -1, -1] = float("nan"), float("inf")
    else:
        sim[0, 4, 0, 0, 0], sim[1, 2, 8, -1, -1] = float("nan"), float("-inf")
    results = {}
    fused = _fused_backends(monkeypatch)
    if stride != (1, 1) and "triton" in fused:
        fused.remove("triton")  # the interpreter is slow; Triton's strided geometry is covered in test_triton
    for backend in ["reference", "unfold", "ztrick"] + fused:
        dtype = torch.float32 if backend == "triton" else torch.float64  # Triton has no float64 kernels
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, w, sim)]
        with use_backend(backend):
            out = ns_conv2d(*leaves, stride=stride, padding=padding)
        out.sum().backward()
        results[backend] = [t.double() for t in [out.detach()] + [t.grad for t in leaves]]
    out, dx, dw, dsim = results["reference"]
    assert torch.isnan(out[0, :, 0, 0]).all() and torch.isnan(out[1, :, -1, -1]).all()
    assert torch.isfinite(out).sum() == out.numel() - 2 * out.shape[1]
    assert torch.isnan(dw).any() and torch.isfinite(dx).all() and torch.isfinite(dsim).all()
    for backend, grads in results.items():
        for name, a, r in zip(("out", "dx", "dw", "dsim"), grads, results["reference"]):
            tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else {}
            torch.testing.assert_close(a, r, equal_nan=True, **tol, msg=lambda m, n=name, b=backend: f"{b} {n}: {m}")
