"""torch.func support: a dynamic similarity convolution's forward/backward pair as an ``autograd.Function``.

``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``,
``functional_call`` inside them) and forward-mode AD cannot go through an operator's
``register_autograd`` (PyTorch builds that ``autograd.Function`` without ``setup_context``, so the
transforms raise, and forward AD silently drops the tangent). :func:`make_function` wraps a pair
of callables in the operator's calling convention::

    forward(x, weight, sim, stride, padding, dilation, groups) -> out
    backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_x, need_weight, need_sim)
        -> (dx, dweight, dsim)        (a gradient not asked for: an empty tensor, numel() == 0)

with the shapes of :mod:`nsl._ops` (``x [N, C_in, H, W]``, ``weight [C_out, C_in / groups, kh, kw]``,
``sim [N, P, H_out, W_out]`` or ``[N, P, P, H_out, W_out]``, ``out [N, C_out, H_out, W_out]``) into
an ``autograd.Function`` with ``setup_context``, a ``jvp`` rule and a ``vmap`` rule, whose backward
is a second such Function around ``backward`` (so gradients of any order, and every transform of
them, run the same pair). Everything is computed by the pair's own calls, e.g. the registered
operators ``torch.ops.nsl.dynamic_ns_conv2d`` / ``..._backward`` (fused C++ / Triton kernels).

The rules rest on one fact: ``out = f(x, W, M)`` is linear in each of ``x``, ``W``, ``M`` separately.

* jvp: ``df = f(dx, W, M) + f(x, dW, M) + f(x, W, dM)`` (one call per input with a tangent); the
  backward ``(dx, dW, dM) = (B_x(g, W, M), B_W(g, x, M), B_M(g, x, W))`` is linear in each of its
  four inputs likewise, and ``B_x`` does not depend on ``x`` (nor ``B_W`` on ``W``, ``B_M`` on ``M``).
* backward of the backward: :func:`backward_of_backward` (adjoints by the same identity).
* vmap (a vmapped dimension ``B`` over any of the inputs), one strategy per output, fewest calls first:
  ``'fold-batch'``: ``[B, N, ...] -> [B * N, ...]`` (unbatched inputs expanded over ``B``), valid for
  the per-sample results ``out``, ``dx``, ``dM`` when ``W`` is not batched; ``'fold-groups'``: ``B`` folded
  into the channel groups (``x [N, B * C_in, H, W]``, ``W [B * C_out, C_in / groups, kh, kw]``,
  ``groups * B``), valid for ``out``, ``dx``, ``dW`` when ``M`` is not batched (it is shared by all
  channels); ``'loop'``: one call per slice ``b`` (a batched ``W`` and ``M`` together, e.g. a vmap over
  tasks' parameters, and per-sample weight gradients ``dW`` when ``M`` is predicted per sample: each
  sample's ``dW`` is a sum of its own); a result whose inputs are all unbatched is computed once.
  Every strategy calls the pair: no eager transform falls back to other math (``torch.compile`` of a
  transform does: :func:`compiled_transform`).

:func:`transforms_active` tells when the Function is needed; outside transforms the operator is
called directly, so ``torch.compile`` and ``torch.export`` graphs contain the operator itself.
Imports nothing from ``nsl``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

__all__ = ["ConvPair", "make_function", "transforms_active", "compiled_transform", "backward_of_backward",
           "vmap_forward", "vmap_backward", "register_vmap_rules"]


# Dynamo evaluates torch._C._are_functorch_transforms_active at trace time from torch 2.5 on (pytorch#134889);
# older Dynamo cannot trace it (a graph break in every compiled dynamic layer), so there it is not asked.
_DYNAMO_READS_FUNCTORCH_STATE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _functorch_active() -> bool:
    """``torch._C._are_functorch_transforms_active()`` (what ``torch.autograd.Function.apply`` itself asks;
    torch.compile reads it as a constant), False under torch.compile where Dynamo cannot read it (torch < 2.5)."""
    if not _DYNAMO_READS_FUNCTORCH_STATE and _compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def transforms_active() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ``jacrev``, ...) or a forward-AD
    ``dual_level`` (``forward_ad._current_level`` is ``-1`` outside it): where an operator's
    ``register_autograd`` does not work and the Function must be used."""
    return _functorch_active() or _forward_ad._current_level >= 0


def compiled_transform() -> bool:
    """True while ``torch.compile`` traces code inside a ``torch.func`` transform (``torch.compile(vmap(grad(f)))``):
    Dynamo cannot trace an ``autograd.Function``'s vmap/jvp rules there, so callers fall back to plain PyTorch ops."""
    return _compiling() and _functorch_active()


class ConvPair(NamedTuple):
    """A dynamic similarity convolution as a forward/backward pair in the operator's calling convention
    (module docstring); ``name`` names the Functions built from it (``'nsl.dynamic_ns_conv2d'``)."""

    name: str
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]


def backward_of_backward(forward, backward, tensors, conv_args, computed, cotangents, needs):
    """Adjoints of the backward ``(dx, dW, dM) = backward(g, x, W, M)`` for cotangents ``(u_x, u_W, u_M)``.

    ``forward``/``backward``: callables in the operator's convention (the operators, or a
    :func:`make_function` pair's Functions); ``tensors = (g, x, W, M)``; ``computed``: which of
    ``(dx, dW, dM)`` the backward computed; ``needs``: which of ``(g, x, W, M)`` want an adjoint.
    ``out = f(x, W, M)`` is linear in each input and the backward returns the adjoints of
    ``<g, f(x, W, M)>``, so::

        <u_x, dx> + <u_W, dW> + <u_M, dM> = <g, f(u_x, W, M) + f(x, u_W, M) + f(x, W, u_M)>

    whence ``d/dg = f(u_x, W, M) + f(x, u_W, M) + f(x, W, u_M)``, ``d/dx`` = the dx-parts of the
    backward at ``(g, ., u_W, M)`` and ``(g, ., W, u_M)``, and likewise for W and M. A gradient that
    was not computed, or whose cotangent is None or empty, contributes nothing. Returns
    ``[d/dg, d/dx, d/dW, d/dM]``, None where nothing contributes or nothing is needed.
    """
    g, x, weight, sim = tensors
    us = [u if (done and u is not None and u.numel()) else None for u, done in zip(cotangents, computed)]
    need_g, need_x, need_w, need_s = needs
    inputs = (x, weight, sim)
    dg = None
    if need_g:
        for k, u in enumerate(us):
            if u is not None:
                args = list(inputs)
                args[k] = u
                term = forward(*args, *conv_args)
                dg = term if dg is None else dg + term
    wanted = (need_x, need_w, need_s)
    grads = [None, None, None]
    for k, u in enumerate(us):  # backward at (g, inputs with input k replaced by u)
        part_needs = [wanted[j] and j != k for j in range(3)]
        if u is None or not any(part_needs):
            continue
        args = list(inputs)
        args[k] = u
        parts = backward(g, *args, *conv_args, *part_needs)
        for j in range(3):
            if part_needs[j]:
                grads[j] = parts[j] if grads[j] is None else grads[j] + parts[j]
    return [dg, *grads]


# ---- vmap: batch layouts ----------------------------------------------------------------------
def _front(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dimension first (``[B, ...]``); an unbatched ``t`` expanded over ``B`` (a view)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _into_batch(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``[B, N, ...] -> [B * N, ...]`` (``'fold-batch'``)."""
    t = _front(t, bdim, size)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _out_of_batch(t: Tensor, size: int, n: int) -> Tensor:
    """``[B * N, ...] -> [B, N, ...]``."""
    return t.reshape(size, n, *t.shape[1:])


def _into_channels(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``[B, N, C, ...] -> [N, B * C, ...]`` (``'fold-groups'``: ``b`` is channel block ``b``)."""
    t = _front(t, bdim, size).movedim(0, 1)
    return t.reshape(t.shape[0], size * t.shape[2], *t.shape[3:])


def _out_of_channels(t: Tensor, size: int, c: int) -> Tensor:
    """``[N, B * C, ...] -> [B, N, C, ...]``."""
    return t.reshape(t.shape[0], size, c, *t.shape[2:]).movedim(1, 0)


def _per_slice(t: Tensor, bdim: int | None, axis: int) -> int:
    """The size of axis ``axis`` of one slice of ``t`` (``t`` without its vmapped dimension ``bdim``)."""
    return t.shape[axis + (bdim is not None and bdim <= axis)]


def _into_filters(t: Tensor, bdim: int | None, size: int) -> Tensor:
    """``[B, C_out, ...] -> [B * C_out, ...]`` (the weight, ``'fold-groups'``)."""
    t = _front(t, bdim, size)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _slice(t: Tensor, bdim: int | None, b: int) -> Tensor:
    return t if bdim is None else t.select(bdim, b)


def _loop(fn, size: int, tensors, dims, *args):
    """``fn`` on each slice ``b`` of the batched ``tensors`` (``'loop'``): the list of results."""
    return [fn(*(_slice(t, d, b) for t, d in zip(tensors, dims)), *args) for b in range(size)]


def _no_slices(t: Tensor, bdim: int | None, shape=None) -> Tensor:
    """A vmap over an empty dimension: zeros ``[0, *shape]`` (``shape``: that of a slice of ``t`` by default)."""
    if shape is None:
        shape = t.shape if bdim is None else t.movedim(bdim, 0).shape[1:]
    return t.new_zeros(0, *shape)


def _strategy(result: str, deps_batched: bool, weight_batched: bool, sim_batched: bool) -> str:
    """The vmap strategy of one result (``'out'``, ``'dx'``, ``'dweight'``, ``'dsim'``; module docstring):
    ``'plain'`` (no dependency batched), ``'fold-batch'``, ``'fold-groups'`` or ``'loop'``."""
    if not deps_batched:
        return "plain"
    if result != "dweight" and not weight_batched:  # per-sample results: B joins the batch N
        return "fold-batch"
    if result != "dsim" and not sim_batched:  # results per output/input channel: B joins the channel groups
        return "fold-groups"
    return "loop"


def vmap_forward(forward, info, in_dims, x, weight, sim, stride, padding, dilation, groups):
    """The vmap rule of ``out = forward(x, weight, sim, stride, padding, dilation, groups)`` (module docstring):
    ``(out, out_dim)``. ``forward``: a callable in the operator's convention (a Function's ``apply`` or the
    operator), called on unbatched tensors only; ``in_dims``: the vmapped dimension of each argument or None."""
    size = info.batch_size
    bx, bw, bs = in_dims[:3]
    if size == 0:  # out [N, C_out, H_out, W_out] per slice, H_out x W_out the similarity's last two sizes
        sizes = (_per_slice(x, bx, 0), _per_slice(weight, bw, 0), *sim.shape[-2:])
        return _no_slices(x, bx, sizes), 0
    how = _strategy("out", any(d is not None for d in in_dims[:3]), bw is not None, bs is not None)
    if how == "plain":
        return forward(x, weight, sim, stride, padding, dilation, groups), None
    if how == "fold-batch":
        out = forward(_into_batch(x, bx, size), weight, _into_batch(sim, bs, size), stride, padding, dilation, groups)
        return _out_of_batch(out, size, _per_slice(x, bx, 0)), 0
    if how == "fold-groups":
        out = forward(_into_channels(x, bx, size), _into_filters(weight, bw, size), sim, stride, padding, dilation,
                      groups * size)
        return _out_of_channels(out, size, _per_slice(weight, bw, 0)), 0
    return torch.stack(_loop(forward, size, (x, weight, sim), (bx, bw, bs), stride, padding, dilation, groups)), 0


def vmap_backward(backward, info, in_dims, grad_out, x, weight, sim, stride, padding, dilation, groups, need_x,
                  need_weight, need_sim):
    """The vmap rule of ``(dx, dW, dM) = backward(grad_out, x, weight, sim, ..., need_x, need_weight, need_sim)``:
    ``((dx, dW, dM), out_dims)``, one strategy per result (module docstring), one call per strategy used;
    a result not asked for is an empty tensor with out_dim None."""
    size = info.batch_size
    tensors, dims = (grad_out, x, weight, sim), tuple(in_dims[:4])
    bw, bs = dims[2], dims[3]
    if size == 0:  # each gradient has its input's shape per slice
        grads = [_no_slices(t, d) if need else x.new_empty(0) for t, d, need in
                 zip((x, weight, sim), dims[1:], (need_x, need_weight, need_sim))]
        return tuple(grads), tuple(0 if need else None for need in (need_x, need_weight, need_sim))
    depends = ((0, 2, 3), (0, 1, 3), (0, 1, 2))  # dx reads (g, W, M), dW (g, x, M), dM (g, x, W)
    plan: dict[str, list[int]] = {}
    for j, (name, need) in enumerate(zip(("dx", "dweight", "dsim"), (need_x, need_weight, need_sim))):
        if need:
            deps_batched = any(dims[i] is not None for i in depends[j])
            plan.setdefault(_strategy(name, deps_batched, bw is not None, bs is not None), []).append(j)
    results: list[Tensor | None] = [None, None, None]
    out_dims: list[int | None] = [None, None, None]
    conv = (stride, padding, dilation)
    for how, which in plan.items():
        needs = [j in which for j in range(3)]
        if how == "plain":  # no dependency batched: once (a batched input it does not read is sliced at 0)
            parts = backward(*(_slice(t, d, 0) for t, d in zip(tensors, dims)), *conv, groups, *needs)
            for j in which:
                results[j] = parts[j]
        elif how == "fold-batch":
            parts = backward(_into_batch(grad_out, dims[0], size), _into_batch(x, dims[1], size), weight,
                             _into_batch(sim, bs, size), *conv, groups, *needs)
            for j in which:
                results[j], out_dims[j] = _out_of_batch(parts[j], size, _per_slice(x, dims[1], 0)), 0
        elif how == "fold-groups":
            parts = backward(_into_channels(grad_out, dims[0], size), _into_channels(x, dims[1], size),
                             _into_filters(weight, bw, size), sim, *conv, groups * size, *needs)
            for j in which:  # dW [B * C_out, ...] -> [B, C_out, ...]; dx [N, B * C_in, ...] -> [B, N, C_in, ...]
                results[j] = (_out_of_batch(parts[j], size, _per_slice(weight, bw, 0)) if j == 1
                              else _out_of_channels(parts[j], size, _per_slice(x, dims[1], 1)))
                out_dims[j] = 0
        else:
            slices = _loop(backward, size, tensors, dims, *conv, groups, *needs)
            for j in which:
                results[j], out_dims[j] = torch.stack([part[j] for part in slices]), 0
    empty = x.new_empty(0)
    return tuple(empty if r is None else r for r in results), tuple(out_dims)


def register_vmap_rules(forward_op, backward_op) -> bool:
    """Register :func:`vmap_forward` / :func:`vmap_backward` as the vmap rules of the operators themselves
    (``torch.library.register_vmap``; False where this torch lacks it): ``torch.vmap`` of a direct
    operator call, and batched gradients through its ``register_autograd`` (``is_grads_batched``,
    ``autograd.functional.jacobian(vectorize=True)``), then run the fused kernels instead of PyTorch's
    per-sample fallback loop. Calls under ``grad``/``jvp`` go through :func:`make_function`'s Function."""
    register = getattr(torch.library, "register_vmap", None)
    if register is None:
        return False
    register(forward_op, functools.partial(vmap_forward, forward_op))
    register(backward_op, functools.partial(vmap_backward, backward_op))
    return True


def make_function(pair: ConvPair) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` of ``pair`` (module docstring): ``Function.apply(x, weight, sim, stride,
    padding, dilation, groups) -> out`` with ``setup_context``, ``jvp`` (sum of one call per tangent),
    ``vmap`` (:func:`vmap_forward`) and a backward that is a second Function of the same kind around
    ``pair.backward`` (attribute ``Function.backward_function``; its backward is :func:`backward_of_backward`,
    its jvp the backward at each tangent, its vmap :func:`vmap_backward`). Every call inside the rules is
    one of the two Functions, so the rules compose (``vmap(grad)``, ``jvp(grad)``, ``jacfwd(jacrev)``, ...)."""

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(x, weight, sim, stride, padding, dilation, groups):
            return pair.forward(x, weight, sim, stride, padding, dilation, groups)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, weight, sim, stride, padding, dilation, groups = inputs
            ctx.save_for_backward(x, weight, sim)
            ctx.save_for_forward(x, weight, sim)
            ctx.conv_args = (stride, padding, dilation, groups)

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, sim = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            if not any(needs):
                return None, None, None, None, None, None, None
            grads = Backward.apply(grad_out, x, weight, sim, *ctx.conv_args, *needs)
            return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)

        @staticmethod
        def jvp(ctx, x_t, weight_t, sim_t, *_):
            """``f(dx, W, M) + f(x, dW, M) + f(x, W, dM)`` over the inputs with a tangent."""
            tensors = ctx.saved_tensors
            out = None
            for k, tangent in enumerate((x_t, weight_t, sim_t)):
                if tangent is not None:
                    args = list(tensors)
                    args[k] = tangent
                    term = Forward.apply(*args, *ctx.conv_args)
                    out = term if out is None else out + term
            return out

        @staticmethod
        def vmap(info, in_dims, *args):
            return vmap_forward(Forward.apply, info, in_dims, *args)

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_x, need_weight, need_sim):
            return tuple(pair.backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_x,
                                       need_weight, need_sim))

        @staticmethod
        def setup_context(ctx, inputs, output):
            grad_out, x, weight, sim, stride, padding, dilation, groups, need_x, need_weight, need_sim = inputs
            ctx.save_for_backward(grad_out, x, weight, sim)
            ctx.save_for_forward(grad_out, x, weight, sim)
            ctx.conv_args = (stride, padding, dilation, groups)
            ctx.computed = (need_x, need_weight, need_sim)
            ctx.shapes = tuple(t.shape for t in output)

        @staticmethod
        def backward(ctx, u_x, u_weight, u_sim):
            grads = backward_of_backward(Forward.apply, Backward.apply, ctx.saved_tensors, ctx.conv_args,
                                         ctx.computed, (u_x, u_weight, u_sim), ctx.needs_input_grad[:4])
            return (*grads, None, None, None, None, None, None, None)

        @staticmethod
        def jvp(ctx, grad_t, x_t, weight_t, sim_t, *_):
            """The backward at each input's tangent in turn, skipping the result that input does not reach
            (``dx`` does not depend on ``x``, ``dW`` on ``W``, ``dM`` on ``M``); zeros where no tangent reaches."""
            tensors = ctx.saved_tensors
            totals: list[Tensor | None] = [None, None, None]
            for k, tangent in enumerate((grad_t, x_t, weight_t, sim_t)):
                needs = [done and j + 1 != k for j, done in enumerate(ctx.computed)]
                if tangent is None or not any(needs):
                    continue
                args = list(tensors)
                args[k] = tangent
                parts = Backward.apply(*args, *ctx.conv_args, *needs)
                for j in range(3):
                    if needs[j]:
                        totals[j] = parts[j] if totals[j] is None else totals[j] + parts[j]
            ref = tensors[0]
            return tuple(t if t is not None else ref.new_zeros(shape) if done else ref.new_empty(0)
                         for t, shape, done in zip(totals, ctx.shapes, ctx.computed))

        @staticmethod
        def vmap(info, in_dims, *args):
            return vmap_backward(Backward.apply, info, in_dims, *args)

    Forward.__name__ = Forward.__qualname__ = f"{pair.name}.Function"
    Backward.__name__ = Backward.__qualname__ = f"{pair.name}.BackwardFunction"
    Forward.backward_function = Backward
    return Forward
