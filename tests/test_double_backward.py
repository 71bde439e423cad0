"""Second-order gradients through dynamic NSL: the operators (``register_autograd`` on the backward
operator), the pure-PyTorch backends' autograd Functions (differentiable path under
``create_graph=True``) and the Triton glue under the interpreter; gradgradcheck in float64, a
Hessian-vector product against the ``reference`` backend, and a MAML step through a dynamic Conv-4."""

from __future__ import annotations

import os

import pytest
import torch
from torch.func import functional_call

from nsl import _ops
from nsl.fewshot import build_backbone
from nsl.functional import conv_output_size, ns_conv2d, use_backend

# (N, C_in, C_out, H, W, kernel, stride, padding, groups): tiny, one with stride 2 / padding / groups 2
GEOMETRIES = [(2, 2, 3, 4, 5, (2, 3), 1, 1, 1), (2, 4, 2, 5, 5, (3, 3), 2, 1, 2)]
BACKENDS = ["reference", "unfold", "ztrick", "cpp"]


def _need(backend):
    if backend == "cpp" and _ops.unavailable_reason("cpp") is not None:
        from nsl import _cpp

        if os.environ.get("NSL_REQUIRE_CPP") == "1":
            pytest.fail(f"NSL_REQUIRE_CPP=1 but the C++ kernel is unavailable: {_cpp.unavailable_reason()}")
        pytest.skip(f"C++ kernel unavailable: {_cpp.unavailable_reason()}")


def _inputs(geom, full, seed=0, dtype=torch.float64):
    n, ci, co, h, w, k, s, p, groups = geom
    gen = torch.Generator().manual_seed(seed)
    oh, ow = conv_output_size((h, w), k, s, p, 1)
    P = k[0] * k[1]
    x = torch.randn(n, ci, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(co, ci // groups, *k, generator=gen, dtype=torch.float64)
    sim = torch.randn((n, P, P, oh, ow) if full else (n, P, oh, ow), generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (x, weight, sim)], (s, p, groups)


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=["s1", "s2-g2"])
def test_operator_gradgradcheck(geom, full):
    """The registered operator (C++ kernel on CPU, else unfold), every input requiring grad."""
    (x, w, m), (s, p, groups) = _inputs(geom, full)

    def op(x, w, m):
        return torch.ops.nsl.dynamic_ns_conv2d(x, w, m, [s, s], [p, p], [1, 1], groups)

    assert torch.autograd.gradgradcheck(op, (x, w, m), fast_mode=True)


@pytest.mark.parametrize("needs", [(True, False, True), (False, True, False), (False, False, True)])
def test_operator_gradgradcheck_partial(needs):
    """Only some inputs require grad: the backward operator returns empty tensors for the others."""
    (x, w, m), (s, p, groups) = _inputs(GEOMETRIES[1], full=False)
    for t, need in zip((x, w, m), needs):
        t.requires_grad_(need)

    def op(*args):
        it = iter(args)
        x_, w_, m_ = (next(it) if need else t for t, need in zip((x, w, m), needs))
        return torch.ops.nsl.dynamic_ns_conv2d(x_, w_, m_, [s, s], [p, p], [1, 1], groups)

    inputs = tuple(t for t, need in zip((x, w, m), needs) if need)
    assert torch.autograd.gradgradcheck(op, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_backend_gradgradcheck(backend, full):
    _need(backend)
    (x, w, m), (s, p, groups) = _inputs(GEOMETRIES[1], full)
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda *a: ns_conv2d(*a, stride=s, padding=p, groups=groups),
                                            (x, w, m), fast_mode=True)


def _hvp(backend, tensors, geometry, vs):
    """``H v`` of ``L = sum(tanh(ns_conv2d(x, W, M)))`` with respect to (x, W, M)."""
    s, p, groups = geometry
    with use_backend(backend):
        out = ns_conv2d(*tensors, stride=s, padding=p, groups=groups)
        grads = torch.autograd.grad(torch.tanh(out).sum(), tensors, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_hessian_vector_product_matches_reference(backend, full):
    _need(backend)
    tensors, geometry = _inputs(GEOMETRIES[1], full)
    gen = torch.Generator().manual_seed(1)
    vs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in tensors]
    want = _hvp("reference", tensors, geometry, vs)
    got = _hvp(backend, tensors, geometry, vs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_triton_glue_double_backward(monkeypatch):
    """``_ops._TritonFn`` (the 'triton' backend on CPU tensors, interpreter): its create_graph backward
    is the differentiable reference path; the Hessian-vector product equals the reference's."""
    pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from nsl import _ops

    (x, w, m), (s, p, groups) = _inputs(GEOMETRIES[1], full=True)
    gen = torch.Generator().manual_seed(1)
    vs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, m)]
    x32, w32, m32 = (t.detach().float().requires_grad_() for t in (x, w, m))
    out = _ops.triton_dynamic_ns_conv2d(x32, w32, m32, [s, s], [p, p], [1, 1], groups)
    grads = torch.autograd.grad(torch.tanh(out).sum(), (x32, w32, m32), create_graph=True)
    got = torch.autograd.grad(sum((g * v.float()).sum() for g, v in zip(grads, vs)), (x32, w32, m32))
    want = _hvp("reference", [x, w, m], (s, p, groups), vs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def _maml_outer_grads(backend, layer):
    """One inner SGD step on a support batch, outer loss on a query batch, gradients of the
    outer loss with respect to the initial parameters (second order: create_graph=True)."""
    torch.manual_seed(0)
    net = build_backbone("conv4", layer=layer, in_channels=1, width=3, predictor_width=2).double()
    net.train()
    gen = torch.Generator().manual_seed(2)
    support = torch.randn(4, 1, 16, 16, generator=gen, dtype=torch.float64)
    query = torch.randn(4, 1, 16, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(4, net(support).shape[1], generator=gen, dtype=torch.float64)
    params = dict(net.named_parameters())
    with use_backend(backend):
        inner = ((functional_call(net, params, (support,)) - target) ** 2).mean()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads)}
        outer = ((functional_call(net, fast, (query,)) - target) ** 2).mean()
        return torch.autograd.grad(outer, list(params.values()))


@pytest.mark.parametrize("backend", ["auto", "unfold", "ztrick"])
@pytest.mark.parametrize("layer", ["dynamic-diagonal", "dynamic-full"])
def test_maml_step_matches_reference(backend, layer):
    """MAML through a dynamic Conv-4 backbone: the second-order outer gradients equal the reference's."""
    want = _maml_outer_grads("reference", layer)
    got = _maml_outer_grads(backend, layer)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
