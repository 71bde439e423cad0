"""The authors' global-neural-similarity CIFAR model (method page, section 5; wy1iu/NSL ``nsl_global_ns``)."""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from ..layers.attention import GlobalSimilarity2d
from ..layers.sphere import SphereConv2d

__all__ = ["SphereAttentionNet", "CosineConvBNReLU"]

#: Layer kinds :class:`SphereAttentionNet` accepts (its convolutions are always cosine SphereConvs).
SPHERE_ATTENTION_LAYERS = ("conv",)


class CosineConvBNReLU(nn.Sequential):
    """``cosine conv (SphereConv2d, normalize_weight=True, no bias, 'same' padding) -> BatchNorm2d -> ReLU``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bn_eps: float = 1e-5):
        super().__init__()
        self.conv = SphereConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False,
                                 normalize_weight=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)


class SphereAttentionNet(nn.Module):
    """The authors' self-attention SphereNet for CIFAR (``SphereNet.build`` of ``nsl_global_ns/spherenet.py``).

    ``stage1..3``: three 3x3 cosine convs (:class:`~nsl.SphereConv2d` with ``normalize_weight=True``,
    no bias) with 128, 192 and 256 channels, each + BN + ReLU, then a 2x2 max-pool; ``att1`` /
    ``att2``: a :class:`~nsl.GlobalSimilarity2d` block after the pools of stages 1 and 2 (query and key
    ``C/8`` channels, value ``C``, cosine projections without bias, ReLU after the query projection,
    logit scale 1, residual gate ``gamma`` starting at 0, so the blocks are the identity at
    initialisation); ``fc6``: a ``k x k`` valid cosine conv to 256 channels (no BN, no ReLU), with
    ``k = image_size / 8`` (4 for 32x32 CIFAR); ``classifier``: ``nn.Linear(256, num_classes)``
    without bias (the authors' 1x1 "score" conv has none).

    Initialisation as the authors: every conv filter and the classifier ``N(0, 2 / fan_in)`` (He
    normal); BN scale 1, shift 0.

    Regularisation as the authors' code, exposed for the training engine:

    * :meth:`orthogonality_filters`: the filters of the orthogonality penalty, every conv filter
      (the nine 3x3 convs, ``fc6`` and the attention projections), not the classifier.
    * :meth:`no_weight_decay`: names of the parameters the authors put no L2 on: the 3x3 conv
      filters, ``fc6`` and the attention gates ``gamma``. Their L2 (5e-4) is on the attention
      projections, the classifier and the BN scale and shift only.

    Input: with ``raw_input=True`` the model expects pixel values 0..255 and applies the authors'
    ``(x - 127.5) / 128`` itself (the training engine sets it when ``input='raw'``); otherwise the
    input is used as given (e.g. mean/std-normalised).

    Args:
        layer: only ``'conv'`` (the authors' cosine convolutions); other NSL layer kinds raise
            ``ValueError``: this architecture is defined by its SphereConvs and attention blocks.
        num_classes, in_channels: output classes and input channels.
        image_size: input side, a positive multiple of 8 (32 for CIFAR).
        paper: accepted for the registry's common signature and ignored (no ``M`` to initialise).
        bn_eps: BN epsilon (the authors' TensorFlow value is 1e-3).
        widths: channels of the three stages (default ``(128, 192, 256)``).
        fc_channels: output channels of ``fc6`` (default 256).
        raw_input: apply ``(x - 127.5) / 128`` to the input (see above).
        query_relu: ReLU after the query projection (default ``True``, the authors').

    Shapes: ``[N, in_channels, image_size, image_size]`` -> logits ``[N, num_classes]``.
    """

    def __init__(self, layer: str = "conv", num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 paper: bool = False, bn_eps: float = 1e-5, widths: tuple = (128, 192, 256), fc_channels: int = 256,
                 raw_input: bool = False, query_relu: bool = True, **kw):
        super().__init__()
        if layer not in SPHERE_ATTENTION_LAYERS:
            raise ValueError(f"sphere-attention supports layer 'conv' only (its convolutions are the authors' cosine "
                             f"SphereConvs, with global similarity in the attention blocks), got {layer!r}")
        if kw:
            raise TypeError(f"sphere-attention: unexpected keyword argument(s) {', '.join(sorted(kw))}")
        if not isinstance(image_size, int) or image_size % 8 or image_size < 8:
            raise ValueError(f"sphere-attention needs an input side that is a positive multiple of 8, got {image_size}")
        if len(widths) != 3:
            raise ValueError(f"sphere-attention: widths must have 3 entries, got {widths!r}")
        self.raw_input = raw_input
        chans = [in_channels, *widths]
        for s in range(3):
            blocks = [CosineConvBNReLU(chans[s] if i == 0 else chans[s + 1], chans[s + 1], 3, bn_eps) for i in range(3)]
            self.add_module(f"stage{s + 1}", nn.Sequential(*blocks, nn.MaxPool2d(2)))
            if s < 2:
                self.add_module(f"att{s + 1}", GlobalSimilarity2d(chans[s + 1], normalize=True, bias=False,
                                                                  query_relu=query_relu))
        self.fc6 = SphereConv2d(widths[2], fc_channels, image_size // 8, bias=False, normalize_weight=True)
        self.classifier = nn.Linear(fc_channels, num_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: filters He normal ``N(0, 2 / fan_in)``, gates 0, BN (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
            elif isinstance(m, GlobalSimilarity2d):
                nn.init.zeros_(m.gamma)

    def orthogonality_filters(self) -> list[Tensor]:
        """The filters of the authors' orthogonality penalty: every conv filter, not the classifier."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]

    def no_weight_decay(self) -> set[str]:
        """Parameter names without L2 in the authors' code: 3x3 conv and ``fc6`` filters, attention gates."""
        names = {"fc6.weight", "att1.gamma", "att2.gamma"}
        for s in (1, 2, 3):
            names.update(f"stage{s}.{i}.conv.weight" for i in range(3))
        return names

    def forward(self, x: Tensor) -> Tensor:
        if self.raw_input:
            x = (x - 127.5) / 128.0
        x = self.att1(self.stage1(x))
        x = self.att2(self.stage2(x))
        x = self.fc6(self.stage3(x))
        return self.classifier(x.flatten(1))
