"""The registered operators ``torch.ops.nsl.dynamic_ns_conv2d`` / ``..._backward`` (nsl._ops):
opcheck, values against the float64 brute force, the PyTorch fallback, autocast, and
``torch.compile`` calling the operator without graph breaks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import nsl
import nsl.functional as NF
from graph_spy import GraphSpy
from nsl import _ops
from reference import brute_ns_conv2d

OP = torch.ops.nsl.dynamic_ns_conv2d.default
BACKWARD = torch.ops.nsl.dynamic_ns_conv2d_backward.default


# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (3, 4, 5, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 6, 9, 8, (3, 5), (2, 1), (1, 2), (1, 1), 2),
    (1, 3, 4, 8, 9, (3, 3), (1, 2), (2, 0), (2, 1), 1),
    (0, 2, 3, 5, 5, (2, 2), (1, 1), (0, 1), (1, 1), 1),
    (3, 2, 2, 4, 5, (1, 1), (1, 1), (0, 0), (1, 1), 2),
]


def _gid(g):
    n, ci, co, h, w, k, s, p, d, grp = g
    return f"n{n}-c{ci}o{co}-{h}x{w}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{grp}"


def _inputs(geom, layout, dtype, requires_grad=False, seed=0):
    n, ci, co, h, w, (kh, kw), s, p, d, groups = geom
    gen = torch.Generator().manual_seed(seed)
    oh = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    P = kh * kw
    shape = (n, P, oh, ow) if layout == "diagonal" else (n, P, P, oh, ow)
    x = torch.randn(n, ci, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(co, ci // groups, kh, kw, generator=gen, dtype=torch.float64)
    sim = torch.randn(shape, generator=gen, dtype=torch.float64)
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in (x, weight, sim)]
    return tensors, (list(s), list(p), list(d), groups)


def _brute(x, weight, sim, geo):
    s, p, d, groups = geo
    return brute_ns_conv2d(x, weight, sim, None, tuple(s), (p[0], p[0], p[1], p[1]), tuple(d), groups)


OPCHECK_CASES = [(g, torch.float64) for g in GEOMETRIES] + [(GEOMETRIES[i], torch.float32) for i in (0, 3)]


@pytest.mark.cpp
@pytest.mark.parametrize("layout", ["diagonal", "full"])
@pytest.mark.parametrize("geom,dtype", OPCHECK_CASES, ids=[f"{_gid(g)}-{str(d)[6:]}" for g, d in OPCHECK_CASES])
def test_opcheck(geom, layout, dtype):
    """Schema, autograd registration, fake kernels and AOT dispatch (static and dynamic shapes)."""
    (x, weight, sim), geo = _inputs(geom, layout, dtype, requires_grad=True)
    torch.library.opcheck(OP, (x, weight, sim, *geo))
    gout = torch.randn(x.shape[0], weight.shape[0], *sim.shape[-2:], dtype=dtype)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(BACKWARD, (gout, x.detach(), weight.detach(), sim.detach(), *geo, *needs))


@pytest.mark.parametrize("kernel", [pytest.param("cpp", marks=pytest.mark.cpp), "unfold"])
@pytest.mark.parametrize("layout", ["diagonal", "full"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_gid)
def test_values_and_gradients(geom, layout, kernel):
    """The operator (C++ kernel, or the PyTorch fallback its default implementation runs without it:
    once the C++ kernel is loaded the dispatcher no longer reaches that, so it is called directly)
    against the brute force."""
    (x, weight, sim), geo = _inputs(geom, layout, torch.float64, requires_grad=True, seed=1)
    if kernel == "cpp":
        out = OP(x, weight, sim, *geo)
    else:
        out = _ops._torch_forward(x.detach(), weight.detach(), sim.detach(), *geo)
    torch.testing.assert_close(out, _brute(x.detach(), weight.detach(), sim.detach(), geo), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, sim)]
    with NF.use_backend("reference"):
        ref = NF.ns_conv2d(*leaves, stride=geo[0], padding=geo[1], dilation=geo[2], groups=geo[3])
    expected = torch.autograd.grad(ref, leaves, g)
    if kernel == "cpp":
        got = torch.autograd.grad(out, (x, weight, sim), g)
    else:
        got = _ops._torch_backward(g, x.detach(), weight.detach(), sim.detach(), *geo, (True, True, True))
    for name, a, r in zip(("dx", "dweight", "dsim"), got, expected):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.cpp
def test_backward_returns_empty_for_gradients_not_asked():
    (x, weight, sim), geo = _inputs(GEOMETRIES[0], "diagonal", torch.float64)
    gout = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    full = BACKWARD(gout, x, weight, sim, *geo, True, True, True)
    for i in range(3):
        needs = [j == i for j in range(3)]
        grads = BACKWARD(gout, x, weight, sim, *geo, *needs)
        for j, t in enumerate(grads):
            if j == i:
                torch.testing.assert_close(t, full[j])
            else:
                assert t.numel() == 0


@pytest.mark.cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu_computes_in_float32(dtype):
    """bfloat16/float16 CPU inputs run the C++ kernel in float32 and come back in their dtype."""
    assert _ops.kernel_for("cpu", dtype) == "cpp"  # KERNELS["cpp"] serves it, computing in float32
    (x, weight, sim), geo = _inputs(GEOMETRIES[1], "diagonal", dtype, requires_grad=True, seed=2)
    out = OP(x, weight, sim, *geo)
    assert out.dtype == dtype
    exact = OP(*(t.detach().float() for t in (x, weight, sim)), *geo)
    torch.testing.assert_close(out, exact.to(dtype))  # one rounding of the float32 result
    out.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == sim.grad.dtype == dtype


@pytest.mark.cpp
def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the operator casts float32 inputs to the autocast dtype (not float32 as
    torchvision's deform_conv2d does); float64 is left alone; gradients reach float32 leaves."""
    (x, weight, sim), geo = _inputs(GEOMETRIES[0], "full", torch.float32, requires_grad=True, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OP(x, weight, sim, *geo)
        out64 = OP(*(t.detach().double() for t in (x, weight, sim)), *geo)
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64
    low = [t.detach().bfloat16() for t in (x, weight, sim)]
    torch.testing.assert_close(out, OP(*low, *geo))
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and sim.grad.shape == sim.shape


def test_meta_shapes_and_bad_sim():
    x = torch.empty(2, 4, 9, 8, device="meta")
    w = torch.empty(6, 2, 3, 5, device="meta")
    sim = torch.empty(2, 15, 15, 5, 8, device="meta")
    out = OP(x, w, sim, [2, 1], [1, 2], [1, 1], 2)
    assert out.shape == (2, 6, 5, 8) and out.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"sim has shape \[2, 15, 4, 8\]; expected \[2, 15, 5, 8\]"):
        OP(x, w, torch.empty(2, 15, 4, 8, device="meta"), [2, 1], [1, 2], [1, 1], 2)


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------
@pytest.mark.cpp
def test_auto_uses_the_operator_on_cpu():
    x, w, m = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.rand(2, 9, 6, 6)
    assert NF._choose("auto") == NF._choose("cpp") == "op" and NF._choose("unfold") == "unfold"
    assert _ops.kernel_for(x.device, x.dtype) == _ops.kernel_for(x.device, torch.bfloat16) == "cpp"
    out = NF.ns_conv2d(x.requires_grad_(), w, m, padding=1)
    assert "nsl_dynamic_ns_conv2d" in type(out.grad_fn).__name__


def test_auto_on_cuda_without_triton_warns_once(monkeypatch):
    """No usable Triton on a CUDA device: the operator falls back to the unfold math with one warning
    per process (exercised without a GPU by asking the operator's chooser directly)."""
    reasons = {"triton": "triton is not installed", "cpp": None}
    monkeypatch.setattr(_ops, "unavailable_reason", lambda kernel, device="cpu": reasons[kernel])
    monkeypatch.setattr(_ops, "_triton_warned", False)
    with pytest.warns(RuntimeWarning, match="falls back to the PyTorch 'unfold' math.*triton is not installed"):
        assert _ops.kernel_for("cuda:0", torch.float32) == "unfold"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ops.kernel_for("cuda:0", torch.bfloat16) == "unfold"
        assert _ops.kernel_for("cuda:0", torch.float64) == "unfold"  # float64: no Triton kernel, no warning
    reasons["triton"] = None
    assert _ops.kernel_for("cuda:0", torch.float16) == "triton"


def test_backend_errors():
    x, w, m = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.rand(1, 9, 5, 5)
    meta = [t.to("meta") for t in (x, w, m)]
    with NF.use_backend("cpp"), pytest.raises(TypeError, match=r"the 'cpp' backend runs on CPU float32/float64/"
                                                              r"bfloat16/float16 tensors, got torch.float32 on meta"):
        NF.ns_conv2d(*meta, padding=1)
    reason = _ops.unavailable_reason("triton", "cpu")
    if reason is not None:
        with NF.use_backend("triton"), pytest.raises(RuntimeError, match="the 'triton' backend is unavailable on "
                                                                         "cpu"):
            NF.ns_conv2d(x, w, m, padding=1)


# ---------------------------------------------------------------------------------------------
# torch.compile: the operator in the graph, no graph break, no switch to 'reference'
# ---------------------------------------------------------------------------------------------


def _dynamic_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nsl.DynamicNSConv2d(3, 4, 3, padding=1, predictor_init="authors"), nn.ReLU(),
        nsl.DynamicNSConv2d(4, 6, (2, 3), padding="same", similarity="full", predictor_init="authors"),
        nn.ReLU(), nsl.DynamicNSConv2d(6, 4, 3, stride=2, padding=1, groups=2, predictor="light"),
    )


@pytest.mark.cpp
def test_compile_calls_the_operator_without_graph_break():
    torch._dynamo.reset()
    model = _dynamic_model()
    x = torch.randn(2, 3, 9, 8)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    spy = GraphSpy()
    compiled = torch.compile(model, backend=spy, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert len(spy.dynamo) == 1  # fullgraph: one graph, no break
    assert spy.dynamo[0].count("nsl.dynamic_ns_conv2d") == 3
    assert spy.forward[0].count("nsl.dynamic_ns_conv2d.default") == 3
    assert spy.backward[0].count("nsl.dynamic_ns_conv2d_backward.default") == 3
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.cpp
def test_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    model = _dynamic_model().eval()
    x = torch.randn(3, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cpp
@pytest.mark.slow
def test_compile_inductor_training_step_calls_the_operator():
    torch._dynamo.reset()
    model = _dynamic_model()
    x = torch.randn(2, 3, 9, 8)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(model, fullgraph=True)
    out, code = run_and_get_code(lambda: compiled(x))
    calls = [line for c in code for line in c.splitlines()
             if "torch.ops.nsl.dynamic_ns_conv2d.default(" in line and not line.lstrip().startswith("#")]
    assert len(calls) == 3, calls
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_uses_reference():
    x, w, m = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.rand(1, 9, 5, 5)
    traced = torch.jit.trace(lambda a, b, c: NF.ns_conv2d(a, b, c, padding=1), (x, w, m))
    assert "nsl::" not in str(traced.graph)
    torch.testing.assert_close(traced(x, w, m), NF.ns_conv2d(x, w, m, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["diagonal", "full"])
def test_triton_backend_on_cpu_through_the_interpreter(layout, monkeypatch):
    """The 'triton' backend (CPU tensors, TRITON_INTERPRET=1) equals the operator, gradients included;
    asymmetric 'same' padding is applied before the kernel."""
    pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _ops.unavailable_reason("triton", "cpu") is None
    torch.manual_seed(12)
    x = torch.randn(1, 4, 7, 6)
    w = torch.randn(6, 2, 2, 3)
    sim = torch.randn((1, 6, 7, 6) if layout == "diagonal" else (1, 6, 6, 7, 6))
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, sim)]
        with NF.use_backend(backend):
            out = NF.ns_conv2d(*leaves, padding="same", dilation=(2, 1), groups=2)
        out.backward(torch.ones_like(out))
        results[backend] = [out.detach()] + [t.grad for t in leaves]
    for a, r in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the operator's CUDA kernel is Triton's, auto picks it
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("layout", ["diagonal", "full"])
def test_cuda_operator(layout):  # pragma: no cover - GPU machines
    reason = _ops.unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(f"Triton kernels unavailable on this GPU: {reason}")
    assert _ops.kernel_for("cuda", torch.float32) == "triton"
    (x, weight, sim), geo = _inputs(GEOMETRIES[1], layout, torch.float32, requires_grad=True, seed=5)
    xc, wc, sc = (t.detach().cuda().requires_grad_() for t in (x, weight, sim))
    torch.library.opcheck(OP, (xc, wc, sc, *geo))
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # IEEE float32 dots
    try:
        out = OP(xc, wc, sc, *geo)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.testing.assert_close(out.cpu().double(), _brute(x.detach(), weight.detach(), sim.detach(), geo),
                               rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = OP(xc, wc, sc, *geo)
    assert low.dtype == torch.bfloat16
    low.float().sum().backward()
    assert xc.grad.dtype == torch.float32 and torch.isfinite(sc.grad).all()
