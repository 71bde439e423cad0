"""SphereNet-normalised convolution (the predictor's and the attention block's building block)."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..functional import sphere_conv2d
from ._checks import batched_input, check_conv_args

__all__ = ["SphereConv2d"]


class SphereConv2d(nn.Conv2d):
    """Convolution divided by the input patch norm (and optionally the filter norm).

    ``out[n, o](y) = (w_o^T x_y) / (sqrt(||x_y||^2 + eps) * sqrt(||w_o||^2 + eps)^[normalize_weight]) + bias[o]``
    where ``x_y`` is the ``C_in/groups x kh x kw`` input patch read at output location ``y``.
    With ``normalize_weight=True`` the response is a cosine similarity (SphereNet's "cosine"
    SphereConv); with ``False`` it is the authors' predictor normalisation.

    Arguments are those of :class:`torch.nn.Conv2d` plus ``normalize_weight`` and ``eps``
    (``1e-4``, the authors' constant). Input ``[N, C_in, H, W]`` (or unbatched ``[C_in, H, W]``), output
    ``[N, C_out, H_out, W_out]`` (``[C_out, H_out, W_out]``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 normalize_weight: bool = False, eps: float = 1e-4, device=None, dtype=None):
        check_conv_args(type(self).__name__, in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups)
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"{type(self).__name__}: eps must be positive, got {eps!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.normalize_weight = normalize_weight
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        input, unbatched = batched_input(type(self).__name__, input, self.in_channels, self.weight.dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = sphere_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                            normalize_weight=self.normalize_weight, eps=self.eps)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.normalize_weight:
            s += ", normalize_weight=True"
        if self.eps != 1e-4:
            s += f", eps={self.eps}"
        return s
