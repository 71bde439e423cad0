"""ResNets with NSL layers: CIFAR ResNet-20/32/56 and ImageNet-shaped ResNet-18/50 (torchvision layout).

Every 3x3 convolution of the residual blocks is of layer kind ``layer``; the stem and the 1x1
convolutions (bottleneck reductions/expansions and projection shortcuts) stay plain ``nn.Conv2d``
(a 1x1 kernel has a single position, so its similarity ``M`` would be a scalar).

``share_predictor=True`` (kinds with a predictor): within a stage (``layer1``, ``layer2``, ...), the
3x3 NSL layers with equal input channels and geometry share one predictor (in a CIFAR ResNet stage
with ``n`` blocks: every conv except the first, strided one of stages 2 and 3 and, there, the first
block's second conv shares with the later blocks). ``bias=False``: the predictors' convs have no
bias either (the residual convs never have one; ``fc`` keeps its bias).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..layers import DynamicFilterConv2d, DynamicNSConv2d, NSConv2d, make_conv, predictor_scope

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "ResNet"]


def _shortcut(in_channels: int, out_channels: int, stride: int, bn_eps: float) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels, eps=bn_eps))


class BasicBlock(nn.Module):
    """Two 3x3 convs (kind ``layer``) with BN, ReLU and an identity or 1x1-projection shortcut."""

    expansion = 1

    def __init__(self, layer: str, in_channels: int, channels: int, stride: int = 1, paper: bool = False,
                 bn_eps: float = 1e-5, **kw):
        super().__init__()
        self.conv1 = make_conv(layer, in_channels, channels, 3, stride, 1, bias=False, paper=paper, **kw)
        self.bn1 = nn.BatchNorm2d(channels, eps=bn_eps)
        self.conv2 = make_conv(layer, channels, channels, 3, 1, 1, bias=False, paper=paper, **kw)
        self.bn2 = nn.BatchNorm2d(channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels, stride, bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (kind ``layer``, carrying the stride: torchvision's ResNet v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, layer: str, in_channels: int, channels: int, stride: int = 1, paper: bool = False,
                 bn_eps: float = 1e-5, **kw):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, eps=bn_eps)
        self.conv2 = make_conv(layer, channels, channels, 3, stride, 1, bias=False, paper=paper, **kw)
        self.bn2 = nn.BatchNorm2d(channels, eps=bn_eps)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _init(model: nn.Module, zero_init_residual: bool) -> None:
    # NSL layers keep their own initialisation of weight, M, predictor and mixing, including the plain
    # nn.Conv2d modules inside them (a predictor's last conv, the dynamic filter's mixing A)
    nsl_parts = {id(sub) for m in model.modules() if isinstance(m, (NSConv2d, DynamicNSConv2d, DynamicFilterConv2d))
                 for sub in m.modules()}
    for m in model.modules():
        if type(m) is nn.Conv2d and id(m) not in nsl_parts:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): a 3x3 stem to 16 channels, three stages of ``n`` basic blocks
    (16, 32, 64 channels; stride 2 at the start of stages 2 and 3; 1x1 projection shortcuts),
    global average pooling and a linear classifier. Any input size (global pooling).
    """

    def __init__(self, depth: int, layer: str = "conv", num_classes: int = 10, in_channels: int = 3,
                 paper: bool = False, bn_eps: float = 1e-5, width: int = 16, zero_init_residual: bool = False,
                 share_predictor: bool = False, bias: bool = True, **kw):
        super().__init__()
        if not bias:  # the convs have no bias already; the predictors' convs
            kw["predictor_bias"] = False
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        chans, cin = [width, 2 * width, 4 * width], width
        for s, c in enumerate(chans):
            blocks = []
            shared = predictor_scope(layer, share_predictor)
            extra = {} if shared is None else {"shared": shared}
            for i in range(n):
                blocks.append(BasicBlock(layer, cin, c, 2 if (i == 0 and s > 0) else 1, paper=paper, bn_eps=bn_eps,
                                         **extra, **kw))
                cin = c
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class ResNet(nn.Module):
    """ImageNet-shaped ResNet in torchvision's layout (same module names and parameter shapes).

    Stem: 7x7 stride-2 conv to 64, BN, ReLU, 3x3 stride-2 max-pool; four stages (64, 128, 256, 512
    base channels, stride 2 from stage 2 on); global average pooling; ``fc``.
    """

    def __init__(self, block: type, layers: list[int], layer: str = "conv", num_classes: int = 1000,
                 in_channels: int = 3, paper: bool = False, bn_eps: float = 1e-5, zero_init_residual: bool = False,
                 share_predictor: bool = False, bias: bool = True, **kw):
        super().__init__()
        if not bias:  # the convs have no bias already; the predictors' convs
            kw["predictor_bias"] = False
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for s, (c, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            shared = predictor_scope(layer, share_predictor)
            extra = {} if shared is None else {"shared": shared}
            for i in range(n):
                blocks.append(block(layer, cin, c, 2 if (i == 0 and s > 0) else 1, paper=paper, bn_eps=bn_eps,
                                    **extra, **kw))
                cin = c * block.expansion
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
