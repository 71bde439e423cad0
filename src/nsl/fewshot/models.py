"""Few-shot backbones: Conv-4 and ResNet-12, with every 3x3 convolution of an NSL layer kind.

::

    from nsl.fewshot import build_backbone

    net = build_backbone("conv4", layer="dynamic-diagonal")          # [N, 3, 32, 32] -> [N, 256]
    net = build_backbone("conv4", in_channels=1)                      # Omniglot: [N, 1, 28, 28] -> [N, 64]
    net = build_backbone("resnet12", layer="static-full")             # [N, 3, H, W] -> [N, 640]

A backbone maps images ``[N, C, H, W]`` to embeddings ``[N, D]``; ``net.embedding_dim(image_size)``
gives ``D`` without running it. The layer kinds are those of the table
:data:`nsl.layers.LAYER_KINDS` (``conv``, ``static-*``, ``dynamic-*``, ``dynamic-filter``), built with
:func:`nsl.layers.make_conv`; 1x1 convolutions (ResNet-12 shortcuts) stay plain ``nn.Conv2d``, since a
1x1 kernel has a single position and its similarity ``M`` would be a scalar. With ``paper=False``
(the default) every NSL layer starts exactly as its plain convolution, so all kinds share the
baseline's function at initialisation. ``predictor_width`` and ``share_predictor`` (kinds with a
predictor) set the predictors' hidden channels and share one predictor between the layers of equal
input channels (Conv-4: the whole backbone is one stage, so blocks 2-4 share; ResNet-12: each block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn as nn
from torch import Tensor

from nsl.layers.kinds import SharedPredictors, layer_kind, make_conv, predictor_scope

__all__ = ["BACKBONES", "Conv4", "Conv4Block", "ResNet12", "ResNet12Block", "build_backbone"]


def _shared(layer: str, share_predictor: bool) -> dict[str, SharedPredictors]:
    """``{'shared': scope}`` for one stage when sharing predictors, else ``{}``."""
    scope = predictor_scope(layer, share_predictor)
    return {} if scope is None else {"shared": scope}


def _side(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class Conv4Block(nn.Sequential):
    """``conv 3x3 (kind layer, padding 1, no bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2)``.

    ``[N, C_in, H, W] -> [N, C_out, floor(H/2), floor(W/2)]``. The conv has no bias: the BN that
    follows would cancel it (Snell et al.'s block has one; the function class is the same).
    """

    def __init__(self, layer: str, in_channels: int, out_channels: int, paper: bool = False,
                 bn_eps: float = 1e-5, **kw):
        super().__init__()
        self.conv = make_conv(layer, in_channels, out_channels, 3, 1, 1, bias=False, paper=paper, **kw)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)


class Conv4(nn.Module):
    """The Conv-4 embedding of Prototypical Networks (Snell et al., 2017), with NSL layer kinds.

    Four :class:`Conv4Block` (3x3 conv of ``width`` channels, BN, ReLU, 2x2 max-pool); the embedding
    is the flattened output of the last block:

        ``[N, in_channels, H, W] -> [N, D]``,  ``D = width * floor(H/16) * floor(W/16)``

    (each pool floors: 84 -> 42 -> 21 -> 10 -> 5, so 84x84 gives ``64*5*5 = 1600``; 32x32 gives
    ``64*2*2 = 256``; Omniglot's 28x28 gives 28 -> 14 -> 7 -> 3 -> 1, ``D = 64``).

    Args:
        layer: layer kind of the four 3x3 convs (:data:`nsl.layers.LAYER_KINDS`).
        in_channels: input channels (3 for colour images, 1 for Omniglot).
        width: channels of every block (64 in the paper).
        paper: the authors' NSL initialisations (see :func:`nsl.models.make_conv`).
        bn_eps: batch-norm epsilon.
        share_predictor: blocks 2-4 (equal input channels) share one predictor (kinds with a predictor).
        **kw: passed to every NSL layer through :func:`nsl.layers.make_conv` (e.g. ``predictor_width``).
    """

    def __init__(self, layer: str = "conv", in_channels: int = 3, width: int = 64, paper: bool = False,
                 bn_eps: float = 1e-5, share_predictor: bool = False, **kw):
        super().__init__()
        layer = layer_kind(layer).name
        self.layer = layer
        self.width = width
        chans = [in_channels] + [width] * 4
        kw.update(_shared(layer, share_predictor))
        self.blocks = nn.Sequential(*[Conv4Block(layer, chans[i], chans[i + 1], paper=paper, bn_eps=bn_eps, **kw)
                                      for i in range(4)])

    def embedding_dim(self, image_size: int | Sequence[int]) -> int:
        """``D`` for inputs of side ``image_size`` (an int or ``(H, W)``): ``width * (H//16) * (W//16)``."""
        h, w = _side(image_size)
        for _ in range(4):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"conv4 needs inputs of at least 16x16, got {image_size}")
        return self.width * h * w

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, width * (H//16) * (W//16)]``."""
        return self.blocks(x).flatten(1)


class ResNet12Block(nn.Module):
    """A ResNet-12 residual block (Oreshkin et al. 2018; Lee et al. 2019).

    ::

        out = LeakyReLU(BN(conv3(LeakyReLU(BN(conv2(LeakyReLU(BN(conv1(x))))))))
              + BN(conv1x1(x)))
        y   = MaxPool2d(2)(out)

    ``conv1..3`` are 3x3, padding 1, no bias, of kind ``layer``; the shortcut is a plain 1x1 conv + BN;
    LeakyReLU has slope ``negative_slope`` (0.1). ``[N, C_in, H, W] -> [N, C_out, H//2, W//2]``.
    """

    def __init__(self, layer: str, in_channels: int, out_channels: int, paper: bool = False,
                 bn_eps: float = 1e-5, negative_slope: float = 0.1, **kw):
        super().__init__()

        def conv(c_in: int) -> nn.Module:
            return make_conv(layer, c_in, out_channels, 3, 1, 1, bias=False, paper=paper, **kw)

        self.conv1, self.bn1 = conv(in_channels), nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.conv2, self.bn2 = conv(out_channels), nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.conv3, self.bn3 = conv(out_channels), nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels, eps=bn_eps))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """The standard few-shot ResNet-12, with NSL layer kinds.

    Four :class:`ResNet12Block` of widths ``64, 160, 320, 640`` (each three 3x3 convs + BN + leaky
    ReLU 0.1, a 1x1-conv shortcut, a 2x2 max-pool), then global average pooling:

        ``[N, in_channels, H, W] -> [N, widths[-1]]`` (``D = 640``), for any ``H, W >= 16``

    (84x84 -> 5x5 before pooling, 32x32 -> 2x2). DropBlock regularisation, used by some ResNet-12
    recipes, is not included.

    Args:
        layer: layer kind of the twelve 3x3 convs (:data:`nsl.layers.LAYER_KINDS`).
        in_channels: input channels.
        widths: channels of the four blocks.
        paper, bn_eps: as :class:`Conv4`.
        negative_slope: leaky-ReLU slope.
        share_predictor: in each block, ``conv2`` and ``conv3`` (equal input channels) share one
            predictor (kinds with a predictor).
        **kw: passed to every NSL layer through :func:`nsl.layers.make_conv` (e.g. ``predictor_width``).
    """

    def __init__(self, layer: str = "conv", in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640),
                 paper: bool = False, bn_eps: float = 1e-5, negative_slope: float = 0.1,
                 share_predictor: bool = False, **kw):
        super().__init__()
        layer = layer_kind(layer).name
        if len(widths) != 4:
            raise ValueError(f"resnet12 needs 4 block widths, got {len(widths)}")
        self.layer = layer
        self.widths = tuple(int(w) for w in widths)
        chans = [in_channels, *self.widths]
        self.blocks = nn.Sequential(*[ResNet12Block(layer, chans[i], chans[i + 1], paper=paper, bn_eps=bn_eps,
                                                    negative_slope=negative_slope,
                                                    **_shared(layer, share_predictor), **kw) for i in range(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def embedding_dim(self, image_size: int | Sequence[int] | None = None) -> int:
        """``D = widths[-1]`` (640), whatever the input size (at least 16x16)."""
        if image_size is not None and min(_side(image_size)) < 16:
            raise ValueError(f"resnet12 needs inputs of at least 16x16, got {image_size}")
        return self.widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, widths[-1]]`` (global average of the last block's map)."""
        return self.pool(self.blocks(x)).flatten(1)


#: Backbone name -> constructor ``(layer, in_channels, **kw) -> nn.Module``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "resnet12": ResNet12,
}


def build_backbone(name: str, layer: str = "conv", in_channels: int = 3, **kw) -> nn.Module:
    """Build few-shot backbone ``name`` with its 3x3 convolutions of kind ``layer``.

    Args:
        name: one of :data:`BACKBONES` (``conv4``, ``resnet12``).
        layer: one of :data:`nsl.layers.LAYER_KINDS`.
        in_channels: input channels (1 for Omniglot).
        **kw: ``paper``, ``bn_eps``, ``width`` (conv4), ``widths`` and ``negative_slope`` (resnet12),
            ``predictor_width`` and ``share_predictor`` (kinds with a predictor), and keyword arguments
            of the NSL layers.

    Returns:
        An ``nn.Module`` mapping ``[N, in_channels, H, W]`` to embeddings ``[N, D]``, with a method
        ``embedding_dim(image_size) -> D``.

    Raises:
        ValueError: unknown backbone name or layer kind (the message lists the valid ones).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    layer_kind(layer)
    return BACKBONES[name](layer=layer, in_channels=in_channels, **kw)
