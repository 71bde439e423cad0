"""Dynamic neural similarity convolution as registered PyTorch operators (``torch.ops.nsl``).

Two operators, defined with :func:`torch.library.custom_op`::

    nsl::dynamic_ns_conv2d(Tensor x, Tensor weight, Tensor sim, SymInt[] stride, SymInt[] padding,
                           SymInt[] dilation, SymInt groups) -> Tensor
    nsl::dynamic_ns_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor sim,
                                    SymInt[] stride, SymInt[] padding, SymInt[] dilation,
                                    SymInt groups, bool need_dx, bool need_dweight, bool need_dsim)
        -> (Tensor, Tensor, Tensor)

Shapes (``P = kh * kw``, positions row-major ``q = i * kw + j`` with offset ``(i, j)``; padding
symmetric, ``(ph, pw)``)::

    x      [N, C_in, H, W]
    weight [C_out, C_in / groups, kh, kw]
    sim    [N, P, H_out, W_out]  (diagonal m)   or   [N, P, P, H_out, W_out]  (full M)
    out    [N, C_out, H_out, W_out],  H_out = (H + 2 ph - dh (kh - 1) - 1) // sh + 1

    out[n, o](y) = sum_{c in group(o), p, q} W[o, c, p] M[n, p, q](y) x[n, c, y * s + d * (i_q, j_q) - pad]

(diagonal: ``M = diag(m)``; zero padding). The backward returns ``(dx, dweight, dsim)``; a gradient
not asked for is an empty tensor (``numel() == 0``; custom ops cannot return ``None``).

What runs where (the operator is the one dispatch point: ``ns_conv2d``'s ``'auto'`` backend calls it,
and it alone picks the kernel, from the one table :data:`KERNELS`; :func:`kernel_for` says which):

* CPU: the fused C++ kernel (:mod:`nsl._cpp`), registered with the dispatcher from C++
  (``TORCH_LIBRARY_IMPL(nsl, CPU, m)`` in ``csrc/dynamic_ns_conv.cpp``) once the library is loaded;
  float32/float64, and bfloat16/float16 computed in float32 and cast back. Until it is loaded (the
  first CPU call loads it, compiling on first use) and wherever it cannot be (no compiler,
  ``NSL_DISABLE_CPP=1``), the default implementation here runs the PyTorch ``unfold`` math.
* CUDA, float32/bfloat16/float16: the Triton kernels of :mod:`nsl._triton` (imported on first use)
  when ``_triton.unavailable_reason(device)`` is None (otherwise one warning per process, and the
  ``unfold`` math); float64: the ``unfold`` math.
* Any other device: the ``unfold`` math (memory-lean: saves only x, w and M).
* Fake/meta tensors (``torch.compile``, ``torch.export``, shape propagation): shape-only kernels.

The schemas are spelled out (not inferred from annotations), so torch 2.4 can define the operators.

Autograd: ``register_autograd`` saves only ``x``, ``weight`` and ``sim`` and calls the backward
operator. The backward operator has its own ``register_autograd`` (the op is linear in each of
x, weight, sim, so the derivatives of its backward are calls of the two operators; see
``_backward_backward``): derivatives of any order (MAML, gradient penalties, Hessian-vector
products) on every device and kernel.

torch.func (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``hessian``, ...) and forward-mode AD cannot use
``register_autograd`` (PyTorch builds its ``autograd.Function`` without ``setup_context``). Inside them
:func:`call` (what ``ns_conv2d`` calls) runs ``FUNCTIONS['op']``: the two operators wrapped by
:func:`nsl._func.make_function` in an ``autograd.Function`` with ``setup_context``, jvp and vmap rules,
so the same kernels do the work; outside them the operator is called directly (``torch.compile`` and
``torch.export`` graphs contain it). The vmap rules are also registered on the operators themselves
(``torch.library.register_vmap`` where torch has it). A further operator pair gets the same treatment
with one ``_func.make_function(_func.ConvPair(name, forward_op, backward_op))`` entry in :data:`FUNCTIONS`.

Autocast, one rule (:func:`autocast_inputs`): under ``torch.autocast(device_type)`` every floating
tensor on that device except float64 is cast to the autocast dtype *in force at call time*, and the
computation runs in it (so the output has the autocast dtype, unlike ``torchvision.ops.deform_conv2d``,
which computes in float32); float64 is never cast. On CUDA the Triton kernels then run in
bfloat16/float16 with float32 accumulation; on CPU the C++ kernel computes in float32 and casts its
results to the autocast dtype. Where it holds: the operator's autocast kernels for CPU and CUDA
(registered below with the public ``Library.impl`` under the ``AutocastCPU``/``AutocastCUDA`` keys;
``torch.library.register_autocast`` is not used because it casts to one dtype fixed at registration,
and is missing from torch 2.4), and :func:`nsl.functional.ns_conv2d`, which applies the same rule to
the input, weight, similarity and bias before any backend (also on XPU and MPS). No private
``torch._C`` API is used at import time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _func
from ._geometry import ConvGeometry, check_shapes, pair
from ._torch_kernels import (
    _reference,
    _unfold_backward,
    _unfold_forward,
    _ztrick_backward,
    _ztrick_forward,
    linear_vjp,
)

__all__ = ["dynamic_ns_conv2d", "dynamic_ns_conv2d_backward", "triton_dynamic_ns_conv2d", "KERNELS", "Kernel",
           "kernel_for", "unavailable_reason", "require", "autocast_enabled", "autocast_inputs", "FUNCTIONS", "call"]


class Kernel(NamedTuple):
    """A fused kernel of the operator: the device type it runs on and the dtypes it serves."""

    device_type: str
    dtypes: tuple[torch.dtype, ...]


#: The fused kernels and their dtypes, the one table (read by the operator, ``ns_conv2d``'s explicit
#: ``'cpp'``/``'triton'`` backends, ``nsl doctor`` and the benchmarks). ``cpp``: bfloat16/float16 are
#: computed in float32 and cast back. Everything else runs the PyTorch ``unfold`` math.
KERNELS = {
    "cpp": Kernel("cpu", (torch.float32, torch.float64, torch.bfloat16, torch.float16)),
    "triton": Kernel("cuda", (torch.float32, torch.bfloat16, torch.float16)),
}


def unavailable_reason(kernel: str, device: torch.device | str = "cpu") -> str | None:
    """Why the fused ``kernel`` (a key of :data:`KERNELS`) cannot run on ``device`` (None when it can).

    ``'cpp'``: the C++ kernel is loaded, compiled first if needed (the first call may take a minute);
    ``'triton'``: :func:`nsl._triton.unavailable_reason` (on CPU tensors: only under ``TRITON_INTERPRET=1``).
    """
    if kernel == "cpp":
        from . import _cpp

        return _cpp.unavailable_reason()
    try:
        from . import _triton
    except ImportError as e:
        return f"nsl._triton could not be imported ({e})"
    return _triton.unavailable_reason(torch.device(device))


_triton_warned = False


def kernel_for(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel the operator runs for tensors of ``dtype`` on ``device``: ``'cpp'``, ``'triton'`` or
    ``'unfold'`` (the PyTorch math). A CUDA dtype Triton serves whose kernels cannot run warns once per
    process, saying why."""
    global _triton_warned
    device = torch.device(device)
    for name, kernel in KERNELS.items():
        if device.type == kernel.device_type and dtype in kernel.dtypes:
            reason = unavailable_reason(name, device)
            if reason is None:
                return name
            if name == "triton" and not _triton_warned:
                _triton_warned = True
                warnings.warn(f"nsl: dynamic similarity on CUDA falls back to the PyTorch 'unfold' math (slower, "
                              f"more memory): the Triton kernels are unavailable: {reason}", RuntimeWarning,
                              stacklevel=2)
    return "unfold"


def require(kernel: str, x: Tensor) -> None:
    """Raise unless the fused ``kernel`` serves ``x``'s dtype and can run on its device (``ns_conv2d``'s
    explicit ``'cpp'``/``'triton'`` backends): ``TypeError`` for a dtype (or, for ``'cpp'``, a device) it
    does not serve, ``RuntimeError`` saying why it is unavailable. ``'triton'`` also takes CPU tensors
    (under ``TRITON_INTERPRET=1``)."""
    spec = KERNELS[kernel]
    names = "/".join(str(d).replace("torch.", "") for d in spec.dtypes)
    if x.dtype not in spec.dtypes or (kernel == "cpp" and x.device.type != "cpu"):
        where = "on CPU " if kernel == "cpp" else ""
        raise TypeError(f"the {kernel!r} backend runs {where}{names} tensors, got {x.dtype} on {x.device}; use "
                        f"backend 'auto'")
    reason = unavailable_reason(kernel, x.device)
    if reason is not None:
        raise RuntimeError(f"the {kernel!r} backend is unavailable on {x.device}: {reason}")


# --------------------------------------------------------------------------------------------
# the PyTorch math (unfold formulation), used where no fused kernel applies
# --------------------------------------------------------------------------------------------
def _padded_forward(math, x, weight, sim, stride, padding, dilation, groups) -> Tensor:
    """A pure-PyTorch formulation ``math(xpad, weight, sim, groups, geometry)`` in the operator's convention."""
    xpad = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    return math(xpad, weight, sim, groups, ConvGeometry.of(x, weight, stride, padding, dilation))


def _padded_backward(math, grad, x, weight, sim, stride, padding, dilation, groups, needs):
    """A formulation's backward ``math(grad, xpad, weight, sim, groups, geometry, needs)`` in the operator's
    convention: ``(dx, dweight, dsim)``, None where not needed, ``dx`` cropped to the unpadded input."""
    ph, pw = padding
    xpad = F.pad(x, (pw, pw, ph, ph)) if any(padding) else x
    dx, dw, dsim = math(grad, xpad, weight, sim, groups, ConvGeometry.of(x, weight, stride, padding, dilation), needs)
    if dx is not None and any(padding):
        dx = dx[:, :, ph: ph + x.shape[2], pw: pw + x.shape[3]].contiguous()
    return dx, dw, dsim


def _torch_forward(x, weight, sim, stride, padding, dilation, groups) -> Tensor:
    """The operator by the ``unfold`` math (its default implementation)."""
    return _padded_forward(_unfold_forward, x, weight, sim, stride, padding, dilation, groups)


def _torch_reference(x, weight, sim, stride, padding, dilation, groups) -> Tensor:
    """The operator by the explicit ``reference`` formula (plain autograd, differentiable to any order)."""
    return _padded_forward(_reference, x, weight, sim, stride, padding, dilation, groups)


def _torch_backward(grad, x, weight, sim, stride, padding, dilation, groups, needs):
    """The backward operator by the ``unfold`` math (None where not needed)."""
    return _padded_backward(_unfold_backward, grad, x, weight, sim, stride, padding, dilation, groups, needs)


# --------------------------------------------------------------------------------------------
# the operators
# --------------------------------------------------------------------------------------------
_FORWARD_SCHEMA = ("(Tensor x, Tensor weight, Tensor sim, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
                   "SymInt groups) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor weight, Tensor sim, SymInt[] stride, SymInt[] padding, "
                    "SymInt[] dilation, SymInt groups, bool need_dx, bool need_dweight, bool need_dsim) "
                    "-> (Tensor, Tensor, Tensor)")


# The schemas are spelled out: custom_op cannot infer them from this module's postponed annotations
# on torch < 2.5 (``from __future__ import annotations`` makes every annotation a string).
@torch.library.custom_op("nsl::dynamic_ns_conv2d", mutates_args=(), schema=_FORWARD_SCHEMA)
def dynamic_ns_conv2d(x: Tensor, weight: Tensor, sim: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int) -> Tensor:
    """``out[n, o](y) = sum_{c, p, q} W[o, c, p] M[n, p, q](y) x[n, c, y * s + d * offset(q) - pad]``
    (see the module docstring for shapes); this default implementation (devices without a fused
    kernel, CPU without the C++ kernel) runs the PyTorch ``unfold`` math."""
    if _cpp_loaded_now(x):
        return torch.ops.nsl.dynamic_ns_conv2d(x, weight, sim, stride, padding, dilation, groups)
    return _torch_forward(x, weight, sim, list(stride), list(padding), list(dilation), groups)


@torch.library.custom_op("nsl::dynamic_ns_conv2d_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def dynamic_ns_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, sim: Tensor, stride: Sequence[int],
                               padding: Sequence[int], dilation: Sequence[int], groups: int, need_dx: bool,
                               need_dweight: bool, need_dsim: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dsim)`` of :func:`dynamic_ns_conv2d` for ``grad_out = dL/dout``; a gradient
    not asked for is an empty tensor. Default implementation: the PyTorch ``unfold`` math."""
    if _cpp_loaded_now(x):
        return torch.ops.nsl.dynamic_ns_conv2d_backward(grad_out, x, weight, sim, stride, padding, dilation, groups,
                                                        need_dx, need_dweight, need_dsim)
    grads = _torch_backward(grad_out.contiguous(), x, weight, sim, list(stride), list(padding), list(dilation),
                            groups, (need_dx, need_dweight, need_dsim))
    return _fill(grads, x)


def _fill(grads, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Replace the gradients not computed (None) by empty tensors (an operator cannot return None)."""
    return tuple(x.new_empty(0) if g is None else g for g in grads)


# ---- CPU: the fused C++ kernel, registered from C++ (csrc/dynamic_ns_conv.cpp) once loaded ----------
def _cpp_loaded_now(x: Tensor) -> bool:
    """True when ``x`` is a CPU tensor and this call has just loaded the C++ kernel.

    The C++ library registers the operators' CPU kernels with the dispatcher when it is loaded
    (``TORCH_LIBRARY_IMPL(nsl, CPU, m)``); until then, and wherever it cannot be built, CPU tensors
    reach the default implementations above, which load it on the first call (compiling on first
    use) and then call the operator again, now dispatched to C++. Once loaded, CPU calls never come
    back here; if it cannot be loaded, the PyTorch ``unfold`` math runs."""
    if x.device.type != "cpu":
        return False
    from . import _cpp

    first = not _cpp._tried
    return _cpp.is_available() and first


# ---- CUDA: the Triton kernels --------------------------------------------------------------
@dynamic_ns_conv2d.register_kernel("cuda")
def _forward_cuda(x, weight, sim, stride, padding, dilation, groups):
    if kernel_for(x.device, x.dtype) != "triton":
        return _torch_forward(x, weight, sim, list(stride), list(padding), list(dilation), groups)
    from . import _triton

    return _triton.forward(x.contiguous(), weight.contiguous(), sim.contiguous(), tuple(stride), tuple(padding),
                           tuple(dilation), groups)


@dynamic_ns_conv2d_backward.register_kernel("cuda")
def _backward_cuda(grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dweight, need_dsim):
    needs = (need_dx, need_dweight, need_dsim)
    if kernel_for(x.device, x.dtype) != "triton":
        return _fill(_torch_backward(grad_out.contiguous(), x, weight, sim, list(stride), list(padding),
                                     list(dilation), groups, needs), x)
    from . import _triton

    grads = _triton.backward(grad_out.contiguous(), x.contiguous(), weight.contiguous(), sim.contiguous(),
                             tuple(stride), tuple(padding), tuple(dilation), groups, *needs)
    return _fill(grads, x)


# ---- shapes (FakeTensor / meta) ------------------------------------------------------------
@dynamic_ns_conv2d.register_fake
def _forward_fake(x, weight, sim, stride, padding, dilation, groups):
    oh, ow = check_shapes(x, weight, sim, stride, padding, dilation, groups)
    return x.new_empty(x.shape[0], weight.shape[0], oh, ow)


@dynamic_ns_conv2d_backward.register_fake
def _backward_fake(grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dweight, need_dsim):
    check_shapes(x, weight, sim, stride, padding, dilation, groups)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
                 for t, need in ((x, need_dx), (weight, need_dweight), (sim, need_dsim)))


# ---- autograd ------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, sim, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, sim)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad_out):
    x, weight, sim = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if not any(needs):
        return None, None, None, None, None, None, None
    grads = torch.ops.nsl.dynamic_ns_conv2d_backward(grad_out, x, weight, sim, *ctx.conv_args, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


dynamic_ns_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_backward(ctx, inputs, output):
    grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dweight, need_dsim = inputs
    ctx.save_for_backward(grad_out, x, weight, sim)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.computed = (need_dx, need_dweight, need_dsim)


def _backward_backward(ctx, u_x, u_w, u_s):
    """Derivatives of :func:`dynamic_ns_conv2d_backward`, by the operators themselves (any order):
    :func:`nsl._func.backward_of_backward` (the op is linear in each of x, weight, sim)."""
    grads = _func.backward_of_backward(torch.ops.nsl.dynamic_ns_conv2d, torch.ops.nsl.dynamic_ns_conv2d_backward,
                                       ctx.saved_tensors, ctx.conv_args, ctx.computed, (u_x, u_w, u_s),
                                       ctx.needs_input_grad[:4])
    return (*grads, None, None, None, None, None, None, None)


dynamic_ns_conv2d_backward.register_autograd(_backward_backward, setup_context=_setup_context_backward)

# vmap of a direct operator call, and batched gradients through register_autograd, by the fused kernels
# (where torch.library.register_vmap exists; elsewhere PyTorch's per-sample fallback). grad/jvp: FUNCTIONS.
_func.register_vmap_rules(torch.ops.nsl.dynamic_ns_conv2d.default, torch.ops.nsl.dynamic_ns_conv2d_backward.default)


# ---- autocast ------------------------------------------------------------------------------
#: Device types whose autocast state ``ns_conv2d`` reads (``torch.is_autocast_enabled(device_type)``).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def autocast_enabled(device_type: str) -> bool:
    """True when ``torch.autocast(device_type)`` is in force (False for device types without autocast)."""
    return device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type)


def autocast_inputs(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The autocast rule: each floating tensor on ``device_type`` except float64 cast to the autocast
    dtype in force now (``torch.get_autocast_dtype``); float64, other tensors and None unchanged."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible and t.device.type == device_type else t

    return tuple(cast(t) for t in tensors)


def _register_autocast(device_type: str) -> None:
    """The operator's ``Autocast<Device>`` kernel: :func:`autocast_inputs`, then the operator with autocast off.

    Public API only: ``Library.impl`` under the dispatch key's name, and ``torch.autocast(enabled=False)``,
    which excludes that key for the call (autocast's on/off state *is* the key's exclusion)."""
    op = torch.ops.nsl.dynamic_ns_conv2d.default

    def kernel(x, weight, sim, stride, padding, dilation, groups):
        x, weight, sim = autocast_inputs(device_type, x, weight, sim)
        with torch.autocast(device_type, enabled=False):
            return op(x, weight, sim, stride, padding, dilation, groups)

    _AUTOCAST_LIB.impl("dynamic_ns_conv2d", kernel, {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type])


_AUTOCAST_LIB = torch.library.Library("nsl", "FRAGMENT")
for _device in ("cpu", "cuda"):
    _register_autocast(_device)


# --------------------------------------------------------------------------------------------
# Triton on CPU tensors (TRITON_INTERPRET=1): not the registered op, whose CPU kernel is the C++ one
# --------------------------------------------------------------------------------------------
class _TritonFn(torch.autograd.Function):
    """Autograd glue calling :mod:`nsl._triton` directly (saves only x, weight and sim); used by the
    ``'triton'`` backend on CPU tensors under the Triton interpreter, and equal to the operator.

    Double backward: under ``create_graph=True`` the backward is the differentiable PyTorch
    reference vector-Jacobian product (:func:`nsl._torch_kernels.linear_vjp`), not the kernels."""

    @staticmethod
    def forward(ctx, x, weight, sim, stride, padding, dilation, groups):
        from . import _triton

        ctx.save_for_backward(x, weight, sim)
        ctx.conv_args = (stride, padding, dilation, groups)
        return _triton.forward(x, weight, sim, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        from . import _triton

        x, weight, sim = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: exact differentiable path (PyTorch reference math)
            stride, padding, dilation, groups = ctx.conv_args

            def fn(a, b, c):
                return _torch_reference(a, b, c, stride, padding, dilation, groups)

            return (*linear_vjp(fn, grad_out, (x, weight, sim), ctx.needs_input_grad[:3]), None, None, None, None)
        grads = _triton.backward(grad_out.contiguous(), x, weight, sim, *ctx.conv_args, *ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def triton_dynamic_ns_conv2d(x: Tensor, weight: Tensor, sim: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """:func:`dynamic_ns_conv2d` computed by the Triton kernels on any device they run on (CUDA, or CPU
    tensors under ``TRITON_INTERPRET=1``), bypassing the operator's per-device dispatch."""
    return _TritonFn.apply(x.contiguous(), weight.contiguous(), sim.contiguous(), pair(stride, "stride"),
                           pair(padding, "padding"), pair(dilation, "dilation"), int(groups))


# --------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD: the pairs as autograd Functions (nsl._func)
# --------------------------------------------------------------------------------------------
def _formulation_pair(name: str, forward_math, backward_math) -> _func.ConvPair:
    """A pure-PyTorch formulation of :mod:`nsl._torch_kernels` as a pair in the operator's convention."""

    def forward(x, weight, sim, stride, padding, dilation, groups):
        return _padded_forward(forward_math, x, weight, sim, list(stride), list(padding), list(dilation), groups)

    def backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_x, need_weight, need_sim):
        return _fill(_padded_backward(backward_math, grad_out.contiguous(), x, weight, sim, list(stride),
                                      list(padding), list(dilation), groups, (need_x, need_weight, need_sim)), x)

    return _func.ConvPair(name, forward, backward)


def _triton_pair() -> _func.ConvPair:
    """The Triton kernels called directly (CPU tensors under ``TRITON_INTERPRET=1``; see :class:`_TritonFn`)."""

    def forward(x, weight, sim, stride, padding, dilation, groups):
        from . import _triton

        return _triton.forward(x.contiguous(), weight.contiguous(), sim.contiguous(), tuple(stride), tuple(padding),
                               tuple(dilation), groups)

    def backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_x, need_weight, need_sim):
        from . import _triton

        return _fill(_triton.backward(grad_out.contiguous(), x.contiguous(), weight.contiguous(), sim.contiguous(),
                                      tuple(stride), tuple(padding), tuple(dilation), groups, need_x, need_weight,
                                      need_sim), x)

    return _func.ConvPair("nsl.triton", forward, backward)


#: The autograd Functions (``setup_context``, ``jvp``, ``vmap``; :func:`nsl._func.make_function`) that run
#: under ``torch.func`` transforms and forward-mode AD, one per forward/backward pair, all in the operator's
#: calling convention ``Function.apply(x, weight, sim, stride, padding, dilation, groups)``:
#: ``'op'``: the registered operators (so the fused C++ / Triton kernels, or the ``unfold`` fallback, do the
#: work, as outside transforms); ``'unfold'``, ``'ztrick'``: those backends' math; ``'triton'``: the Triton
#: kernels called directly (the ``'triton'`` backend on CPU tensors). A new operator pair gets the same
#: treatment with one ``_func.make_function(_func.ConvPair(name, forward_op, backward_op))``.
FUNCTIONS = {
    "op": _func.make_function(_func.ConvPair("nsl.dynamic_ns_conv2d", torch.ops.nsl.dynamic_ns_conv2d.default,
                                             torch.ops.nsl.dynamic_ns_conv2d_backward.default)),
    "unfold": _func.make_function(_formulation_pair("nsl.unfold", _unfold_forward, _unfold_backward)),
    "ztrick": _func.make_function(_formulation_pair("nsl.ztrick", _ztrick_forward, _ztrick_backward)),
    "triton": _func.make_function(_triton_pair()),
}


def call(pair: str, x: Tensor, weight: Tensor, sim: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """``out = f(x, W, M)`` by the pair ``pair`` (``'op'`` or ``'triton'``; see :data:`FUNCTIONS`) as
    :func:`nsl.functional.ns_conv2d` calls it (arguments as the operator's, symmetric ``padding`` pairs).

    Outside ``torch.func`` transforms and forward-mode AD: the operator ``torch.ops.nsl.dynamic_ns_conv2d``
    itself (what ``torch.compile`` and ``torch.export`` graphs contain; its ``register_autograd`` gives
    gradients of any order), or :class:`_TritonFn` for ``'triton'``. Inside them
    (:func:`nsl._func.transforms_active`): ``FUNCTIONS[pair]``, the same kernels with vmap and jvp rules.
    """
    if _func.transforms_active():
        return FUNCTIONS[pair].apply(x, weight, sim, list(stride), list(padding), list(dilation), groups)
    if pair == "triton":
        return triton_dynamic_ns_conv2d(x, weight, sim, stride, padding, dilation, groups)
    return torch.ops.nsl.dynamic_ns_conv2d(x, weight, sim, stride, padding, dilation, groups)
