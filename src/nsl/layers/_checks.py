"""Argument and input checks shared by every layer of :mod:`nsl.layers`.

One rule for all layers: constructor arguments are checked before anything is built
(:func:`check_conv_args`, :func:`check_positive_int`: ``ValueError`` naming the argument and its
value, like ``nn.Conv2d``'s own checks), and inputs are checked at ``forward``
(:func:`batched_input`: a non-tensor or a non-floating-point dtype, or a dtype other than the
layer's parameters outside autocast, is a ``TypeError`` naming both dtypes; a rank other than 3 or 4
or a wrong channel count is a ``ValueError`` with the shape). An unbatched ``[C, H, W]`` input is
accepted wherever ``nn.Conv2d`` accepts it: it runs as a batch of one and the output loses the
batch dimension again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._geometry import pair

__all__ = ["check_positive_int", "check_conv_args", "batched_input"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_int(owner: str, name: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= minimum`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {what}{' or None' if allow_none else ''}, got {value!r}")


def _check_pair(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise ValueError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    try:
        items = pair(value, name)
    except TypeError:
        items = None
    if items is None or min(items) < minimum:
        what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        raise ValueError(f"{owner}: {name} must be {what} (an int or a pair), got {value!r}")


def check_conv_args(owner: str, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                    groups=1) -> None:
    """Check ``nn.Conv2d``'s geometry arguments for layer class ``owner``.

    Channels and groups are positive ints, ``groups`` divides both channel counts; ``kernel_size``,
    ``stride``, ``dilation`` are positive ints or pairs; ``padding`` is ``'same'``, ``'valid'`` or
    ints ``>= 0`` (an int or a pair). Raises ``ValueError`` naming the argument and its value.
    """
    check_positive_int(owner, "in_channels", in_channels)
    check_positive_int(owner, "out_channels", out_channels)
    check_positive_int(owner, "groups", groups)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value % groups:
            raise ValueError(f"{owner}: {name} = {value} must be divisible by groups = {groups}")
    _check_pair(owner, "kernel_size", kernel_size, 1)
    _check_pair(owner, "stride", stride, 1)
    _check_pair(owner, "dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{owner}: padding must be 'same', 'valid' or ints >= 0, got {padding!r}")
    else:
        _check_pair(owner, "padding", padding, 0)


def batched_input(owner: str, input, channels: int, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """Check a layer's input and return it as ``[N, C, H, W]`` with a flag "was unbatched".

    Args:
        owner: the layer class name, for messages.
        input: ``[N, C, H, W]`` or unbatched ``[C, H, W]``.
        channels: the expected ``C``.
        dtype: the dtype of the layer's parameters; the input must have it unless autocast is
            enabled on the input's device (then any floating-point dtype is accepted, as in
            ``nn.Conv2d``).

    Raises:
        TypeError: not a tensor, not floating point, or a dtype other than the parameters'.
        ValueError: a rank other than 3 or 4, or ``C != channels``.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(f"{owner}: expected input of shape [N, C, H, W] or unbatched [C, H, W], got shape "
                         f"{list(input.shape)}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"{owner}: expected a floating-point input (the layer's parameters are "
                        f"{str(dtype).replace('torch.', '')}), got dtype {str(input.dtype).replace('torch.', '')}")
    if input.dtype != dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"{owner}: input dtype {str(input.dtype).replace('torch.', '')} does not match the layer's "
                        f"parameters ({str(dtype).replace('torch.', '')}); convert one of them, e.g. "
                        f"input.to({dtype}) or layer.to({input.dtype})")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if input.shape[1] != channels:
        raise ValueError(f"{owner}: expected {channels} input channels, got input of shape "
                         f"{list(input.shape[1:] if unbatched else input.shape)}")
    return input, unbatched
