"""torch.func on NSL layers and the dynamic similarity operator (nsl._func, nsl._ops.FUNCTIONS), float64:

* per-sample gradients by ``vmap(grad)`` equal a loop of single-sample gradients;
* ``jacrev`` and ``jvp``-of-``grad`` (forward-over-reverse Hessian-vector products) equal central finite
  differences and the plain-autograd values (``create_graph=True`` through the operator's ``register_autograd``);
* a torch.func MAML meta-gradient equals the ``create_graph=True`` one, also vmapped over tasks;
* ``hessian``, forward-mode AD, the vmap rules of every strategy, gradcheck with batched and forward AD;
* vmap through the light predictor's channels-last path.

Every dynamic kind of ``LAYER_KINDS`` (and the pooled / shared predictor variants) with the C++ kernel (the
operator under ``'auto'``, ``cpp`` marker) and the ``'unfold'`` math (the operator's fallback without the C++
kernel; ``NSL_DISABLE_CPP=1`` runs it through the operator itself: ``test_vmap_grad_through_the_operator_fallback``),
and the static kinds. Small shapes: the default test tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

import nsl.functional as NF
from nsl import _func, _ops
from nsl.layers import LAYER_KINDS, DynamicNSConv2d, SharedPredictors, make_conv

OP_KINDS = [name for name, k in LAYER_KINDS.items() if k.module is DynamicNSConv2d]
OTHER_KINDS = [name for name in LAYER_KINDS if name not in OP_KINDS]  # conv, static-*, dynamic-filter


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (hand-offs between threads would cost more than the work), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case(kind: str, options: dict, backend: str):
    """A test case: ``backend`` ``'cpp'`` is the operator under ``'auto'`` with the C++ kernel (``cpp`` marker)."""
    extra = "".join(f"-{k}{'' if v is True else v}" for k, v in options.items())
    marks = [pytest.mark.cpp] if backend == "cpp" else []
    return pytest.param(kind, options, "auto" if backend == "cpp" else backend, marks=marks,
                        id=f"{kind}{extra}-{backend}")


# every operator kind on the C++ kernel and the unfold math, the ztrick math for two, the predictor variants
# (pooled grid, global, shared) and the kinds without the operator (conv, static-*, dynamic-filter)
CASES = ([_case(k, {}, b) for k in OP_KINDS for b in ("cpp", "unfold")]
         + [_case(k, {}, "ztrick") for k in ("dynamic-diagonal", "dynamic-full")]
         + [_case("dynamic-diagonal", {"predictor_stride": 2}, b) for b in ("cpp", "unfold")]
         + [_case("dynamic-diagonal-light", {"predictor_stride": 0}, "cpp")]
         + [_case("dynamic-diagonal", {"shared": True}, b) for b in ("cpp", "unfold")]
         + [_case(k, {}, "auto") for k in OTHER_KINDS])
CPP = pytest.param("auto", marks=pytest.mark.cpp, id="cpp")


def _net(kind: str, options: dict, seed: int = 0) -> nn.Module:
    """Two layers of ``kind`` (3 -> 3 -> 2 channels, 3x3, the second strided) with a tanh between, every
    parameter perturbed (so ``M != I``, predictors and dynamic-filter mixing non-zero), float64, eval mode."""
    torch.manual_seed(seed)
    options = dict(options)
    if options.pop("shared", False):  # the two layers of equal input width and geometry share one predictor
        options["shared"] = SharedPredictors()
        second = dict(out_channels=3, stride=1)
    else:
        second = dict(out_channels=2, stride=2)
    width = {"predictor_width": 4} if LAYER_KINDS[kind].predictor else {}
    net = nn.Sequential(make_conv(kind, 3, 3, 3, padding=1, **width, **options), nn.Tanh(),
                        make_conv(kind, 3, second["out_channels"], 3, stride=second["stride"], padding=1, **width,
                                  **options))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.double().eval()


def _data(n: int, seed: int = 1, size: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)


def _loss_fn(net):
    """``L(params, x, y) = sum((net(x) - y)^2)`` through ``functional_call`` (buffers from the module)."""
    buffers = dict(net.named_buffers())

    def loss(params, x, y):
        return ((functional_call(net, (params, buffers), (x,)) - y) ** 2).sum()

    return loss


def _close(got, want, tol=1e-9):
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("kind,options,backend", CASES)
def test_per_sample_gradients_equal_a_loop(kind, options, backend):
    net = _net(kind, options)
    loss = _loss_fn(net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = _data(4)
    y = torch.randn_like(net(x)).detach()
    with NF.use_backend(backend):
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
        for i in range(x.shape[0]):  # plain autograd outside transforms: the operator's register_autograd
            leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
            grads = torch.autograd.grad(loss(leaves, x[i:i + 1], y[i:i + 1]), list(leaves.values()))
            _close({k: g[i] for k, g in per_sample.items()}, dict(zip(leaves, grads)))


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params.values()])


@pytest.mark.parametrize("kind,options,backend", CASES)
def test_jacrev_and_hessian_vector_products_equal_finite_differences(kind, options, backend):
    net = _net(kind, options)
    loss = _loss_fn(net)
    buffers = dict(net.named_buffers())
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = _data(2)
    y = torch.randn_like(net(x)).detach()
    gen = torch.Generator().manual_seed(5)
    v_x = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    v_p = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    eps = 1e-5

    def out(inp):
        return functional_call(net, (params, buffers), (inp,))

    with NF.use_backend(backend):
        jac = jacrev(out)(x)  # [N, C_out, H_out, W_out, N, C_in, H, W]
        jv = (jac.reshape(-1, x.numel()) @ v_x.reshape(-1)).reshape(jac.shape[:4])
        fd = (out(x + eps * v_x) - out(x - eps * v_x)) / (2 * eps)
        torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-7)
        # forward-over-reverse: jvp of grad along v_p
        _, hvp = jvp(lambda p: grad(loss)(p, x, y), (params,), (v_p,))
        h = 1e-6  # central differences: error ~h^2 times the third derivative (large here), ~1e-16 / h roundoff
        shifted = [{k: p + sign * h * v_p[k] for k, p in params.items()} for sign in (1, -1)]
        g_plus, g_minus = (grad(loss)(p, x, y) for p in shifted)
        scale = max(t.abs().max().item() for t in hvp.values())
        for k in params:
            torch.testing.assert_close(hvp[k], (g_plus[k] - g_minus[k]) / (2 * h), rtol=1e-6, atol=1e-7 * scale)
        # the exact values: double backward outside transforms (the operator's register_autograd)
        leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
        grads = torch.autograd.grad(loss(leaves, x, y), list(leaves.values()), create_graph=True)
        exact = torch.autograd.grad(sum((g * v_p[k]).sum() for g, k in zip(grads, leaves)), list(leaves.values()))
        _close(hvp, dict(zip(leaves, exact)))
        x_leaf = x.clone().requires_grad_()
        rows = torch.autograd.grad(out(x_leaf), x_leaf, torch.ones_like(fd))[0]
        torch.testing.assert_close(jac.sum((0, 1, 2, 3)), rows, rtol=1e-10, atol=1e-10)


def _maml_meta_gradient(loss, params, support, query, lr=0.1):
    """One inner SGD step on the support set, the query loss of the adapted parameters, its gradient
    with respect to the initial parameters (second order), all by torch.func."""

    def outer(p):
        inner_grads = grad(loss)(p, *support)
        fast = {k: v - lr * inner_grads[k] for k, v in p.items()}
        return loss(fast, *query)

    return grad(outer)(params)


def _maml_create_graph(loss, params, support, query, lr=0.1):
    leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
    inner = torch.autograd.grad(loss(leaves, *support), list(leaves.values()), create_graph=True)
    fast = {k: v - lr * g for (k, v), g in zip(leaves.items(), inner)}
    return dict(zip(leaves, torch.autograd.grad(loss(fast, *query), list(leaves.values()))))


@pytest.mark.parametrize("kind,options,backend", CASES)
def test_maml_meta_gradient_equals_create_graph(kind, options, backend):
    net = _net(kind, options)
    loss = _loss_fn(net)
    params = {k: v.detach() for k, v in net.named_parameters()}
    support, query = _data(2, seed=2), _data(2, seed=3)
    target = torch.randn_like(net(support)).detach()
    with NF.use_backend(backend):
        got = _maml_meta_gradient(loss, params, (support, target), (query, target))
        want = _maml_create_graph(loss, params, (support, target), (query, target))
    _close(got, want)


@pytest.mark.parametrize("kind", [pytest.param("dynamic-diagonal", marks=pytest.mark.cpp),
                                  pytest.param("dynamic-full-light", marks=pytest.mark.cpp), "static-full"])
def test_maml_vmapped_over_tasks_equals_a_loop(kind):
    """A batch of tasks, each with its own parameters (batched weight and batched similarity: the 'loop'
    and 'fold-groups' vmap strategies inside the inner step)."""
    net = _net(kind, {})
    loss = _loss_fn(net)
    base = {k: v.detach() for k, v in net.named_parameters()}
    tasks = 3
    gen = torch.Generator().manual_seed(4)
    params = {k: p + 0.1 * torch.randn(tasks, *p.shape, generator=gen, dtype=p.dtype) for k, p in base.items()}
    support = torch.stack([_data(2, seed=10 + t) for t in range(tasks)])
    query = torch.stack([_data(2, seed=20 + t) for t in range(tasks)])
    target = torch.randn(tasks, *net(support[0]).shape, generator=gen, dtype=torch.float64)
    batched = vmap(lambda p, s, q, t: _maml_meta_gradient(loss, p, (s, t), (q, t)))(params, support, query, target)
    for t in range(tasks):
        one = {k: v[t] for k, v in params.items()}
        _close({k: g[t] for k, g in batched.items()},
               _maml_create_graph(loss, one, (support[t], target[t]), (query[t], target[t])))


@pytest.mark.cpp
def test_hessian_of_a_dynamic_layer_matches_the_reference_backend():
    net = _net("dynamic-full", {})
    buffers, params = dict(net.named_buffers()), dict(net.named_parameters())
    x = _data(1, size=3)

    def scalar(inp):
        return torch.tanh(functional_call(net, (params, buffers), (inp,))).sum()

    got = hessian(scalar)(x)
    with NF.use_backend("reference"):
        want = hessian(scalar)(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    flat = got.reshape(x.numel(), x.numel())
    torch.testing.assert_close(flat, flat.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", [CPP, "unfold", "ztrick"])
def test_forward_mode_ad_outside_torch_func(backend):
    """A ``forward_ad.dual_level`` tangent through ns_conv2d (the operator dropped it: tangent None)."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, 3, 3, generator=gen,
                                                                                    dtype=torch.float64)
    m = torch.randn(2, 9, 9, 5, 5, generator=gen, dtype=torch.float64)
    tangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, m)]
    with NF.use_backend("reference"):
        _, want = jvp(lambda *a: NF.ns_conv2d(*a, padding=1), (x, w, m), tuple(tangents))
    with NF.use_backend(backend), fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip((x, w, m), tangents)]
        got = fwAD.unpack_dual(NF.ns_conv2d(*duals, padding=1)).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- the Functions themselves: every vmap strategy, gradcheck with batched and forward-mode checks ----------------
GEOMETRY = (2, 4, 4, 5, 6, (3, 2), [2, 1], [1, 1], [1, 2], 2)  # N, C_in, C_out, H, W, kernel, s, p, d, groups


def _op_inputs(full: bool, seed: int = 0):
    n, ci, co, h, w, (kh, kw), s, p, d, groups = GEOMETRY
    oh, ow = NF.conv_output_size((h, w), (kh, kw), s, p, d)
    P = kh * kw
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(co, ci // groups, kh, kw, generator=gen, dtype=torch.float64)
    sim = torch.randn((n, P, P, oh, ow) if full else (n, P, oh, ow), generator=gen, dtype=torch.float64)
    return (x, weight, sim), (s, p, d, groups)


def _batched(t: Tensor, dim: int, size: int = 3, seed: int = 9):
    """``size`` different copies of ``t`` stacked at ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([t + 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for _ in range(size)], dim)


SUBSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


@pytest.mark.cpp
@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_vmap_rules_of_every_strategy_equal_a_loop(full):
    """Every subset of batched inputs, vmapped dimensions 0 and 1: forward (fold-batch, fold-groups, loop) and
    backward (every subset of batched (g, x, W, M), all gradients and each alone) against per-slice calls.
    The rules are the same code for every pair (they call the pair on unbatched tensors): the operator's here."""
    which = "op"
    fn = _ops.FUNCTIONS[which]
    tensors, conv = _op_inputs(full)
    for subset in SUBSETS:
        for dim in (0, 1):
            args = [_batched(t, dim) if b else t for t, b in zip(tensors, subset)]
            dims = tuple(dim if b else None for b in subset)
            got = vmap(lambda *a: fn.apply(*a, *conv), in_dims=dims)(*args)
            for i in range(3):
                one = [a.select(dim, i) if b else a for a, b in zip(args, subset)]
                torch.testing.assert_close(got[i], fn.apply(*one, *conv), rtol=1e-10, atol=1e-10)
    backward = fn.backward_function
    g = torch.randn(fn.apply(*tensors, *conv).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for subset in [(1, *s) for s in [(0, 0, 0), *SUBSETS]] + [(0, *s) for s in SUBSETS]:
        args = [_batched(t, 0) if b else t for t, b in zip((g, *tensors), subset)]
        dims = tuple(0 if b else None for b in subset)
        for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
            got = vmap(lambda *a, needs=needs: backward.apply(*a, *conv, *needs), in_dims=dims)(*args)
            for i in range(3):
                one = [a[i] if b else a for a, b in zip(args, subset)]
                want = backward.apply(*one, *conv, *needs)
                for k in range(3):
                    if needs[k]:
                        where = f"{subset} {needs} d{'xWM'[k]}"
                        torch.testing.assert_close(got[k][i], want[k], rtol=1e-10, atol=1e-10,
                                                   msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.cpp
def test_vmap_over_an_empty_dimension():
    """A vmapped dimension of size 0 gives empty results of the right shapes, forward and backward, every strategy."""
    fn = _ops.FUNCTIONS["op"]
    (x, weight, sim), conv = _op_inputs(True)
    out_shape = fn.apply(x, weight, sim, *conv).shape
    for subset in SUBSETS:
        args = [t.new_zeros(0, *t.shape) if b else t for t, b in zip((x, weight, sim), subset)]
        dims = tuple(0 if b else None for b in subset)
        assert vmap(lambda *a: fn.apply(*a, *conv), in_dims=dims)(*args).shape == (0, *out_shape)
        grads = vmap(lambda *a: fn.backward_function.apply(torch.ones(out_shape, dtype=x.dtype), *a, *conv,
                                                           True, True, True), in_dims=dims)(*args)
        assert [tuple(g.shape) for g in grads] == [(0, *t.shape) for t in (x, weight, sim)]


@pytest.mark.parametrize("which,full", [pytest.param("op", False, marks=pytest.mark.cpp, id="op-cpp-diagonal"),
                                        pytest.param("op", True, marks=pytest.mark.cpp, id="op-cpp-full"),
                                        pytest.param("unfold", True, id="unfold-full"),
                                        pytest.param("ztrick", False, id="ztrick-diagonal")])
def test_function_gradcheck_with_batched_and_forward_ad(which, full):
    """gradcheck / gradgradcheck of each Function with vmapped cotangents, forward AD and forward-over-reverse.

    Batched gradients of plain autograd (``is_grads_batched``: the legacy vmap, no torch.func interpreter, so no
    Function vmap rule) and batched forward AD (``forward_ad`` duals with vmapped tangents around unbatched
    primals) reach the pair's calls with batched tensors directly: the operators' registered vmap rules
    (``torch.library.register_vmap``) take them, the pure-PyTorch formulations' in-place ops cannot. nsl uses those
    Functions only inside torch.func transforms (where their vmap rules apply:
    ``test_vmap_rules_of_every_strategy_equal_a_loop``), so these batched checks are the operator's."""
    fn = _ops.FUNCTIONS[which]
    tensors, conv = _op_inputs(full)
    inputs = tuple(t.clone().requires_grad_() for t in tensors)

    def f(*a):
        return fn.apply(*a, *conv)

    legacy_batched = which == "op" and hasattr(torch.library, "register_vmap")
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=legacy_batched, check_forward_ad=True,
                                    check_batched_forward_grad=legacy_batched, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_rev_over_rev=True,
                                        check_batched_grad=legacy_batched, fast_mode=True)


@pytest.mark.cpp
def test_vmap_of_the_operator_itself_uses_its_rule():
    """``torch.vmap`` of a direct operator call and batched gradients through its register_autograd
    (``autograd.functional.jacobian(vectorize=True)``) run the registered vmap rules, not
    PyTorch's per-sample fallback (which warns 'performance drop')."""
    if not hasattr(torch.library, "register_vmap"):
        pytest.skip("this torch has no torch.library.register_vmap")
    (x, weight, sim), conv = _op_inputs(True)
    xs = _batched(x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda a: torch.ops.nsl.dynamic_ns_conv2d(a, weight, sim, *conv))(xs)
        for i in range(xs.shape[0]):
            torch.testing.assert_close(got[i], torch.ops.nsl.dynamic_ns_conv2d(xs[i], weight, sim, *conv))
        jac = torch.autograd.functional.jacobian(lambda w: torch.ops.nsl.dynamic_ns_conv2d(x, w, sim, *conv), weight,
                                                 vectorize=True)
    with NF.use_backend("reference"):
        want = torch.autograd.functional.jacobian(
            lambda w: NF.ns_conv2d(x, w, sim, stride=conv[0], padding=conv[1], dilation=conv[2], groups=conv[3]),
            weight)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-10)


def test_transforms_active():
    assert not _func.transforms_active()
    seen = []
    vmap(lambda t: seen.append(_func.transforms_active()) or t)(torch.zeros(2))
    grad(lambda t: seen.append(_func.transforms_active()) or t.sum())(torch.zeros(2))
    with fwAD.dual_level():
        seen.append(_func.transforms_active())
    assert seen == [True, True, True] and not _func.transforms_active()


# ---- vmap through the predictors' channels-last path (float32 on CPU) ---------------------------------------------
@pytest.mark.parametrize("kind", ["dynamic-diagonal-light", "dynamic-full-light", "dynamic-diagonal",
                                  "dynamic-diagonal-cosine"])
def test_vmap_over_a_batch_of_inputs_through_the_channels_last_predictors(kind):
    """float32 on CPU takes the predictors' channels-last path; inside vmap the input keeps its layout
    (vmap could not query is_contiguous for channels-last: 'NYI: querying is_contiguous inside of vmap')."""
    torch.manual_seed(0)
    layer = make_conv(kind, 3, 4, 3, padding=1, predictor_width=4).eval()
    with torch.no_grad():
        for p in layer.predictor.parameters():
            p.normal_(0, 0.3)
    xs = torch.randn(3, 2, 3, 6, 6)  # 3 batches of 2 inputs
    got = vmap(layer)(xs)
    per_sample = vmap(layer)(xs[:, 0])  # unbatched inputs [C, H, W] inside vmap
    with torch.no_grad():
        for i in range(xs.shape[0]):
            torch.testing.assert_close(got[i], layer(xs[i]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(per_sample[i], layer(xs[i, 0]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a Python process with NSL_DISABLE_CPP=1 (about 10 s)
def test_vmap_grad_through_the_operator_fallback():
    """The operator's own fallback (no C++ kernel: its default implementation, the unfold math) under vmap(grad)."""
    code = (
        "import torch, nsl\n"
        "from nsl import _cpp, _ops\n"
        "from torch.func import grad, vmap\n"
        "assert not _cpp.is_available()\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 1, 2, 5, 5, dtype=torch.float64)\n"
        "w = torch.randn(3, 2, 3, 3, dtype=torch.float64)\n"
        "m = torch.randn(4, 1, 9, 5, 5, dtype=torch.float64)\n"
        "f = lambda w, x, m: nsl.functional.ns_conv2d(x, w, m, padding=1).pow(2).sum()\n"
        "got = vmap(grad(f), in_dims=(None, 0, 0))(w, x, m)\n"
        "with nsl.functional.use_backend('reference'):\n"
        "    want = torch.stack([grad(f)(w, x[i], m[i]) for i in range(4)])\n"
        "torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NSL_DISABLE_CPP": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.skipif(not _func._DYNAMO_READS_FUNCTORCH_STATE, reason="Dynamo reads the torch.func state from torch 2.5")
def test_compiled_transform_runs_the_reference_formula():
    """``torch.compile(vmap(grad(f)), fullgraph=True)``: Dynamo cannot trace the Functions' rules inside a transform,
    so ns_conv2d runs the reference formula there (one graph, the eager values)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 2, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    m = torch.randn(4, 1, 9, 9, 5, 5, generator=gen, dtype=torch.float64)

    def f(w, x, m):
        return NF.ns_conv2d(x, w, m, padding=1).pow(2).sum()

    per_sample = vmap(grad(f), in_dims=(None, 0, 0))
    compiled = torch.compile(per_sample, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w, x, m), per_sample(w, x, m), rtol=1e-10, atol=1e-10)


def test_triton_backend_on_cpu_under_vmap_grad(monkeypatch):
    """The 'triton' backend on CPU tensors (Triton's interpreter) runs as ``FUNCTIONS['triton']`` under torch.func."""
    pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 5, 5, generator=gen)
    w = torch.randn(3, 2, 3, 3, generator=gen)
    m = torch.randn(2, 1, 9, 5, 5, generator=gen)

    def f(w, x, m):
        return NF.ns_conv2d(x, w, m, padding=1).pow(2).sum()

    with NF.use_backend("triton"):
        got = vmap(grad(f), in_dims=(None, 0, 0))(w, x, m)
    with NF.use_backend("reference"):
        want = vmap(grad(f), in_dims=(None, 0, 0))(w, x, m)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
