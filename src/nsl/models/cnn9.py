"""The authors' CIFAR network, CNN-9 (method notes, section 6)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..layers import DynamicNSConv2d, SharedPrediction, SharedPredictionStage, make_conv, predictor_scope

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
        share_prediction: one prediction per stage: the first NSL layer's predictor computes ``g`` once from
            the stage's input and all three layers of the stage use that ``g`` (they all keep the stage's
            grid: 3x3, stride 1, padding 1), the second and third layers' own predictors are dropped; the
            stage is a :class:`~nsl.layers.SharedPredictionStage`. Kinds built on ``DynamicNSConv2d``
            only; excludes ``share_predictor`` (it implies it).
        **kw: passed to every NSL layer through :func:`nsl.layers.make_conv` (e.g. ``predictor_width``).
    """

    def __init__(self, layer: str = "conv", num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 paper: bool = False, bn_eps: float = 1e-5, width: int = 32, share_predictor: bool = False,
                 bias: bool = True, share_prediction: bool = False, **kw):
        super().__init__()
        if image_size % 8 or image_size < 8:
            raise ValueError(f"cnn9 needs an input side that is a positive multiple of 8, got {image_size}")
        if not isinstance(share_prediction, bool):
            raise ValueError(f"share_prediction must be True or False, got {share_prediction!r}")
        if share_prediction and share_predictor:
            raise ValueError("cnn9: share_prediction shares the prediction itself (so the predictor too); "
                             "give share_predictor=False with it")
        self.stem = ConvBNReLU("conv", in_channels, width, 3, bn_eps=bn_eps)
        if not bias:
            kw["predictor_bias"] = False
        chans = [width, width, 2 * width, 4 * width]
        for s in range(3):
            shared = predictor_scope(layer, share_predictor)
            extra = {} if shared is None else {"shared": shared}
            blocks = [ConvBNReLU(layer, chans[s] if i == 0 else chans[s + 1], chans[s + 1], 3, paper=paper,
                                 bn_eps=bn_eps, **extra, **kw) for i in range(3)]
            if share_prediction:
                convs = [b.conv for b in blocks]
                if not all(isinstance(c, DynamicNSConv2d) for c in convs):
                    raise ValueError(f"share_prediction applies to the dynamic NSL layer kinds (DynamicNSConv2d), "
                                     f"got {layer!r}")
                prediction = SharedPrediction(convs[0].predictor)
                for c in convs:
                    c.predictor = prediction.view()
                stage = SharedPredictionStage(*blocks, nn.MaxPool2d(2), prediction=prediction)
            else:
                stage = nn.Sequential(*blocks, nn.MaxPool2d(2))
            self.add_module(f"stage{s + 1}", stage)
        self.classifier = nn.Conv2d(4 * width, num_classes, image_size // 8, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.classifier(x).flatten(1)
