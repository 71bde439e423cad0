"""The fused light predictor (``torch.ops.nsl.light_predictor``, ``csrc/light_predictor.cpp``) computes what the
unfused module path computes.

The reference is the same layer with the fused path switched off (``_predictor_paths._light_fused`` returning None:
the modules run, as before the fused operator), compared in float64: the output, the input gradient, every
parameter's gradient, the running statistics and ``num_batches_tracked`` after each step, in train then eval mode,
for diagonal and full ``M``, the three predictor norms, several geometries (stride 2, dilation 2, asymmetric
padding, groups, odd sizes, a 2x3 and a 5x5 kernel, batch 1). Each test also checks that the fused operator ran.
Then: double backward and ``torch.func`` (the module path takes over, exact), ``torch.compile`` (the operator in
the forward and backward graphs), ``torch.export`` (the operator kept), ``torch.jit.trace`` and ONNX export
(standard operators only), autocast, hooks (the modules run so that they see it), the operator's PyTorch
implementations (used without the C++ kernel) against the modules, and the BatchNorm corner cases.
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn

import nsl
from graph_spy import GraphSpy
from nsl import _light_ops
from nsl.layers import _predictor_paths

F64 = torch.float64


@contextlib.contextmanager
def unfused():
    """The module path (today's, before the fused operator) for every light predictor in the block."""
    with mock.patch.object(_predictor_paths, "_light_fused", lambda p, x, identity: None):
        yield


class FusedCalls:
    """Counts the calls that went through the fused operator."""

    def __init__(self):
        self.count = 0
        self._real = _predictor_paths._light_fused

    def __call__(self, p, x, identity):
        out = self._real(p, x, identity)
        self.count += out is not None
        return out


@pytest.fixture(autouse=True)
def _any_size():
    """The fused kernel on the small maps of these tests too (:data:`nsl._light_ops.MIN_LOCATIONS`)."""
    with mock.patch.dict(_light_ops.MIN_LOCATIONS, {"one-pass": 0, "multi-pass": 0}):
        yield


@pytest.fixture
def fused_calls():
    spy = FusedCalls()
    with mock.patch.object(_predictor_paths, "_light_fused", spy):
        yield spy


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Parameters away from their init (so every gradient is non-trivial) and running statistics away from 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            else:
                t.copy_(0.4 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return module


def _layer(c_in=4, c_out=5, kernel=3, stride=1, padding=1, dilation=1, groups=1, similarity="diagonal",
           norm="batch", dtype=F64, seed=1, **kwargs):
    torch.manual_seed(0)
    layer = nsl.DynamicNSConv2d(c_in, c_out, kernel, stride, padding, dilation, groups, similarity=similarity,
                                predictor="light", predictor_init="authors", predictor_norm=norm, dtype=dtype,
                                **kwargs)
    return _randomise(layer, seed)


def _step(layer, x, gout=None, create_graph=False):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    if gout is None:
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    out.backward(gout, create_graph=create_graph)
    return out, x.grad, gout


def _check_same(fused, reference, x, steps=(True, True, False), rtol=1e-10, atol=1e-12):
    """``fused`` against ``reference`` (a copy run unfused) for a sequence of train (True) / eval steps."""
    for training in steps:
        fused.train(training)
        reference.train(training)
        out, dx, gout = _step(fused, x)
        with unfused():
            ref, ref_dx, _ = _step(reference, x, gout)
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(dx, ref_dx, rtol=rtol, atol=atol)
        for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
            p.grad = q.grad = None
        for (name, b), c in zip(fused.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, c, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


GEOMETRIES = {  # name: layer arguments, input [N, C, H, W]
    "3x3": (dict(), (2, 4, 7, 6)),
    "stride2": (dict(stride=2), (3, 4, 9, 8)),
    "dilation2": (dict(padding=2, dilation=2), (2, 4, 9, 11)),
    "groups2-asym": (dict(c_out=6, groups=2, padding=(1, 0)), (2, 4, 6, 7)),
    "2x3-odd": (dict(kernel=(2, 3), padding=(0, 1)), (2, 4, 5, 7)),
    "5x5": (dict(kernel=5, padding=2), (2, 4, 8, 8)),
    "batch1-valid": (dict(padding=0), (1, 4, 6, 5)),
}


@pytest.mark.cpp
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("similarity", ["diagonal", "full"])
def test_layer_matches_module_path(similarity, norm, fused_calls):
    fused = _layer(similarity=similarity, norm=norm)
    _check_same(fused, copy.deepcopy(fused), torch.randn(2, 4, 7, 6, dtype=F64))
    assert fused_calls.count == 3


@pytest.mark.cpp
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_geometries_match_module_path(geometry, fused_calls):
    kwargs, shape = GEOMETRIES[geometry]
    for similarity in ("diagonal", "full"):
        fused = _layer(similarity=similarity, **kwargs)
        _check_same(fused, copy.deepcopy(fused), torch.randn(*shape, dtype=F64))
    assert fused_calls.count == 6


@pytest.mark.cpp
def test_predictor_alone_and_its_options_match(fused_calls):
    """``LightPredictor`` called directly (``g``, no identity), hidden width 5, no last bias, BatchNorm without
    affine parameters, ``momentum=None`` (cumulative average), ``track_running_stats=False``, a 'same' padding."""
    torch.manual_seed(0)
    p = nsl.LightPredictor(4, 3, 1, "same", 1, hidden_channels=5, bias=False, init="authors", dtype=F64)
    p.bn0 = nn.BatchNorm2d(4, eps=1e-3, affine=False, momentum=None, dtype=F64)
    p.bn1 = nn.BatchNorm2d(5, eps=1e-3, track_running_stats=False, dtype=F64)
    _randomise(p, 3)
    _check_same(p, copy.deepcopy(p), torch.randn(3, 4, 6, 6, dtype=F64), steps=(True, True, True, False))
    assert fused_calls.count == 3  # in eval mode bn0 uses running statistics and bn1 batch ones: the modules run


@pytest.mark.cpp
def test_float32_and_threads_match(fused_calls):
    """float32 (and one thread, where tiles are split differently) against the module path in float64."""
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, threads}):
            torch.set_num_threads(n_threads)
            fused = _layer(c_in=16, c_out=8, dtype=torch.float32)
            reference = copy.deepcopy(fused).double()
            x = torch.randn(3, 16, 13, 12)
            out, dx, gout = _step(fused, x)
            with unfused():
                ref, ref_dx, _ = _step(reference, x.double(), gout.double())
            torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dx, ref_dx.float(), rtol=1e-4, atol=1e-5)
            for p, q in zip(fused.parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-3, atol=1e-4)
            for b, c in zip(fused.buffers(), reference.buffers()):
                torch.testing.assert_close(b, c.to(b.dtype), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert fused_calls.count >= 1


@pytest.mark.cpp
def test_bfloat16_autocast_close_to_float32(fused_calls):
    fused = _layer(c_in=8, c_out=8, dtype=torch.float32)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = fused.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused(x)
        torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
        low16 = fused.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert low16.dtype == torch.bfloat16
        torch.testing.assert_close(low16.float(), ref, rtol=0.1, atol=0.1)
    assert fused_calls.count >= 1


@pytest.mark.cpp
def test_batch_norm_corner_cases_as_the_module_path():
    """Training at one value per channel raises nn.BatchNorm2d's error; an empty batch and GroupNorm at batch 1
    give the module path's results."""
    layer = _layer(padding=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 4, 3, 3, dtype=F64))
    group = _layer(norm="group")
    _check_same(group, copy.deepcopy(group), torch.randn(1, 4, 3, 3, dtype=F64))
    empty = _layer().eval()
    assert empty(torch.randn(0, 4, 5, 5, dtype=F64)).shape == (0, 5, 5, 5)


@pytest.mark.cpp
def test_double_backward_matches_module_path():
    """``create_graph=True``: the backward differentiates the PyTorch math, so a gradient penalty's gradient is
    the module path's."""
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    results = []
    for use_fused in (True, False):
        layer = _layer()
        with contextlib.nullcontext() if use_fused else unfused():
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
            gx.square().sum().backward()
        results.append([gx.detach()] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.cpp
def test_torch_func_takes_the_module_path(fused_calls):
    layer = _layer().eval()
    params = dict(layer.named_parameters())
    x = torch.randn(3, 4, 6, 6, dtype=F64)

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi.unsqueeze(0),)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert fused_calls.count == 0
    for i in range(3):
        layer.zero_grad()
        with unfused():
            loss(params, x[i]).backward()
        torch.testing.assert_close(per_sample["predictor.pw.weight"][i], layer.predictor.pw.weight.grad)




@pytest.mark.cpp
def test_compile_fullgraph_calls_the_fused_operator():
    torch._dynamo.reset()
    eager, model = _layer(dtype=torch.float32), _layer(dtype=torch.float32)
    x = torch.randn(2, 4, 7, 6)
    out_eager, dx_eager, gout = _step(eager, x)
    spy = GraphSpy()
    compiled = torch.compile(model, backend=spy, fullgraph=True)
    out, dx, _ = _step(compiled, x, gout)
    assert len(spy.dynamo) == 1
    assert spy.forward[0].count("nsl.light_predictor.default") == 1
    assert spy.backward[0].count("nsl.light_predictor_backward.default") == 1
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_eager, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    for b, c in zip(model.buffers(), eager.buffers()):  # running statistics updated in the compiled graph
        torch.testing.assert_close(b, c)


@pytest.mark.cpp
def test_export_keeps_the_operator_with_a_dynamic_batch():
    from torch.export import Dim

    model = _layer(dtype=torch.float32).eval()
    ep = torch.export.export(model, (torch.randn(2, 4, 7, 6),), dynamic_shapes=({0: Dim("batch")},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "nsl.light_predictor.default" in targets
    for n in (1, 3, 9):
        x = torch.randn(n, 4, 7, 6)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cpp
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_tracing_and_onnx_export_use_standard_operators(fused_calls):
    model = _layer(dtype=torch.float32).eval()
    x = torch.randn(2, 4, 7, 6)
    traced = torch.jit.trace(model, x)
    assert "light_predictor" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    calls = fused_calls.count
    with mock.patch.object(torch.onnx, "is_in_onnx_export", lambda: True):
        model(x)
    assert fused_calls.count == calls  # no fused call while exporting to ONNX


@pytest.mark.cpp
def test_hooks_see_the_modules_run(fused_calls):
    """A forward hook on the predictor or one of its modules (``nsl.report.count_macs`` counts with them) makes the
    modules run; the MAC count is the same as before."""
    layer = _layer(dtype=torch.float32).eval()
    x = torch.randn(1, 4, 7, 6)
    from nsl.report import count_macs

    macs = count_macs(layer, (4, 7, 6))
    assert fused_calls.count == 0  # hooks on the convolutions: the modules ran
    with unfused():
        assert count_macs(layer, (4, 7, 6)) == macs
    seen = []
    handle = layer.predictor.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(x)  # a hook on the predictor: the layer calls it (g, then I + g), fused inside
    handle.remove()
    assert seen == [torch.Size([1, 9, 7, 6])] and fused_calls.count == 1
    layer(x)
    assert fused_calls.count == 2


@pytest.mark.parametrize("norm", ["none", "running", "batch", "group"])
@pytest.mark.parametrize("full", [False, True])
def test_pytorch_math_matches_modules(norm, full):
    """The operators' PyTorch implementations (:func:`light_math`, :func:`light_backward_math`: what runs without
    the C++ kernel) against the modules in float64, stride 2 and dilation 2."""
    torch.manual_seed(0)
    p = nsl.LightPredictor(4, 3, 2, 2, 2, similarity="full" if full else "diagonal", hidden_channels=6,
                           init="authors", norm="none" if norm == "none" else ("group" if norm == "group" else "batch"),
                           dtype=F64)
    _randomise(p, 5).train(norm != "running")
    x = torch.randn(2, 4, 9, 10, dtype=F64, requires_grad=True)
    with unfused():
        ref = p(x)
    gout = torch.randn_like(ref)
    ref.backward(gout)
    args = _predictor_paths._norm_arguments(p.bn0), _predictor_paths._norm_arguments(p.bn1)
    (mode, g0, e0, a0), (_, g1, e1, a1) = args
    params = [p.dw.weight, p.pw.weight, p.out.weight, p.out.bias]
    geometry = ([2, 2], [2, 2], [2, 2], _light_ops.NORM_CODES[mode], g0, g1, e0, e1, False)
    with torch.no_grad():
        sim, m0, v0, m1, v1 = _light_ops.light_math(x, *params, *a0, *a1, *geometry)
        stats0 = (m0, v0) if mode in ("batch", "group") else tuple(a0[2:])
        stats1 = (m1, v1) if mode in ("batch", "group") else tuple(a1[2:])
        grads = _light_ops.light_backward_math(gout, sim, x, *params[:3], *a0[:2], *stats0, *a1[:2], *stats1,
                                               *geometry, True, True)
    torch.testing.assert_close(sim, ref.detach(), rtol=1e-10, atol=1e-12)
    expected = [x.grad, *[t.grad for t in params], *[t.grad if t is not None else None for t in a0[:2] + a1[:2]]]
    for got, want in zip(grads, expected):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_pytorch_math_with_group_norm_on_an_empty_batch():
    """An empty batch through the PyTorch math with GroupNorm: empty ``sim``, ``[0, groups]`` statistics, and
    gradients of the right shapes (zero for the parameters), as ``nn.GroupNorm`` gives."""
    x = torch.randn(0, 4, 6, 6, dtype=F64)
    params = [torch.randn(4, 1, 3, 3, dtype=F64), torch.randn(6, 4, 1, 1, dtype=F64),
              torch.randn(9, 6, 1, 1, dtype=F64), torch.randn(9, dtype=F64)]
    norm0 = (torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), None, None)
    norm1 = (torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64), None, None)
    geometry = ([1, 1], [1, 1], [1, 1], _light_ops.NORM_CODES["group"], 2, 3, 1e-5, 1e-5, False)
    sim, m0, v0, m1, v1 = _light_ops.light_math(x, *params, *norm0, *norm1, *geometry)
    assert sim.shape == (0, 9, 6, 6) and m0.shape == v0.shape == (0, 2) and m1.shape == v1.shape == (0, 3)
    grads = _light_ops.light_backward_math(torch.zeros_like(sim), sim, x, *params[:3], *norm0[:2], m0, v0,
                                           *norm1[:2], m1, v1, *geometry, True, True)
    assert grads[0].shape == x.shape
    for got, want in zip(grads[1:], params + [norm0[0], norm0[1], norm1[0], norm1[1]]):
        assert got.shape == want.shape and not got.any()


@pytest.mark.cpp
def test_small_maps_take_the_module_path(fused_calls):
    layer = _layer()
    with mock.patch.dict(_light_ops.MIN_LOCATIONS, {"one-pass": 43, "multi-pass": 42}):
        layer(torch.randn(2, 4, 7, 6, dtype=F64))  # 42 locations, batch statistics: fused
        assert fused_calls.count == 1
        layer.eval()(torch.randn(2, 4, 7, 6, dtype=F64))  # running statistics: 42 < 43, the modules
        assert fused_calls.count == 1


@pytest.mark.cpp
def test_operator_checks_its_arguments():
    x = torch.randn(1, 4, 5, 5)
    dw, pw, out = torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1), torch.randn(7, 6, 1, 1)  # 7: neither 9 nor 81
    with pytest.raises(RuntimeError, match="out_weight must be"):
        torch.ops.nsl.light_predictor(x, dw, pw, out, None, *[None] * 8, [1, 1], [1, 1], [1, 1], 0, 1, 1, 1e-3,
                                      1e-3, False)
