"""The pure-PyTorch math of dynamic similarity: the ``reference``, ``unfold`` and ``ztrick`` formulations.

Shapes and names as in :mod:`nsl.functional` (``P = kh * kw``, positions row-major ``q = i * kw + j``);
every function here takes an already *padded* input ``xpad [N, C_in, Hp, Wp]`` and its
:class:`nsl._geometry.ConvGeometry` ``geometry = (kh, kw, (sh, sw), (dh, dw), (H_out, W_out))``::

    out[n, o](y) = sum_{c in group(o), p, q} W[o, c, p] M[n, p, q](y) xpad[n, c, y * s + d * (i_q, j_q)]

(diagonal ``M = diag(m)``, ``sim [N, P, H_out, W_out]``; full ``sim [N, P, P, H_out, W_out]``).
Imported by :mod:`nsl.functional` (the backends) and :mod:`nsl._ops` (the operators' default
kernels); it imports neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the elements of one chunk's column tensor in the pure-PyTorch lean backends.
_CHUNK_ELEMENTS = 1 << 23


def _window(t: Tensor, i: int, j: int, geometry) -> Tensor:
    """The ``[..., H_out, W_out]`` view of ``t`` read by kernel position ``(i, j)``."""
    _, _, (sh, sw), (dh, dw), (oh, ow) = geometry
    return t[..., i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]


def _columns(xpad: Tensor, geometry) -> Tensor:
    """Shifted views of a padded input stacked by position: ``[N, C, P, H_out, W_out]``."""
    kh, kw = geometry[0], geometry[1]
    return torch.stack([_window(xpad, i, j, geometry) for i in range(kh) for j in range(kw)], dim=2)


def _mix(cols: Tensor, sim: Tensor) -> Tensor:
    """Apply ``M(y)`` to columns ``[n, G, Cg, P, L]``: diagonal ``m_q * col_q``, full ``sum_q M[p, q] col_q``."""
    if sim.dim() == 3:  # [n, P, L]
        return cols * sim[:, None, None]
    return torch.einsum("npql,ngcql->ngcpl", sim, cols)


def _reference(xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry) -> Tensor:
    """Explicit evaluation: columns, mix with M(y), contract with w. Plain autograd."""
    n = xpad.shape[0]
    out_c, cg, kh, kw = weight.shape
    oh, ow = geometry[4]
    cols = _columns(xpad, geometry).reshape(n, groups, cg, kh * kw, oh * ow)
    mixed = _mix(cols, sim.reshape(n, *sim.shape[1:-2], oh * ow))
    w = weight.reshape(groups, out_c // groups, cg * kh * kw)
    out = torch.matmul(w, mixed.reshape(n, groups, cg * kh * kw, oh * ow))
    return out.reshape(n, out_c, oh, ow)


def linear_vjp(fn, grad: Tensor, inputs, needs) -> list[Tensor | None]:
    """Differentiable vector-Jacobian product of ``out = fn(a, b, c, ...)``, linear in each input separately.

    For every input ``k`` with ``needs[k]``: ``d<grad, fn(...)>/d input_k``, computed by autograd
    through ``fn`` with input ``k`` replaced by a zero leaf (the derivative of a function linear in
    that input does not depend on its value) and ``create_graph=True``, so the result carries a graph
    to ``grad`` and the other inputs: derivatives of any order. ``None`` where ``needs[k]`` is False.

    The double-backward path of the pure-PyTorch autograd Functions (:class:`_UnfoldFn`,
    :class:`_ZTrickFn`, ``nsl._ops._TritonFn``): when their backward runs with grad mode on
    (``create_graph=True``) they call this with ``fn`` = :func:`_reference` (exact, plain autograd)
    instead of their memory-lean, non-differentiable backward.
    """
    grads: list[Tensor | None] = []
    for k, need in enumerate(needs):
        if not need:
            grads.append(None)
            continue
        args = list(inputs)
        args[k] = torch.zeros_like(inputs[k]).requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(*args), args[k], grad, create_graph=True)
        grads.append(g)
    return grads


def _chunks(n: int, per_sample: int) -> list[slice]:
    """Slices of the batch ``n`` whose column tensors hold at most about ``_CHUNK_ELEMENTS`` elements; one slice
    for a symbolic batch (``torch.export`` / ``torch.compile`` with a dynamic batch), so that no guard is put on it."""
    if not isinstance(n, int):
        return [slice(None)]
    step = max(1, min(n, _CHUNK_ELEMENTS // max(1, per_sample)))
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


def _unfold_forward(xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry) -> Tensor:
    """The unfold formulation's forward on a padded input: columns per chunk of samples, one matmul."""
    n = xpad.shape[0]
    out_c, cg, kh, kw = weight.shape
    oh, ow = geometry[4]
    w = weight.reshape(groups, out_c // groups, cg * kh * kw)
    out = xpad.new_empty(n, out_c, oh, ow)
    for s in _chunks(n, xpad.shape[1] * kh * kw * oh * ow * (2 if sim.dim() == 5 else 1)):
        mixed, _ = _chunk_columns(xpad[s], sim[s], groups, geometry)
        out[s] = torch.matmul(w, mixed).reshape(-1, out_c, oh, ow)
    return out


def _unfold_backward(grad: Tensor, xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry, needs):
    """``(dxpad, dweight, dsim)`` of :func:`_unfold_forward` (None where ``needs`` is False);
    rebuilds the columns per chunk instead of keeping them."""
    need_x, need_w, need_m = needs
    n = xpad.shape[0]
    out_c, cg, kh, kw = weight.shape
    oh, ow = geometry[4]
    P = kh * kw
    w = weight.reshape(groups, out_c // groups, cg * P)
    dx = torch.zeros_like(xpad) if need_x else None
    dw = torch.zeros_like(w) if need_w else None
    dm = torch.empty_like(sim) if need_m else None
    grad = grad.contiguous()
    for s in _chunks(n, xpad.shape[1] * P * oh * ow * 3):
        g = grad[s].reshape(-1, groups, out_c // groups, oh * ow)
        mixed, cols = _chunk_columns(xpad[s], sim[s], groups, geometry)
        if need_w:
            dw += torch.matmul(g, mixed.transpose(-1, -2)).sum(0)
        del mixed
        if not (need_x or need_m):
            continue
        h = torch.matmul(w.transpose(-1, -2), g).reshape(-1, groups, cg, P, oh * ow)
        m = sim[s].reshape(-1, *sim.shape[1:-2], oh * ow)
        if need_m:
            if sim.dim() == 4:
                dm[s] = (h * cols).sum((1, 2)).reshape(dm[s].shape)
            else:
                dm[s] = torch.einsum("ngcpl,ngcql->npql", h, cols).reshape(dm[s].shape)
        if need_x:
            dcols = h * m[:, None, None] if sim.dim() == 4 else torch.einsum("npql,ngcpl->ngcql", m, h)
            dcols = dcols.reshape(-1, xpad.shape[1], P, oh, ow)
            dxs = dx[s]
            for q in range(P):
                _window(dxs, q // kw, q % kw, geometry).add_(dcols[:, :, q])
    return dx, (dw.reshape(weight.shape) if need_w else None), dm


def _reference_vjp(grad, xpad, weight, sim, groups, geometry, needs) -> list[Tensor | None]:
    """``(dxpad, dweight, dsim)`` of :func:`_reference` for ``grad`` with a graph (derivatives of any order)."""
    return linear_vjp(lambda a, b, c: _reference(a, b, c, groups, geometry), grad, (xpad, weight, sim), needs)


class _UnfoldFn(torch.autograd.Function):
    """Columns per chunk of samples; saves only (x, w, M) and rebuilds columns in backward.

    Double backward: under ``create_graph=True`` the backward is :func:`_reference_vjp` (differentiable)."""

    @staticmethod
    def forward(ctx, xpad, weight, sim, groups, geometry):
        ctx.save_for_backward(xpad, weight, sim)
        ctx.groups, ctx.geometry = groups, geometry
        return _unfold_forward(xpad, weight, sim, groups, geometry)

    @staticmethod
    def backward(ctx, grad):
        xpad, weight, sim = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the differentiable path (see linear_vjp)
            return (*_reference_vjp(grad, xpad, weight, sim, ctx.groups, ctx.geometry, ctx.needs_input_grad[:3]),
                    None, None)
        dx, dw, dm = _unfold_backward(grad, xpad, weight, sim, ctx.groups, ctx.geometry, ctx.needs_input_grad[:3])
        return dx, dw, dm, None, None


def _chunk_columns(xpad, sim, groups, geometry):
    """Columns ``[n, G, Cg, P, L]`` and mixed columns ``[n, G, Cg * P, L]`` of a chunk of samples."""
    n, c = xpad.shape[:2]
    kh, kw = geometry[0], geometry[1]
    oh, ow = geometry[4]
    cols = _columns(xpad, geometry).reshape(n, groups, c // groups, kh * kw, oh * ow)
    mixed = _mix(cols, sim.reshape(n, *sim.shape[1:-2], oh * ow))
    return mixed.reshape(n, groups, -1, oh * ow), cols


def _ztrick_z(xpad, weight, groups):
    """``z_p = w_p^T xpad`` for every position ``p``: ``[N, G, P, C_out / G, Hp, Wp]``, and the 1x1 weight."""
    out_c, cg, kh, kw = weight.shape
    P = kh * kw
    og = out_c // groups
    wz = weight.reshape(groups, og, cg, P).permute(0, 3, 1, 2).reshape(groups * P * og, cg, 1, 1)
    z = F.conv2d(xpad, wz, groups=groups)
    return z.view(xpad.shape[0], groups, P, og, *xpad.shape[2:]), wz


def _ztrick_forward(xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry) -> Tensor:
    """The ztrick formulation's forward: ``out(y) = sum_{p,q} M[p, q](y) z_p(y * s + d * offset(q))``."""
    n = xpad.shape[0]
    out_c, _, kh, kw = weight.shape
    oh, ow = geometry[4]
    z, _ = _ztrick_z(xpad, weight, groups)
    out = xpad.new_zeros(n, groups, out_c // groups, oh, ow)
    for q in range(kh * kw):
        zq = _window(z, q // kw, q % kw, geometry)  # [n, G, P, Og, oh, ow]
        if sim.dim() == 4:
            out += zq[:, :, q] * sim[:, None, None, q]
        else:
            out += torch.einsum("ngpohw,nphw->ngohw", zq, sim[:, :, q])
    return out.reshape(n, out_c, oh, ow)


def _ztrick_backward(grad: Tensor, xpad: Tensor, weight: Tensor, sim: Tensor, groups: int, geometry, needs):
    """``(dxpad, dweight, dsim)`` of :func:`_ztrick_forward` (None where ``needs`` is False); ``z`` recomputed."""
    need_x, need_w, need_m = needs
    n, c = xpad.shape[:2]
    out_c, cg, kh, kw = weight.shape
    P = kh * kw
    og = out_c // groups
    oh, ow = geometry[4]
    g = grad.reshape(n, groups, og, oh, ow)
    dm = None
    if need_m:
        z, _ = _ztrick_z(xpad, weight, groups)
        dm = torch.empty_like(sim)
        for q in range(P):
            zq = _window(z, q // kw, q % kw, geometry)
            if sim.dim() == 4:
                dm[:, q] = (zq[:, :, q] * g).sum((1, 2))
            else:
                dm[:, :, q] = torch.einsum("ngpohw,ngohw->nphw", zq, g)
        del z
    dx = dw = None
    if need_x or need_w:
        dz = xpad.new_zeros(n, groups, P, og, *xpad.shape[2:])
        for q in range(P):
            target = _window(dz, q // kw, q % kw, geometry)
            if sim.dim() == 4:
                target[:, :, q] += g * sim[:, None, None, q]
            else:
                target += g[:, :, None] * sim[:, None, :, q, None]
        hw = xpad.shape[2] * xpad.shape[3]
        dz = dz.reshape(n, groups, P * og, hw)
        if need_x:
            wz = weight.reshape(groups, og, cg, P).permute(0, 3, 1, 2).reshape(groups, P * og, cg)
            dx = torch.matmul(wz.transpose(1, 2), dz).reshape_as(xpad)
        if need_w:
            dwz = torch.matmul(dz, xpad.reshape(n, groups, cg, hw).transpose(-1, -2)).sum(0)
            dw = dwz.reshape(groups, P, og, cg).permute(0, 2, 3, 1).reshape(weight.shape)
    return dx, dw, dm


class _ZTrickFn(torch.autograd.Function):
    """``z_p = w_p^T x`` as one 1x1 convolution, then shifted sums mixed by ``M(y)`` (:func:`_ztrick_forward`).

    Saves only (x, w, M); ``z`` is recomputed in backward (:func:`_ztrick_backward`). Double backward: under
    ``create_graph=True`` the backward is :func:`_reference_vjp` (differentiable).
    """

    @staticmethod
    def forward(ctx, xpad, weight, sim, groups, geometry):
        ctx.save_for_backward(xpad, weight, sim)
        ctx.groups, ctx.geometry = groups, geometry
        return _ztrick_forward(xpad, weight, sim, groups, geometry)

    @staticmethod
    def backward(ctx, grad):
        xpad, weight, sim = ctx.saved_tensors
        groups, geometry = ctx.groups, ctx.geometry
        if torch.is_grad_enabled():  # create_graph=True: the differentiable path (see linear_vjp)
            return (*_reference_vjp(grad, xpad, weight, sim, groups, geometry, ctx.needs_input_grad[:3]), None, None)
        return (*_ztrick_backward(grad, xpad, weight, sim, groups, geometry, ctx.needs_input_grad[:3]), None, None)
