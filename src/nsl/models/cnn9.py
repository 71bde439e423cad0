"""The authors' CIFAR network, CNN-9 (method notes, section 6)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..layers import make_conv, predictor_scope

__all__ = ["CNN9", "ConvBNReLU"]


class ConvBNReLU(nn.Sequential):
    """``conv (no bias) -> BatchNorm2d -> ReLU`` with the conv of layer kind ``layer``."""

    def __init__(self, layer: str, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 paper: bool = False, bn_eps: float = 1e-5, **kw):
        super().__init__()
        self.conv = make_conv(layer, in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False,
                              paper=paper, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)


class CNN9(nn.Module):
    """CNN-9 of the authors' CIFAR code.

    ``stem``: a plain 3x3 conv ``in_channels -> 32`` + BN + ReLU; ``stage1..3``: three 3x3 stride-1
    convs of layer kind ``layer`` with 32, 64 and 128 channels, each + BN + ReLU, followed by a
    2x2 max-pool; ``classifier``: a ``k x k`` valid conv (with bias) to ``num_classes``, with
    ``k = image_size / 8`` (4 for the authors' 32x32 CIFAR input), giving ``[N, num_classes]`` logits.

    Args:
        layer: layer kind of the nine NSL convs (see :data:`nsl.models.LAYER_KINDS`).
        num_classes, in_channels: output classes, input channels.
        image_size: input side (a multiple of 8; 32 for CIFAR).
        paper: the authors' initialisations of ``M`` and of the predictors.
        bn_eps: batch-norm epsilon of the network's BN layers (the authors' TensorFlow value is 1e-3).
        width: channels of stage 1 (32 in the paper; stages 2 and 3 have 2x and 4x).
        bias: ``False``: no bias in any conv (the classifier's and the predictors'), as the authors' code;
            the conv CNN-9 then has 511,200 parameters.
        share_predictor: the NSL layers of one stage with equal input channels share one predictor
            (kinds with a predictor; in stage 1 all three convs, in stages 2 and 3 the second and third).
        **kw: passed to every NSL layer through :func:`nsl.layers.make_conv` (e.g. ``predictor_width``).
    """

    def __init__(self, layer: str = "conv", num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 paper: bool = False, bn_eps: float = 1e-5, width: int = 32, share_predictor: bool = False,
                 bias: bool = True, **kw):
        super().__init__()
        if image_size % 8 or image_size < 8:
            raise ValueError(f"cnn9 needs an input side that is a positive multiple of 8, got {image_size}")
        self.stem = ConvBNReLU("conv", in_channels, width, 3, bn_eps=bn_eps)
        if not bias:
            kw["predictor_bias"] = False
        chans = [width, width, 2 * width, 4 * width]
        for s in range(3):
            shared = predictor_scope(layer, share_predictor)
            extra = {} if shared is None else {"shared": shared}
            blocks = [ConvBNReLU(layer, chans[s] if i == 0 else chans[s + 1], chans[s + 1], 3, paper=paper,
                                 bn_eps=bn_eps, **extra, **kw) for i in range(3)]
            self.add_module(f"stage{s + 1}", nn.Sequential(*blocks, nn.MaxPool2d(2)))
        self.classifier = nn.Conv2d(4 * width, num_classes, image_size // 8, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.classifier(x).flatten(1)
