"""Model zoo: the authors' CNN-9 and ResNets, each with every layer kind.

::

    model = build_model("cnn9", "dynamic-diagonal", num_classes=10, paper=True)

Names: ``cnn9`` (the authors' CIFAR network), ``resnet20``, ``resnet32``, ``resnet56`` (CIFAR
ResNets), ``resnet18``, ``resnet50`` (ImageNet-shaped, torchvision layout), ``sphere-attention`` (the
authors' global-neural-similarity CIFAR model, :class:`SphereAttentionNet`; layer ``conv`` only, see
:data:`MODEL_LAYERS`). Layer kinds: the table :data:`nsl.layers.LAYER_KINDS` (re-exported here as
:data:`LAYER_KINDS`), see :mod:`nsl.layers.kinds`.
"""

from __future__ import annotations

import torch.nn as nn

from ..layers import LAYER_KINDS, DynamicFilterConv2d, check_layer_kind, layer_kind, make_conv
from .attention_net import SPHERE_ATTENTION_LAYERS, SphereAttentionNet
from .cnn9 import CNN9, ConvBNReLU
from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet

__all__ = ["MODELS", "LAYER_KINDS", "build_model", "make_conv", "check_layer_kind", "layer_kind", "DynamicFilterConv2d",
           "CNN9",
           "ConvBNReLU", "CifarResNet", "ResNet", "BasicBlock", "Bottleneck", "count_parameters", "SphereAttentionNet",
           "MODEL_LAYERS"]


def _cnn9(layer, num_classes, in_channels, **kw):
    return CNN9(layer, num_classes, in_channels, **kw)


def _sphere_attention(layer, num_classes, in_channels, **kw):
    return SphereAttentionNet(layer, num_classes, in_channels, **kw)


def _cifar(depth):
    def build(layer, num_classes, in_channels, image_size=None, **kw):
        return CifarResNet(depth, layer, num_classes, in_channels, **kw)
    return build


def _imagenet(block, layers):
    def build(layer, num_classes, in_channels, image_size=None, **kw):
        return ResNet(block, layers, layer, num_classes, in_channels, **kw)
    return build


MODELS = {
    "cnn9": _cnn9,
    "resnet20": _cifar(20),
    "resnet32": _cifar(32),
    "resnet56": _cifar(56),
    "resnet18": _imagenet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": _imagenet(Bottleneck, [3, 4, 6, 3]),
    "sphere-attention": _sphere_attention,
}

#: Models restricted to some layer kinds (all others accept every kind of :data:`LAYER_KINDS`).
MODEL_LAYERS: dict[str, tuple[str, ...]] = {"sphere-attention": SPHERE_ATTENTION_LAYERS}


def build_model(name: str, layer: str = "conv", num_classes: int = 10, in_channels: int = 3, *,
                predictor_width: int | None = None, share_predictor: bool = False, bias: bool = True,
                predictor_norm: str = "batch", share_prediction: bool = False, **kw) -> nn.Module:
    """Build model ``name`` with its NSL convolutions of kind ``layer``.

    Args:
        name: one of :data:`MODELS` (``cnn9``, ``resnet20``, ``resnet32``, ``resnet56``, ``resnet18``,
            ``resnet50``, ``sphere-attention``).
        layer: one of :data:`LAYER_KINDS` (``sphere-attention``: ``conv`` only, meaning its cosine convs).
        num_classes, in_channels: classifier outputs and input channels.
        predictor_width: hidden channels of the NSL layers' predictors (kinds with a predictor;
            ``None``: the predictor's default, 64 / 128 for sphere and cosine, 16 for light).
        share_predictor: one predictor per stage of the model for the layers of equal input
            channels and geometry (the paper's shared parametrisation; kinds with a predictor).
        bias: ``False``: no bias in any convolution, as the authors' code (cnn9's classifier, every
            predictor conv; sphere-attention has none anyway). Default ``True`` keeps the models and
            their state_dict keys as they were.
        predictor_norm: the predictors' normalisation (kinds with a predictor): ``'batch'`` (default,
            the authors' BatchNorm), ``'group'`` (GroupNorm, no batch statistics) or ``'none'``.
        share_prediction: cnn9 only: one prediction per stage, computed once from the stage's input and
            used by all its NSL layers (kinds built on ``DynamicNSConv2d``; see :class:`CNN9`).
        **kw: ``paper`` (the authors' inits of ``M`` and predictors), ``bn_eps``, ``image_size``
            (cnn9, sphere-attention: input side, default 32), ``raw_input`` (sphere-attention: apply the
            authors' ``(x - 127.5) / 128``), ``width`` (cnn9, CIFAR ResNets), ``zero_init_residual``
            (ResNets), and keyword arguments of the NSL layers (e.g. ``hidden_channels``).

    Raises:
        ValueError: unknown model name or layer kind, or a kind the model does not support (the
            message lists the valid ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    kind = layer_kind(layer)
    if predictor_width is not None or share_predictor or predictor_norm != "batch":
        if kind.predictor is None:
            option = ("predictor_width" if predictor_width is not None else "share_predictor" if share_predictor
                      else "predictor_norm")
            raise ValueError(f"{option} applies to layer kinds with a predictor ("
                             f"{', '.join(n for n, k in LAYER_KINDS.items() if k.predictor is not None)}), "
                             f"got {kind.name!r}")
        kw.update(predictor_width=predictor_width, share_predictor=share_predictor)
        if predictor_norm != "batch":
            kw["predictor_norm"] = predictor_norm
    if share_prediction:
        if name != "cnn9":
            raise ValueError(f"share_prediction applies to model cnn9 only (its stages keep one grid), got {name!r}")
        kw["share_prediction"] = share_prediction
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    if not bias and name != "sphere-attention":  # its convs and classifier have no bias
        kw["bias"] = False
    return MODELS[name](kind.name, num_classes, in_channels, **kw)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
