"""The light predictor's math in PyTorch ops (differentiable): the reference of its fused kernels.

:func:`light_math` and :func:`light_backward_math` compute what the operators ``nsl::light_predictor`` and
``nsl::light_predictor_backward`` compute (formulas, arguments and shapes: :mod:`nsl._light_ops`). They are the
operators' default implementations, the differentiable double backward, and the float64 references of the tests;
the Triton launcher (:mod:`nsl._triton`) uses the norm helpers for the small maps it leaves to PyTorch. A module of
its own, below both :mod:`nsl._light_ops` and :mod:`nsl._triton`, so neither imports the other's dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORM_CODES", "light_math", "light_backward_math"]

#: The norms' codes in the operators' ``norm`` argument (``csrc/light_predictor.cpp`` ``NormMode``).
NORM_CODES = {"none": 0, "running": 1, "batch": 2, "group": 3}


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm_forward(a: Tensor, norm: int, groups: int, eps: float, weight, bias, mean, var):
    """``(N(a), batch mean, batch var)`` for ``a [N, C, H, W]`` (statistics empty unless ``batch``/``group``)."""
    dtype = _stats_dtype(a)
    if norm == NORM_CODES["none"]:
        return a, a.new_empty(0, dtype=dtype), a.new_empty(0, dtype=dtype)
    n, c = a.shape[:2]
    if norm == NORM_CODES["running"]:
        m, v = mean.view(1, c, 1, 1), var.view(1, c, 1, 1)
        bm, bv = a.new_empty(0, dtype=dtype), a.new_empty(0, dtype=dtype)
    elif norm == NORM_CODES["batch"]:
        bv, bm = torch.var_mean(a, dim=(0, 2, 3), unbiased=False)
        m, v = bm.view(1, c, 1, 1), bv.view(1, c, 1, 1)
    else:
        bv, bm = torch.var_mean(a.reshape(n, groups, a[0:1].numel() // groups), dim=2, unbiased=False)  # n may be 0
        per = c // groups
        m = bm.repeat_interleave(per, dim=1).view(n, c, 1, 1)
        v = bv.repeat_interleave(per, dim=1).view(n, c, 1, 1)
    y = (a - m) * torch.rsqrt(v + eps)
    if weight is not None:
        y = y * weight.view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.view(1, c, 1, 1)
    return y, bm.to(dtype), bv.to(dtype)


def _identity(sim: Tensor, P: int) -> Tensor:
    """``[outc]`` ones where the identity of ``M`` sits (every channel for diagonal ``M``, ``p (P + 1)`` for full)."""
    outc = sim.shape[1]
    eye = torch.ones(outc, dtype=sim.dtype, device=sim.device)
    if outc != P:
        eye = torch.eye(P, dtype=sim.dtype, device=sim.device).reshape(-1)
    return eye.view(1, outc, 1, 1)


def light_math(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1,
               var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity):
    """The operator :func:`light_predictor` in PyTorch ops (differentiable): ``(sim, mean0, var0, mean1, var1)``."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    a0 = F.conv2d(x, dw_weight, None, stride, padding, dilation, x.shape[1])
    y0, m0, v0 = _norm_forward(a0, norm, groups0, eps0, weight0, bias0, mean0, var0)
    a1 = F.conv2d(F.relu(y0), pw_weight)
    y1, m1, v1 = _norm_forward(a1, norm, groups1, eps1, weight1, bias1, mean1, var1)
    sim = torch.tanh(F.conv2d(F.relu(y1), out_weight, out_bias))
    if identity:
        sim = sim + _identity(sim, dw_weight.shape[2] * dw_weight.shape[3])
    return sim, m0, v0, m1, v1


def _norm_backward(dy: Tensor, a: Tensor, norm: int, groups: int, eps: float, weight, mean, var):
    """``(da, dweight, dbias)`` of :func:`_norm_forward` at ``a`` for ``dy`` (``mean``/``var``: the statistics
    used, running or batch)."""
    if norm == NORM_CODES["none"]:
        return dy, None, None
    n, c = a.shape[:2]
    gamma = torch.ones(c, dtype=a.dtype, device=a.device) if weight is None else weight.to(a.dtype)
    if norm == NORM_CODES["group"]:
        per = c // groups
        m = mean.to(a.dtype).repeat_interleave(per, dim=1).view(n, c, 1, 1)
        r = torch.rsqrt(var.to(a.dtype) + eps).repeat_interleave(per, dim=1).view(n, c, 1, 1)
    else:
        m = mean.to(a.dtype).view(1, c, 1, 1)
        r = torch.rsqrt(var.to(a.dtype) + eps).view(1, c, 1, 1)
    xhat = (a - m) * r
    dweight, dbias = (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3))
    dxhat = dy * gamma.view(1, c, 1, 1)
    if norm == NORM_CODES["running"]:
        return dxhat * r, dweight, dbias
    if norm == NORM_CODES["batch"]:
        e1, e2 = dxhat.mean((0, 2, 3), keepdim=True), (dxhat * xhat).mean((0, 2, 3), keepdim=True)
    else:
        shape = (n, groups, a[0:1].numel() // groups)  # not -1: n may be 0
        e1 = dxhat.reshape(shape).mean(2).repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)
        e2 = (dxhat * xhat).reshape(shape).mean(2).repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)
    return r * (dxhat - e1 - xhat * e2), dweight, dbias


def light_backward_math(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1,
                        bias1, mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity,
                        need_x, need_params):
    """The operator :func:`light_predictor_backward` in PyTorch ops (explicit formulas, no autograd: an operator's
    implementation runs below autograd): the 9 gradients, ``None`` where not computed."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    c = x.shape[1]
    a0 = F.conv2d(x, dw_weight, None, stride, padding, dilation, c)
    y0, _, _ = _norm_forward(a0, norm, groups0, eps0, weight0, bias0, mean0, var0)
    r0 = F.relu(y0)
    a1 = F.conv2d(r0, pw_weight)
    y1, _, _ = _norm_forward(a1, norm, groups1, eps1, weight1, bias1, mean1, var1)
    r1 = F.relu(y1)
    g = sim - _identity(sim, dw_weight.shape[2] * dw_weight.shape[3]) if identity else sim
    dz = grad_sim * (1 - g * g)
    dy1 = F.conv2d(dz, out_weight.transpose(0, 1)) * (r1 > 0)
    da1, dw1, db1 = _norm_backward(dy1, a1, norm, groups1, eps1, weight1, mean1, var1)
    dy0 = F.conv2d(da1, pw_weight.transpose(0, 1)) * (r0 > 0)
    da0, dw0, db0 = _norm_backward(dy0, a0, norm, groups0, eps0, weight0, mean0, var0)
    dx = torch.nn.grad.conv2d_input(x.shape, dw_weight, da0, stride, padding, dilation, c) if need_x else None
    if not need_params:
        return dx, None, None, None, None, None, None, None, None
    d_dw = torch.nn.grad.conv2d_weight(x, dw_weight.shape, da0, stride, padding, dilation, c)
    d_pw = torch.einsum("nohw,nchw->oc", da1, r0).view(pw_weight.shape)
    d_out = torch.einsum("nphw,nohw->po", dz, r1).view(out_weight.shape)
    return dx, d_dw, d_pw, d_out, dz.sum((0, 2, 3)), dw0, db0, dw1, db1


