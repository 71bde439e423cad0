"""A 2-D convolution's geometry, in one place: pairs, the output size, the shape check, and its type.

Names and rules are :func:`torch.nn.functional.conv2d`'s: kernel ``(kh, kw)`` with ``P = kh * kw``
positions, stride ``(sh, sw)``, padding ``(top, bottom, left, right)`` (a pair ``(ph, pw)`` means
symmetric), dilation ``(dh, dw)``, and::

    H_out = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1        (W_out likewise)

Used by :mod:`nsl.functional` (argument checks), :mod:`nsl._ops` (the operator and its fake kernels),
the kernels (:mod:`nsl._torch_kernels`, :mod:`nsl._export_math`, :mod:`nsl._triton`, :mod:`nsl._cpp`)
and the layers. Imports nothing from ``nsl``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["pair", "output_size", "ConvGeometry", "check_shapes", "has_shape"]


def _is_integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(value, name: str = "value") -> tuple[int, int]:
    """``(v, v)`` for an integer ``v``, ``(a, b)`` for a sequence of two integers (bools are refused;
    numpy integers are taken). Raises ``TypeError`` naming ``name`` and the value otherwise.

    Plain ``isinstance`` checks (no exceptions on the common path), so ``torch.compile`` traces it.
    """
    if _is_integer(value):
        return (int(value), int(value))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(
            _is_integer(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def has_shape(t, expected) -> bool:
    """True when tensor ``t`` has the shape ``expected``: the rank first, then each axis against its own
    entry; ``None`` matches any size (the batch axis, wherever it is not known).

    The one way nsl compares a shape. A size is compared only with the entry of its own axis, never
    with one of another rank: Python's ``tuple ==`` compares entries before lengths, so
    ``(N, P, H, W) == (P,)`` compares the batch size with ``P = kh * kw``, which under ``torch.export``
    with a batch ``Dim`` (or ``torch.compile(dynamic=True)``) records a guard ``N != 9`` and fails the
    export. The batch is compared only with another batch size (the same symbol) or not at all (None).
    """
    return t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))


def output_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution over an input of spatial ``size = (H, W)`` (module docstring).

    ``kernel``, ``stride``, ``dilation``: pairs; ``padding``: ``(ph, pw)`` (symmetric) or
    ``(top, bottom, left, right)``. Works on symbolic sizes (no check that the result is positive).
    """
    pt, pb, pl, pr = (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else padding
    h = (size[0] + pt + pb - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w = (size[1] + pl + pr - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return (h, w)


class ConvGeometry(NamedTuple):
    """The geometry of a dynamic similarity convolution over an already *padded* input, as the
    pure-PyTorch formulations take it: kernel ``kh x kw``, ``stride`` and ``dilation`` pairs, and the
    output size ``out = (H_out, W_out)``; position ``q = i * kw + j`` reads ``xpad[..., y * s + d * (i, j)]``."""

    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> ConvGeometry:
        """The geometry of the operator's arguments (``x [N, C, H, W]`` unpadded, symmetric ``padding``)."""
        kh, kw = weight.shape[2], weight.shape[3]
        out = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
        return cls(kh, kw, tuple(stride), tuple(dilation), out)


def check_shapes(x, weight, sim, stride, padding, dilation, groups) -> tuple[int, int]:
    """Check the operator's arguments (shapes and dtypes; symbolic shapes too) and return ``(H_out, W_out)``.

    ``x [N, C_in, H, W]``, ``weight [C_out, C_in / groups, kh, kw]``, ``sim [N, P, H_out, W_out]``
    (diagonal) or ``[N, P, P, H_out, W_out]`` (full), one dtype; ``stride``/``padding``/``dilation``
    pairs (symmetric padding). Raises ``RuntimeError`` (``torch._check``) naming what disagrees.
    """
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "x and weight must be 4-D")
    torch._check(len(stride) == 2 and len(padding) == 2 and len(dilation) == 2,
                 lambda: "stride, padding and dilation must have two entries")
    kh, kw = weight.shape[2], weight.shape[3]
    oh, ow = output_size(x.shape[2:], (kh, kw), stride, padding, dilation)
    torch._check(x.shape[1] == weight.shape[1] * groups, lambda: "x.size(1) must be weight.size(1) * groups")
    torch._check(weight.shape[0] % groups == 0, lambda: "weight.size(0) must be divisible by groups")
    P = kh * kw
    n = x.shape[0]
    expected = [n, P, oh, ow] if sim.dim() == 4 else [n, P, P, oh, ow]
    torch._check(sim.dim() in (4, 5) and has_shape(sim, expected),
                 lambda: f"sim has shape {list(sim.shape)}; expected {expected}")
    torch._check(x.dtype == weight.dtype == sim.dtype, lambda: "x, weight and sim must share a dtype")
    return oh, ow
