"""Functional neural similarity: the math behind every NSL layer.

A convolution scores a filter ``w`` against an input patch ``x`` with ``w^T x``; neural similarity
(Liu et al., NeurIPS 2019) uses the bilinear form ``w^T M x``. For a ``kh x kw`` kernel with
``P = kh * kw`` positions numbered row-major (``q = i * kw + j``, ``offset(q) = (i, j)``, the
indexing of :func:`torch.nn.functional.conv2d`)::

    out[n, o, y] = bias[o] + sum_{c, p, q} w[o, c, p] * M[p, q](y)
                              * x[n, c, y * stride + dilation * offset(q) - padding]

``M[p, q]`` links kernel position ``p`` of the filter to input position ``q`` of the patch, and
``c`` runs over the input channels of ``o``'s group. ``M = I`` gives :func:`F.conv2d` exactly.

``M`` is static (one matrix for every location, learned as a parameter) or dynamic (predicted
per sample and output location). Static similarity is a reparametrised weight
``W'[o, c, q] = sum_p W[o, c, p] M[p, q]`` and costs one ordinary convolution. Dynamic
similarity runs on one of several backends that all compute the same numbers:

* ``"reference"``: explicit: gather the ``P`` shifted input views, mix them with ``M(y)``,
  contract with the weight; plain autograd; traceable, exportable, any dtype.
* ``"unfold"``: the same columns built chunk by chunk inside a custom autograd function that
  saves only ``x``, ``w`` and ``M`` and recomputes columns in backward (memory-lean).
* ``"ztrick"``: ``z_p = w_p^T x`` for every ``p`` as one 1x1 convolution to ``P * C_out``
  channels, then ``out(y) = sum_{p,q} M[p, q](y) z_p(y * stride + dilation * offset(q) - padding)``;
  it keeps ``P`` times the output instead of ``P`` times the input, so it wins when
  ``C_out < C_in`` (especially with full ``M``). Memory-lean backward as well.
* ``"cpp"``: the registered operator ``torch.ops.nsl.dynamic_ns_conv2d`` (see :mod:`nsl._ops`)
  on CPU: a fused C++ kernel that builds modulated column tiles in cache and feeds them to a GEMM,
  forward and backward; float32/float64 (bfloat16/float16 computed in float32 and cast back);
  compiled on first use.
* ``"triton"``: the same operator on CUDA, where its kernels are fused Triton implicit GEMMs
  (float32/bfloat16/float16, float32 accumulation); on CPU tensors under ``TRITON_INTERPRET=1``
  the Triton kernels run through the interpreter (tests), called directly.

``"auto"`` (the default) is the registered operator, the one dispatch point: it picks its kernel
itself (``cpp`` on CPU when the C++ kernel is available, ``triton`` on CUDA when
``nsl._triton.unavailable_reason(device)`` is None, else the ``unfold`` math, with one warning per
process on CUDA saying why; the table is :data:`nsl._ops.KERNELS`, :func:`nsl._ops.kernel_for` tells
which runs). Under ``torch.compile`` the compiled graph calls the operator (no graph break).
``"cpp"`` and ``"triton"`` are the operator too, but insist that kernel serves the tensors (an error
otherwise). ``torch.jit.trace`` and ONNX export get :mod:`nsl._export_math` under ``"auto"`` (the same
formula as a one-hot grouped conv, a mix with ``M`` and a 1x1 conv, in standard ops). The
pure-PyTorch formulations (``reference``, ``unfold``, ``ztrick``) are explicit choices. Select with
:func:`set_backend` or the :func:`use_backend` context manager.

Gradients of any order on every backend (``create_graph=True``: MAML, gradient penalties,
Hessian-vector products): the operator's backward is itself a differentiable operator (see
:mod:`nsl._ops`); the ``unfold`` and ``ztrick`` autograd Functions (and the Triton glue on CPU
tensors) keep their memory-lean backward for first-order gradients and, when a graph of the gradient
is asked for, compute it by the exact ``reference`` formula instead (``nsl._torch_kernels.linear_vjp``).

``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``) and
forward-mode AD work on every backend: inside them the operator backends and ``unfold``/``ztrick`` run
as :data:`nsl._ops.FUNCTIONS` (the same kernels as ``autograd.Function`` s with vmap and jvp rules,
:mod:`nsl._func`); ``reference`` and the export form are plain PyTorch ops. Under ``torch.compile`` of a
transform (``torch.compile(vmap(grad(f)))``) Dynamo cannot trace those Functions' rules, and the ``reference``
formula runs instead (same numbers).

Non-finite similarity: a zero-padded input entry is a real zero that ``M`` multiplies, so a NaN or
inf in ``M`` where the padding is read makes that output NaN (IEEE ``0 * NaN``), on every backend,
as ``F.conv2d`` does with a non-finite weight.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpp, _export_math, _func, _ops
from ._geometry import ConvGeometry, has_shape, output_size, pair
from ._torch_kernels import _reference, _UnfoldFn, _ZTrickFn

__all__ = [
    "ns_conv2d",
    "sphere_conv2d",
    "static_weight",
    "similarity_kind",
    "conv_output_size",
    "set_backend",
    "get_backend",
    "use_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "reference", "unfold", "ztrick", "cpp", "triton")

_state = threading.local()
_default_backend = "auto"


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------
def set_backend(name: str) -> None:
    """Set the process-wide backend for dynamic similarity (one of :data:`BACKENDS`)."""
    global _default_backend
    _default_backend = _check_backend(name)


def get_backend() -> str:
    """The backend in force in this thread (a :func:`use_backend` override, else the default)."""
    return getattr(_state, "backend", None) or _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting the dynamic-similarity backend in this thread.

    Example::

        with nsl.functional.use_backend("reference"):
            out = layer(x)
    """
    previous = getattr(_state, "backend", None)
    _state.backend = _check_backend(name)
    try:
        yield
    finally:
        _state.backend = previous


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


# --------------------------------------------------------------------------------------------
# argument checks (the geometry's rules: nsl._geometry)
# --------------------------------------------------------------------------------------------
def _resolve_padding(padding, kernel: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding as ``(top, bottom, left, right)`` for ints, pairs, ``'same'`` and ``'valid'``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in F.conv2d), got stride {stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_output_size(size: tuple[int, int], kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """Output ``(H_out, W_out)`` of a convolution over an ``(H, W)`` input (``F.conv2d``'s rule).

    ``H_out = floor((H + pad_top + pad_bottom - dilation * (kh - 1) - 1) / stride) + 1``.
    """
    kernel = pair(kernel_size, "kernel_size")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    return output_size(size, kernel, stride, _resolve_padding(padding, kernel, stride, dilation), dilation)


def similarity_kind(similarity: Tensor, positions: int) -> str:
    """Classify a similarity tensor by its shape, in the vocabulary of the layer kinds.

    Returns ``'static-diagonal'`` for ``[P]``, ``'static-full'`` for ``[P, P]``,
    ``'dynamic-diagonal'`` for ``[N, P, H_out, W_out]`` and ``'dynamic-full'`` for
    ``[N, P, P, H_out, W_out]``; raises :class:`ValueError` otherwise. Each value is the name of
    the layer kind of :data:`nsl.layers.LAYER_KINDS` whose ``M`` has this layout: its
    ``LAYER_KINDS[kind].similarity`` (``'diagonal'`` / ``'full'``) is what the layers call their
    ``similarity_kind``, and ``LAYER_KINDS[kind].dynamic`` tells static from dynamic.
    """
    P = positions
    for kind, layout in (("static-diagonal", (P,)), ("static-full", (P, P)),
                         ("dynamic-diagonal", (None, P, None, None)), ("dynamic-full", (None, P, P, None, None))):
        if has_shape(similarity, layout):  # rank first: the batch is never compared with P (no export guard)
            return kind
    raise ValueError(
        f"similarity has shape {list(similarity.shape)}; expected [P] or [P, P] (static) or [N, P, H_out, W_out] "
        f"or [N, P, P, H_out, W_out] (dynamic) with P = kh * kw = {P}"
    )


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_devices(tensors: dict[str, Tensor | None]) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"ns_conv2d: input, weight, similarity and bias must be on one device; got {listed}")


def _check_dtypes(tensors: dict[str, Tensor | None]) -> None:
    dtypes = {k: v.dtype for k, v in tensors.items() if v is not None}
    if not dtypes["input"].is_floating_point:
        raise TypeError(f"ns_conv2d: input must be a floating-point tensor, got {dtypes['input']}")
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k} {str(v).replace('torch.', '')}" for k, v in dtypes.items())
        raise TypeError(f"ns_conv2d: input, weight, similarity and bias must share one dtype; got {listed}")


# --------------------------------------------------------------------------------------------
# static similarity
# --------------------------------------------------------------------------------------------
def static_weight(weight: Tensor, similarity: Tensor) -> Tensor:
    """The convolution weight equal to a static similarity: ``W'[o, c, q] = sum_p W[o, c, p] M[p, q]``.

    Args:
        weight: ``[C_out, C_in / groups, kh, kw]``.
        similarity: ``[P]`` (diagonal ``M = diag(m)``, so ``W' = W * m``) or ``[P, P]`` (full).
    Returns:
        ``[C_out, C_in / groups, kh, kw]``, to be used with :func:`F.conv2d`.
    """
    out_c, in_c, kh, kw = weight.shape
    if similarity.dim() == 1:
        return weight * similarity.view(1, 1, kh, kw)
    return (weight.reshape(out_c, in_c, kh * kw) @ similarity).view(out_c, in_c, kh, kw)


# --------------------------------------------------------------------------------------------
# the public op
# --------------------------------------------------------------------------------------------
def ns_conv2d(input: Tensor, weight: Tensor, similarity: Tensor, bias: Tensor | None = None,
              stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Neural similarity convolution ``out = w^T M x`` over every patch.

    ``out[n, o, y] = bias[o] + sum_{c,p,q} w[o, c, p] M[p, q](y) x[n, c, y*stride + dilation*offset(q) - padding]``
    with positions row-major (``q = i * kw + j``, ``offset(q) = (i, j)``), so ``M = I`` gives
    :func:`F.conv2d` exactly.

    Args:
        input: ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``).
        weight: ``[C_out, C_in / groups, kh, kw]`` as in ``nn.Conv2d``; ``P = kh * kw``.
        similarity: ``[P]`` static diagonal, ``[P, P]`` static full, ``[N, P, H_out, W_out]``
            dynamic diagonal (DCNv2's mask layout), ``[N, P, P, H_out, W_out]`` dynamic full.
        bias: ``[C_out]`` or ``None``.
        stride, padding, dilation, groups: as in :func:`F.conv2d`; ``padding`` takes an int, a
            pair, ``'same'`` or ``'valid'`` (zero padding).
    Returns:
        ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]`` for unbatched input).

    Dynamic similarity runs on the backend chosen by :func:`use_backend` (module docstring); under
    autocast every floating tensor but float64 is cast to the autocast dtype and computed in it
    (:func:`nsl._ops.autocast_inputs`, the operator's rule). Padded input entries are zeros that
    ``M`` multiplies (IEEE): a NaN/inf in ``M`` at a position reading the padding gives NaN in
    that output and in the weight gradient (``0 * NaN``), like ``F.conv2d`` with a non-finite
    weight; identical on every backend.

    Example::

        >>> x = torch.randn(2, 8, 16, 16); w = torch.randn(4, 8, 3, 3)
        >>> m = torch.ones(2, 9, 16, 16)                   # dynamic diagonal, identity
        >>> torch.allclose(ns_conv2d(x, w, m, padding=1), F.conv2d(x, w, padding=1), atol=1e-5)
        True
    """
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    _check_tensor(similarity, "similarity")
    if bias is not None:
        _check_tensor(bias, "bias")
    if input.dim() == 3:
        single = similarity.dim() in (1, 2)
        sim = similarity if single else similarity.unsqueeze(0)
        return ns_conv2d(input.unsqueeze(0), weight, sim, bias, stride, padding, dilation, groups).squeeze(0)
    if input.dim() != 4:
        raise ValueError(f"ns_conv2d: expected input of shape [N, C_in, H, W] (4-D) or [C_in, H, W] (3-D), "
                         f"got shape {list(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"ns_conv2d: expected weight of shape [C_out, C_in / groups, kh, kw] (4-D), "
                         f"got shape {list(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    out_c, in_per_group, kh, kw = weight.shape
    if out_c % groups:
        raise ValueError(f"weight has C_out = {out_c} output channels, not divisible by groups = {groups}")
    if input.shape[1] != in_per_group * groups:
        raise ValueError(
            f"ns_conv2d: input has {input.shape[1]} channels but weight of shape {list(weight.shape)} with "
            f"groups = {groups} expects C_in = {in_per_group * groups} (input shape [N, "
            f"{in_per_group * groups}, H, W])"
        )
    if bias is not None and not has_shape(bias, (out_c,)):
        raise ValueError(f"bias must have shape [C_out] = [{out_c}], got {list(bias.shape)}")
    stride_, dilation_ = pair(stride, "stride"), pair(dilation, "dilation")
    if min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got stride {stride!r}, dilation {dilation!r}")
    pads = _resolve_padding(padding, (kh, kw), stride_, dilation_)
    P = kh * kw
    kind = similarity_kind(similarity, P)

    _check_devices({"input": input, "weight": weight, "similarity": similarity, "bias": bias})
    device_type = input.device.type
    if _ops.autocast_enabled(device_type):  # the operator's autocast rule (float64 is never cast), for every backend
        input, weight, similarity, bias = _ops.autocast_inputs(device_type, input, weight, similarity, bias)
        with torch.autocast(device_type, enabled=False):
            return ns_conv2d(input, weight, similarity, bias, stride, padding, dilation, groups)
    _check_dtypes({"input": input, "weight": weight, "similarity": similarity, "bias": bias})

    if kind.startswith("static"):
        return F.conv2d(input, static_weight(weight, similarity), bias, stride_,
                        padding if isinstance(padding, str) else (pads[0], pads[2]), dilation_, groups)

    n, _, h, w = input.shape
    out_h, out_w = output_size((h, w), (kh, kw), stride_, pads, dilation_)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input of spatial size {h}x{w} is too small for kernel {kh}x{kw} with padding "
                         f"{padding!r} and dilation {dilation_} (output would be {out_h}x{out_w})")
    expected = [n, P, out_h, out_w] if kind == "dynamic-diagonal" else [n, P, P, out_h, out_w]
    if not has_shape(similarity, expected):
        raise ValueError(f"dynamic similarity has shape {list(similarity.shape)}; expected {expected} "
                         f"([N, P{', P' if kind == 'dynamic-full' else ''}, H_out, W_out]) for input "
                         f"{list(input.shape)} and weight {list(weight.shape)}")
    out = _dynamic(input, weight, similarity, stride_, pads, dilation_, groups, (out_h, out_w))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


# --------------------------------------------------------------------------------------------
# dynamic similarity backends
# --------------------------------------------------------------------------------------------
def _choose(backend: str) -> str:
    """What runs: ``'op'`` (the registered operator, which picks its kernel: :func:`nsl._ops.kernel_for`)
    for ``'auto'``, ``'cpp'`` and ``'triton'``, except that ``'auto'`` under ``torch.jit.trace`` / ONNX export
    is ``'export'`` (the formula in standard Conv/Mul ops, :mod:`nsl._export_math`); otherwise the
    pure-PyTorch formulation named."""
    if backend == "auto":
        return "export" if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() else "op"
    return "op" if backend in _ops.KERNELS else backend


def _dynamic(x, weight, sim, stride, pads, dilation, groups, out_size) -> Tensor:
    named = get_backend()
    backend = _choose(named)
    if backend in ("op", "unfold", "ztrick") and _func.compiled_transform():
        # torch.compile of a torch.func transform: Dynamo cannot trace the Functions' vmap/jvp rules, so the
        # reference formula's plain ops run (same numbers; no warning: warnings.warn breaks a fullgraph trace)
        backend = "reference"
    if backend == "op":
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            _cpp.ensure_loaded()  # before the first CPU dispatch (see ensure_loaded: saves ~2 s)
        if named in _ops.KERNELS:  # an explicit 'cpp' / 'triton': that kernel must serve these tensors
            _ops.require(named, x)
        if pads[0] != pads[1] or pads[2] != pads[3]:
            x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
            pads = (0, 0, 0, 0)
        conv_args = (list(stride), [pads[0], pads[2]], list(dilation), groups)
        pair = "triton" if named == "triton" and x.device.type != "cuda" else "op"
        return _ops.call(pair, x, weight, sim, *conv_args)  # under torch.func: the op's autograd Function
    if any(pads):
        x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
    if backend in ("unfold", "ztrick") and _func.transforms_active():  # their Functions with vmap / jvp rules
        return _ops.FUNCTIONS[backend].apply(x, weight, sim, list(stride), [0, 0], list(dilation), groups)
    geometry = ConvGeometry(weight.shape[2], weight.shape[3], stride, dilation, out_size)
    if backend == "export":
        return _export_math.dynamic_ns_conv2d_export(x, weight, sim, groups, geometry)
    if backend == "reference":
        return _reference(x, weight, sim, groups, geometry)
    if backend == "unfold":
        return _UnfoldFn.apply(x, weight, sim, groups, geometry)
    return _ZTrickFn.apply(x, weight, sim, groups, geometry)


# --------------------------------------------------------------------------------------------
# SphereNet-normalised convolution
# --------------------------------------------------------------------------------------------
def sphere_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, normalize_weight: bool = False, eps: float = 1e-4) -> Tensor:
    """SphereNet-normalised convolution: the response divided by the input patch norm.

    ``out[o](y) = (w_o^T x_y) / (||x_y|| * ||w_o||^[normalize_weight]) + bias[o]`` with
    ``||x_y|| = sqrt(sum_{c, q} x[c](y*stride + dilation*offset(q) - padding)^2 + eps)`` over the
    patch of ``o``'s group (the authors' predictor normalisation, ``eps = 1e-4``), and
    ``||w_o|| = sqrt(sum_{c, q} w[o, c, q]^2 + eps)``. With ``normalize_weight`` the response is the
    cosine of the angle between filter and patch, in ``[-1, 1]`` up to ``eps``.

    Computed as ``conv(x, w / ||w||^[normalize_weight]) * rsqrt(box(sum_c x^2) + eps)``: the squared
    input is summed over each group's channels first and then box-filtered with the kernel's
    geometry (a sum pooling where the geometry allows, ``C_in / groups`` times fewer operations than
    convolving ``x^2`` with ones), the
    filter norm is applied to the weight rather than to the output, and the per-location factor
    broadcasts over the group's output channels (no copy).

    Args:
        input: ``[N, C_in, H, W]``; weight: ``[C_out, C_in / groups, kh, kw]``; bias: ``[C_out]``.
    Returns:
        ``[N, C_out, H_out, W_out]``.
    """
    _check_tensor(input, "input")
    _check_tensor(weight, "weight")
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"sphere_conv2d: expected 4-D input and weight, got input {list(input.shape)} "
                         f"and weight {list(weight.shape)}")
    if normalize_weight:
        weight = weight * torch.rsqrt(weight.pow(2).sum((1, 2, 3), keepdim=True) + eps)
    out = F.conv2d(input, weight, None, stride, padding, dilation, groups)
    n, c, h, w = input.shape
    sq = input * input
    sq = sq.sum(1, keepdim=True) if groups == 1 else sq.view(n, groups, c // groups, h, w).sum(2)  # [N, G, H, W]
    kh, kw = weight.shape[2], weight.shape[3]
    pads = (0, 0) if padding == "valid" else padding if isinstance(padding, str) else pair(padding, "padding")
    if (not isinstance(pads, str) and pair(dilation, "dilation") == (1, 1) and pads[0] <= kh // 2
            and pads[1] <= kw // 2):  # a box sum is a pooling (much faster than a 1-channel convolution)
        box = F.avg_pool2d(sq, (kh, kw), stride, pads, count_include_pad=True) * (kh * kw)  # (ONNX-exportable)
    else:
        box = F.conv2d(sq, weight.new_ones(groups, 1, kh, kw), None, stride, padding, dilation, groups)
    inv = torch.rsqrt(box + eps)  # [N, G, Ho, Wo]
    if groups == 1:
        out = out * inv
    else:
        o = out.shape[1]
        out = (out.view(n, groups, o // groups, *out.shape[2:]) * inv.unsqueeze(2)).view(out.shape)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
