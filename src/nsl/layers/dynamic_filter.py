"""The dynamic-filter layer (Jia et al. 2016), the baseline dynamic NSL is compared with."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._checks import batched_input, check_conv_args
from .dynamic import SimilarityPredictor, check_predictor_init, check_predictor_norm, check_shared_predictor

__all__ = ["DynamicFilterConv2d"]


class DynamicFilterConv2d(nn.Conv2d):
    """A convolution plus a dynamic filter predicted at every output location (Jia et al., NeurIPS 2016).

    Dynamic filter networks generate filters from the input, per location. Generating a whole
    ``C_out x C_in x k x k`` filter per location is far too costly, so, as in Jia et al.'s dynamic
    local filtering layer, the predictor produces one ``k x k`` spatial filter ``f(y)`` per location
    (``P = k*k`` numbers), shared by all channels, and a learned ``1 x 1`` mixing ``A [C_out, C_in]``
    spreads it over the channels. The effective filter at location ``y`` is the static filter plus a
    per-location rank-one term::

        W(y)[o, c, p] = W[o, c, p] + A[o, c] * f(y)[p],       f(y) = delta_centre + g(x)(y)

        out[o](y) = conv(x, W)[o](y) + sum_c A[o, c] * sum_p f(y)[p] * x[c](y*stride + dilation*offset(p) - padding)

    i.e. a dynamic local filtering of ``x`` (the same per-location filter for every channel)
    followed by the 1x1 convolution ``A``, added to the static convolution.

    * Predictor ``g``: :class:`nsl.SimilarityPredictor` with ``similarity='diagonal'`` (sphere
      conv 3x3 to ``hidden_channels`` = 64 channels, BN, ReLU, conv to ``P``, BN) at the layer's
      geometry: the same network, hence the same cost, as the dynamic diagonal NSL predictor, so the
      two can be compared side by side. The dynamic part adds ``C_in * P + C_in * C_out``
      multiply-adds per location (a ``1/P``-sized fraction of the convolution plus a 1x1 conv).
      Passing another layer's ``predictor`` module shares it (``predictor=a.predictor``).
    * ``f = delta_centre + g`` is the analogue of NSL's identity residual: with ``g = 0`` the
      dynamic branch is a plain ``1x1`` convolution of the (strided) input.
    * Init: ``A = 0``, so the layer starts exactly as its plain convolution; ``A`` receives
      gradient at once (through the centre tap), and ``g`` as soon as ``A != 0``.
      ``predictor_init`` is passed to the predictor (``'zero'``: ``g = 0``; ``'authors'``: the
      authors' He x 0.1 / He x 0.001 init), ``predictor_norm`` too (``'batch'``, the default,
      ``'group'`` or ``'none'``: see :class:`nsl.SimilarityPredictor`).

    ``groups`` must be 1 and ``padding_mode`` ``'zeros'``. Shapes: ``[N, C_in, H, W]`` (or unbatched
    ``[C_in, H, W]``) -> ``[N, C_out, H_out, W_out]`` as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", predictor_init: str = "zero",
                 hidden_channels: int | None = None, predictor: nn.Module | None = None, predictor_bias: bool = True,
                 predictor_norm: str = "batch", device=None, dtype=None):
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if groups != 1:
            raise ValueError(f"{name} supports groups=1 only, got groups={groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"{name} supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"{name} needs numeric padding, got {padding!r}")
        check_predictor_init(name, predictor_init)
        check_predictor_norm(name, predictor_norm)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.predictor_init = predictor_init
        if predictor is not None:
            check_shared_predictor(name, predictor)
            self.predictor = predictor
            self.predictor_norm = getattr(predictor, "norm", None)
        else:
            self.predictor = SimilarityPredictor(in_channels, self.kernel_size, self.stride, self.padding,
                                                 self.dilation, similarity="diagonal", kind="sphere",
                                                 hidden_channels=hidden_channels, init=predictor_init,
                                                 bias=predictor_bias, norm=predictor_norm,
                                                 device=device, dtype=dtype)
            self.predictor_norm = predictor_norm
        self.mix = nn.Conv2d(in_channels, out_channels, 1, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.mix.weight)

    def filters_from(self, input: Tensor) -> Tensor:
        """The per-location filters ``f(y)``: ``[N, P, H_out, W_out]``."""
        g = self.predictor(input)
        kh, kw = self.kernel_size
        centre = (kh // 2) * kw + kw // 2
        delta = torch.zeros(kh * kw, device=g.device, dtype=g.dtype)
        delta[centre] = 1.0
        return g + delta.view(1, -1, 1, 1)

    def dynamic_filtering(self, input: Tensor, filters: Tensor) -> Tensor:
        """``sum_p f(y)[p] * x[c](y*stride + dilation*offset(p) - padding)`` for every channel ``c``."""
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw), (ph, pw) = self.stride, self.dilation, self.padding
        ho, wo = filters.shape[-2:]
        x = F.pad(input, (pw, pw, ph, ph))
        out = None
        for i in range(kh):
            for j in range(kw):
                win = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                term = win * filters[:, i * kw + j: i * kw + j + 1]
                out = term if out is None else out + term
        return out

    def forward(self, input: Tensor) -> Tensor:
        input, unbatched = batched_input(type(self).__name__, input, self.in_channels, self.weight.dtype)
        static = self._conv_forward(input, self.weight, self.bias)
        filtered = self.dynamic_filtering(input, self.filters_from(input))
        out = static + self.mix(filtered)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        s = super().extra_repr() + ", dynamic filter"
        if self.predictor_init != "zero":
            s += f", predictor_init={self.predictor_init!r}"
        if self.predictor_norm not in ("batch", None):
            s += f", predictor_norm={self.predictor_norm!r}"
        return s
