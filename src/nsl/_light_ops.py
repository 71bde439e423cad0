"""The fused light predictor as registered PyTorch operators (``torch.ops.nsl.light_predictor``).

The light predictor (:class:`nsl.LightPredictor`) for ``x [N, C, H, W]``, ``P = kh * kw``::

    A0 = dw(x)                    depthwise kh x kw conv at the layer's stride, padding, dilation
    A1 = pw(ReLU(N0(A0)))         1x1 conv, C -> hidden
    sim = tanh(out(ReLU(N1(A1))) + b)  (+ I)     1x1 conv, hidden -> P (diagonal M) or P * P (full M)

with ``N`` a norm given by its code (:data:`NORM_CODES`): ``none``; ``running`` (``BatchNorm2d`` with its
running statistics); ``batch`` (``BatchNorm2d`` with batch statistics, mean and biased variance over
``(n, y)`` per channel); ``group`` (``GroupNorm``, over a group's channels and ``y`` per sample). With
``identity`` the op returns ``M = I + g`` (1 added to every channel for diagonal ``M``, to channels
``p * (P + 1)`` for full ``M``), else ``g``. Two operators, defined with :func:`torch.library.custom_op`::

    nsl::light_predictor(x, dw_weight, pw_weight, out_weight, out_bias?, weight0?, bias0?, mean0?, var0?,
                         weight1?, bias1?, mean1?, var1?, stride, padding, dilation, norm, groups0, groups1,
                         eps0, eps1, identity) -> (sim, mean0, var0, mean1, var1)
    nsl::light_predictor_backward(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0?, bias0?,
                                  mean0?, var0?, weight1?, bias1?, mean1?, var1?, stride, padding, dilation,
                                  norm, groups0, groups1, eps0, eps1, identity, need_x, need_params)
        -> (dx, d_dw, d_pw, d_out, d_out_bias, d_weight0, d_bias0, d_weight1, d_bias1)

Shapes: ``x [N, C, H, W]``, ``dw_weight [C, 1, kh, kw]``, ``pw_weight [hidden, C, 1, 1]``,
``out_weight [P or P * P, hidden, 1, 1]``, ``out_bias`` that many entries; ``weight0/bias0/mean0/var0 [C]``,
``weight1/bias1/mean1/var1 [hidden]`` (the norms' affine parameters, and their running statistics for
``running``); ``sim [N, P or P * P, H_out, W_out]``. ``mean*/var*`` out: the batch statistics used (``[C]``,
``[hidden]`` for ``batch``; ``[N, groups]`` for ``group``; empty otherwise), in float32 (float64 for float64
input), for the caller's running-statistics update. Padding is symmetric ``(ph, pw)``. A gradient not computed
is an empty tensor.

What runs where: on CPU the fused C++ kernel (``csrc/light_predictor.cpp``, registered with the dispatcher from
C++ once :mod:`nsl._cpp` loads the library; float32/float64, bfloat16/float16 computed in float32): it writes
nothing but ``sim`` (the intermediate maps are recomputed tile by tile in cache; the norms' batch statistics
take extra passes, gathered beside the depthwise conv). On CUDA the forward is the Triton kernel
(:func:`nsl._triton.light_forward`: float32/bfloat16/float16, float32 accumulation, nothing but ``sim`` written,
two extra launches for batch statistics) where :func:`nsl._ops.kernel_for` says ``'triton'`` and the device's
probe passed (:func:`nsl._triton.light_unavailable_reason`), else
:func:`light_math`; the CUDA backward likewise (:func:`nsl._triton.light_backward`: the depthwise half in Triton,
the hidden and output layers' small maps and ``dx``'s transposed depthwise conv in PyTorch ops; else
:func:`light_backward_math`). Elsewhere, and on CPU
until the library is loaded (the first call loads it), the default implementations below run the same math in
PyTorch ops (:func:`light_math`, :func:`light_backward_math`, from :mod:`nsl._light_math`). Fake kernels give
shapes for ``torch.compile`` and ``torch.export``.

Autograd (``register_autograd``): saves ``x``, the weights, the norms' parameters and statistics and ``sim``
(the output: ``g = sim - I`` gives ``tanh'`` without recomputing it) and calls the backward operator. With
``create_graph=True`` (grad mode on in the backward) it differentiates :func:`light_math` instead, so
gradients of any order are exact. ``torch.func`` transforms, forward-mode AD, ONNX export and
``torch.jit.trace`` never reach the operators: :func:`fused_ready` is False there, and the layer runs its
modules (:mod:`nsl.layers._predictor_paths`). The operators have no ``FUNCTIONS`` entry (:mod:`nsl._func`
wraps pairs linear in each input; the predictor is not). Autocast (CPU): ``x`` and the three convolutions'
weights and bias are cast by :func:`nsl._ops.autocast_inputs`; the norms' parameters and statistics are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _cpp, _func, _ops
from ._geometry import output_size
from ._light_math import NORM_CODES, _stats_dtype, light_backward_math, light_math

__all__ = ["NORM_CODES", "DTYPES", "TRITON_DTYPES", "MIN_LOCATIONS", "light_predictor", "light_predictor_backward",
           "light_math", "light_backward_math", "fused_ready"]

#: The dtypes the fused CPU kernel serves (bfloat16/float16 computed in float32).
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: The dtypes the Triton kernel serves on CUDA (:func:`nsl._triton.light_forward`; float32 accumulation).
TRITON_DTYPES = _ops.KERNELS["triton"].dtypes
#: Fewest output locations per image (``H_out * W_out``) for which the fused kernel is used: ``'one-pass'`` (norms
#: ``none`` and ``running``) and ``'multi-pass'`` (``batch``/``group`` statistics: three passes each way, recomputing
#: the convolutions). Below them the modules are faster on CPU (measured, 2-core AVX2 machine, 1 thread, predictor
#: forward + backward, fused/modules: 8x8 and 14x14 maps 1.2-2.4x in both modes; 16x16 at C=32 0.86x one-pass, 1.23x
#: multi-pass; 32x32 0.43-0.76x; 56x56 at C=64 0.59x one-pass, 1.07x multi-pass): the kernel works channel by
#: channel on a tile, and small maps leave too little work per channel. A size, not the batch: no export guard.
#: Applied on CPU only (no GPU measurement: on CUDA the operator runs at every size).
MIN_LOCATIONS = {"one-pass": 256, "multi-pass": 1024}

_NORM_ARGS = ("Tensor? weight0, Tensor? bias0, Tensor? mean0, Tensor? var0, Tensor? weight1, Tensor? bias1, "
              "Tensor? mean1, Tensor? var1, SymInt[] stride, SymInt[] padding, SymInt[] dilation, int norm, "
              "int groups0, int groups1, float eps0, float eps1, bool identity")
_FORWARD_SCHEMA = (f"(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor out_weight, Tensor? out_bias, {_NORM_ARGS})"
                   " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = (f"(Tensor grad_sim, Tensor sim, Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor out_weight, "
                    f"{_NORM_ARGS}, bool need_x, bool need_params) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
                    "Tensor, Tensor, Tensor, Tensor)")


def _triton_light_reason(device: torch.device) -> str | None:
    """Why the light predictor's Triton kernels do not serve ``device`` (:func:`nsl._triton.light_unavailable_reason`,
    probed once per GPU), else None."""
    try:
        from . import _triton
    except Exception as e:  # noqa: BLE001 - any import failure means no Triton path
        return f"nsl._triton could not be imported ({e})"
    return _triton.light_unavailable_reason(device)


def fused_ready(x: Tensor) -> bool:
    """True when a fused kernel serves ``x`` in this call (the one dispatch point between the operators and the
    layer's modules): a CPU tensor of a dtype in :data:`DTYPES` with the C++ library loaded (or, while
    ``torch.compile`` traces, not yet tried: the operator loads it when it first runs), or a CUDA tensor of a dtype
    in :data:`TRITON_DTYPES` whose device runs the light Triton kernels (:func:`nsl._triton.light_unavailable_reason`
    None: Triton usable there and a probe agreeing with the PyTorch math; while
    ``torch.compile`` traces, assumed: the operator's CUDA kernel checks again and otherwise runs
    :func:`light_math`); and none of the contexts the operators do not support: ``torch.func`` transforms and
    forward-mode AD (:func:`nsl._func.transforms_active`), ``torch.jit.trace`` and ONNX export (standard operators
    there)."""
    dtypes = {"cpu": DTYPES, "cuda": TRITON_DTYPES}.get(x.device.type, ())
    if x.dtype not in dtypes:
        return False
    if _func.transforms_active() or _func.compiled_transform():
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if x.device.type == "cuda":
        return torch.compiler.is_compiling() or _triton_light_reason(x.device) is None
    if _cpp._tried:
        return _cpp._library is not None
    if torch.compiler.is_compiling():
        return True
    return _cpp.is_available()


# --------------------------------------------------------------------------------------------
# the operators
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("nsl::light_predictor", mutates_args=(), schema=_FORWARD_SCHEMA)
def light_predictor(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, out_weight: Tensor, out_bias: Tensor | None,
                    weight0: Tensor | None, bias0: Tensor | None, mean0: Tensor | None, var0: Tensor | None,
                    weight1: Tensor | None, bias1: Tensor | None, mean1: Tensor | None, var1: Tensor | None,
                    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], norm: int, groups0: int,
                    groups1: int, eps0: float, eps1: float, identity: bool) -> tuple[Tensor, ...]:
    """``(sim, mean0, var0, mean1, var1)`` of the light predictor (module docstring); this default implementation
    (devices without the fused kernel, CPU before the C++ library is loaded) runs :func:`light_math`."""
    args = (x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1, var1,
            stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity)
    if _ops._cpp_loaded_now(x):
        return torch.ops.nsl.light_predictor(*args)
    sim, *stats = light_math(*args)
    return (sim.contiguous(), *(s.contiguous() for s in stats))


@torch.library.custom_op("nsl::light_predictor_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def light_predictor_backward(grad_sim: Tensor, sim: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                             out_weight: Tensor, weight0: Tensor | None, bias0: Tensor | None, mean0: Tensor | None,
                             var0: Tensor | None, weight1: Tensor | None, bias1: Tensor | None,
                             mean1: Tensor | None, var1: Tensor | None, stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int], norm: int, groups0: int, groups1: int,
                             eps0: float, eps1: float, identity: bool, need_x: bool,
                             need_params: bool) -> tuple[Tensor, ...]:
    """The 9 gradients of :func:`light_predictor` for ``grad_sim = dL/dsim`` (module docstring; empty where not
    computed); this default implementation (devices without a fused kernel, CPU before the C++ library is loaded)
    runs :func:`light_backward_math`."""
    args = (grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1, mean1,
            var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x, need_params)
    if _ops._cpp_loaded_now(x):
        return torch.ops.nsl.light_predictor_backward(*args)
    grads = light_backward_math(*args)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


# ---- CUDA: the Triton forward ---------------------------------------------------------------
@light_predictor.register_kernel("cuda")
def _forward_cuda(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1,
                  var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity):
    """The CUDA kernel of :func:`light_predictor`: :func:`nsl._triton.light_forward` where
    :func:`nsl._ops.kernel_for` picks ``'triton'`` for ``x`` (a dtype of :data:`TRITON_DTYPES`, Triton usable on the
    device; otherwise it warns once), else :func:`light_math`."""
    args = (x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1, var1,
            stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity)
    if _ops.kernel_for(x.device, x.dtype) == "triton" and _triton_light_reason(x.device) is None:
        from . import _triton

        return _triton.light_forward(*args)
    sim, *stats = light_math(*args)
    return (sim.contiguous(), *(s.contiguous() for s in stats))


@light_predictor_backward.register_kernel("cuda")
def _backward_cuda(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1,
                   mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x,
                   need_params):
    """The CUDA kernel of :func:`light_predictor_backward`: :func:`nsl._triton.light_backward` where
    :func:`nsl._ops.kernel_for` picks ``'triton'`` for ``x``, else :func:`light_backward_math`; empty tensors for
    the gradients not computed."""
    args = (grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1, mean1,
            var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x, need_params)
    if _ops.kernel_for(x.device, x.dtype) == "triton" and _triton_light_reason(x.device) is None:
        from . import _triton

        grads = _triton.light_backward(*args)
    else:
        grads = light_backward_math(*args)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


# ---- shapes (FakeTensor / meta) ------------------------------------------------------------
def _stats_shapes(x: Tensor, norm: int, channels: int, groups: int):
    if norm == NORM_CODES["batch"]:
        return (channels,)
    if norm == NORM_CODES["group"]:
        return (x.shape[0], groups)
    return (0,)


@light_predictor.register_fake
def _forward_fake(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1,
                  var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity):
    kernel = (dw_weight.shape[2], dw_weight.shape[3])
    oh, ow = output_size(x.shape[2:], kernel, stride, padding, dilation)
    dtype = _stats_dtype(x)
    sim = x.new_empty(x.shape[0], out_weight.shape[0], oh, ow)
    s0 = _stats_shapes(x, norm, x.shape[1], groups0)
    s1 = _stats_shapes(x, norm, pw_weight.shape[0], groups1)
    return (sim, x.new_empty(s0, dtype=dtype), x.new_empty(s0, dtype=dtype), x.new_empty(s1, dtype=dtype),
            x.new_empty(s1, dtype=dtype))


@light_predictor_backward.register_fake
def _backward_fake(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1,
                   mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x,
                   need_params):
    def like(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else x.new_empty(0)

    return (like(x, need_x), like(dw_weight, need_params), like(pw_weight, need_params), like(out_weight, need_params),
            x.new_empty(out_weight.shape[0], dtype=out_weight.dtype) if need_params else x.new_empty(0),
            like(weight0, need_params), like(bias0, need_params), like(weight1, need_params), like(bias1, need_params))


# ---- autograd ------------------------------------------------------------------------------
_TENSORS = 13  # the forward's tensor arguments: x, 3 weights, out_bias, 2 x (weight, bias, mean, var)


def _setup_context(ctx, inputs, output):
    (x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1, var1,
     stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity) = inputs
    sim, bm0, bv0, bm1, bv1 = output
    ctx.mark_non_differentiable(bm0, bv0, bm1, bv1)  # for the running statistics' update only
    if norm in (NORM_CODES["batch"], NORM_CODES["group"]):
        mean0, var0, mean1, var1 = bm0, bv0, bm1, bv1
    ctx.save_for_backward(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1,
                          mean1, var1, sim)
    ctx.args = (list(stride), list(padding), list(dilation), norm, groups0, groups1, eps0, eps1, identity)


def _backward(ctx, grad_sim, *_):
    (x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1, var1,
     sim) = ctx.saved_tensors
    needs = ctx.needs_input_grad[:_TENSORS]
    none = (None,) * 9
    if grad_sim is None or not any(needs):
        return (None,) * _TENSORS + none
    params = (dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, weight1, bias1)
    slots = (1, 2, 3, 4, 5, 6, 9, 10)  # each parameter's place among the forward's arguments
    if torch.is_grad_enabled():  # create_graph=True: differentiate the PyTorch math (exact, any order)
        tensors = (x, *params)
        wanted = [t for t, k in zip(tensors, (0, *slots)) if needs[k]]
        with torch.enable_grad():
            sim_again = light_math(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0,
                                   weight1, bias1, mean1, var1, *ctx.args)[0]
            found = iter(torch.autograd.grad(sim_again, wanted, grad_sim, create_graph=True, allow_unused=True))
        grads = [next(found) if needs[k] else None for k in (0, *slots)]
    else:
        need_params = any(needs[k] for k in slots)
        out = torch.ops.nsl.light_predictor_backward(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0,
                                                     bias0, mean0, var0, weight1, bias1, mean1, var1, *ctx.args,
                                                     needs[0], need_params)
        grads = [g if needs[k] else None for g, k in zip(out, (0, *slots))]
    result = [None] * _TENSORS
    for k, g in zip((0, *slots), grads):
        result[k] = g
    return (*result, *none)


light_predictor.register_autograd(_backward, setup_context=_setup_context)


# ---- autocast ------------------------------------------------------------------------------
def _register_autocast(device_type: str) -> None:
    """The operator's ``Autocast<Device>`` kernel: ``x`` and the convolutions' weights and bias cast by
    :func:`nsl._ops.autocast_inputs` (the norms' parameters and statistics kept), then the operator with
    autocast off (as :func:`nsl._ops._register_autocast` does for the convolution operator)."""
    op = torch.ops.nsl.light_predictor.default

    def kernel(x, dw_weight, pw_weight, out_weight, out_bias, *rest):
        x, dw_weight, pw_weight, out_weight, out_bias = _ops.autocast_inputs(device_type, x, dw_weight, pw_weight,
                                                                             out_weight, out_bias)
        with torch.autocast(device_type, enabled=False):
            return op(x, dw_weight, pw_weight, out_weight, out_bias, *rest)

    _AUTOCAST_LIB.impl("light_predictor", kernel, {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type])


_AUTOCAST_LIB = torch.library.Library("nsl", "FRAGMENT")
for _device in ("cpu", "cuda"):
    _register_autocast(_device)
