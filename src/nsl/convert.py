"""Model surgery: turn convolutions into NSL layers (:func:`convert`) and back (:func:`fold`)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import (
    LAYER_KINDS,
    PREDICTOR_NORMS,
    DynamicFilterConv2d,
    DynamicNSConv2d,
    NSConv2d,
    SphereConv2d,
    layer_kind,
    make_conv,
)
from .layers.conv_transforms import SamePadding, StandardizedWeight
from .layers.dynamic import check_predictor_norm

__all__ = ["fold", "convert", "ConvAdaptation", "register_conv_subclass"]

_NSL_LAYERS = (NSConv2d, DynamicNSConv2d, DynamicFilterConv2d)


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)


def _replace(root: nn.Module, pick: Callable[[str, nn.Module], nn.Module | None],
             descend: Callable[[nn.Module], bool] = lambda m: True) -> int:
    """Replace every submodule for which ``pick(name, module)`` returns a new module; count them.

    A module reachable under several names (shared) is replaced once, by the same new module. The
    children of a module for which ``descend(module)`` is false are not visited.
    """
    done: dict[int, nn.Module] = {}
    count = 0

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal count
        for child_name, child in list(module.named_children()):
            full = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in done:
                setattr(module, child_name, done[id(child)])
                continue
            new = pick(full, child)
            if new is not None:
                done[id(child)] = new
                setattr(module, child_name, new)
                count += 1
            elif descend(child):
                done[id(child)] = child
                visit(full, child)

    visit("", root)
    return count


# ---------------------------------------------------------------------------------------------
# nn.Conv2d subclasses
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvAdaptation:
    """What an ``nn.Conv2d`` subclass does around its plain convolution, for :func:`convert`.

    The converted NSL layer computes ``conv(input_padding(x), weight_transform(W) M)`` (``M(y)`` for a
    dynamic layer) with the subclass's ``stride, padding, dilation, groups``; with ``M = I`` that is the
    subclass's output when its forward is ``F.conv2d(pad(x), T(W), bias, ...)``.

    Attributes:
        weight_transform: ``None`` or a module ``W -> T(W)`` (the layer's ``weight_transform``).
        input_padding: ``None`` or a module ``x -> pad(x)`` applied first (the layer's ``input_padding``).
    """

    weight_transform: nn.Module | None = None
    input_padding: nn.Module | None = None


#: Adapter signature: ``adapter(conv) -> ConvAdaptation`` or a string saying why ``conv`` cannot be converted.
Adapter = Callable[[nn.Conv2d], "ConvAdaptation | str"]
_ADAPTERS: dict[type, Adapter] = {}
#: timm's subclasses, recognised by module and class name so that timm need not be imported.
_TIMM_ADAPTERS: dict[str, Adapter] = {}


def register_conv_subclass(cls: type, adapter: Adapter) -> None:
    """Teach :func:`convert` an ``nn.Conv2d`` subclass: ``adapter(conv)`` returns a :class:`ConvAdaptation`
    (its weight transform and input padding) or a string naming why this instance cannot be converted.

    Subclasses that :func:`convert` knows without registration: timm's ``Conv2dSame`` (TensorFlow 'same'
    padding computed from the input size), ``StdConv2d`` / ``StdConv2dSame`` (weight standardisation) and
    ``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (standardisation with a learned gain). Any other
    subclass is skipped, with a warning naming it.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)) or cls is nn.Conv2d:
        raise TypeError(f"register_conv_subclass expects a subclass of nn.Conv2d, got {cls!r}")
    if not callable(adapter):
        raise TypeError(f"adapter must be a callable (conv) -> ConvAdaptation | str, got {type(adapter).__name__}")
    _ADAPTERS[cls] = adapter


def _same_pad(conv: nn.Conv2d) -> SamePadding:
    return SamePadding(conv.kernel_size, conv.stride, conv.dilation)


def _zero_padding(conv: nn.Conv2d) -> str | None:
    if tuple(conv.padding) != (0, 0) or conv.padding_mode != "zeros":
        return f"dynamic 'same' padding together with padding {conv.padding} / padding_mode {conv.padding_mode!r}"
    return None


def _adapt_conv2d_same(conv: nn.Conv2d) -> ConvAdaptation | str:
    return _zero_padding(conv) or ConvAdaptation(input_padding=_same_pad(conv))


def _adapt_std_conv(conv: nn.Conv2d) -> ConvAdaptation | str:
    eps = getattr(conv, "eps", None)
    if not isinstance(eps, float) or eps <= 0:
        return f"no positive float eps (got {eps!r})"
    gain, scale = getattr(conv, "gain", None), getattr(conv, "scale", 1.0)
    if gain is not None and (not isinstance(gain, torch.Tensor) or tuple(gain.shape) != (conv.out_channels, 1, 1, 1)):
        return f"gain of shape {list(getattr(gain, 'shape', []))}, expected [{conv.out_channels}, 1, 1, 1]"
    if not isinstance(scale, (int, float)):
        return f"scale {scale!r} is not a number"
    padding = None
    if getattr(conv, "same_pad", False):
        reason = _zero_padding(conv)
        if reason:
            return reason
        padding = _same_pad(conv)
    return ConvAdaptation(StandardizedWeight(eps, gain, float(scale)), padding)


register_conv_subclass(SphereConv2d, lambda conv: "a SphereNet-normalised convolution (divided by the input patch "
                                                  "norm), not w^T x")

for _name, _adapter in (("conv2d_same.Conv2dSame", _adapt_conv2d_same), ("std_conv.StdConv2d", _adapt_std_conv),
                        ("std_conv.StdConv2dSame", _adapt_std_conv), ("std_conv.ScaledStdConv2d", _adapt_std_conv),
                        ("std_conv.ScaledStdConv2dSame", _adapt_std_conv)):
    _TIMM_ADAPTERS[_name] = _adapter


def _adapter_for(conv: nn.Conv2d) -> Adapter | None:
    cls = type(conv)
    if cls in _ADAPTERS:
        return _ADAPTERS[cls]
    module = cls.__module__
    if module.startswith("timm."):  # timm.layers.std_conv, timm.models.layers.std_conv, ...
        return _TIMM_ADAPTERS.get(f"{module.rsplit('.', 1)[-1]}.{cls.__name__}")
    return None


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fold(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every static :class:`NSConv2d` by the ``nn.Conv2d`` computing the same function.

    Each layer's weight becomes ``W'[o, c, q] = sum_p T(W)[o, c, p] M[p, q]`` (its
    :meth:`NSConv2d.effective_weight`, ``T`` its weight transform if it has one); geometry, padding
    mode and bias are kept, so outputs match up to float rounding and the folded model costs exactly a
    plain CNN. A layer with an ``input_padding`` (converted from a 'same'-padding subclass) becomes
    ``nn.Sequential(input_padding, conv)``. Dynamic layers are left as they are (their ``M`` depends on
    the input).

    Args:
        module: a model (or a single :class:`NSConv2d`).
        inplace: modify ``module`` itself instead of a deep copy.
    Returns:
        The folded model (``module`` itself when ``inplace``; a new module when ``module`` is a single
        static layer).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fold expects an nn.Module, got {type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)

    def pick(_name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, NSConv2d):
            return None
        conv = nn.Conv2d(**_conv_args(child))
        conv.weight.copy_(child.effective_weight())
        if child.bias is not None:
            conv.bias.copy_(child.bias)
        conv.train(child.training)
        if child.input_padding is not None:
            return nn.Sequential(child.input_padding, conv)
        return conv

    replaced = pick("", module)
    if replaced is not None:
        return replaced
    _replace(module, pick)
    return module


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def convert(module: nn.Module, kind: str = "static-diagonal", *,
            include: Callable[[str, nn.Conv2d], bool] | None = None, inplace: bool = False,
            predictor_norm: str | Callable[[str, nn.Conv2d], str] | None = None, **layer_kwargs) -> nn.Module:
    """Replace the convolutions of any model by NSL layers computing the same function.

    Every ``nn.Conv2d`` whose kernel is larger than 1x1 (or, with ``include``, every one for which
    ``include(qualified_name, conv)`` is true) becomes a layer of kind ``kind`` (a name of
    :data:`nsl.layers.LAYER_KINDS`, e.g. ``'static-full'``, ``'dynamic-diagonal'``) with the same
    geometry, padding mode, device and dtype, and a copy of its weight and bias. Static ``M`` starts
    at the identity, dynamic predictors with ``g = 0`` exactly and the dynamic filter's mixing at
    zero, so the converted model computes the same function as the original at conversion, in train
    and in eval mode.

    ``nn.Conv2d`` subclasses whose forward is a plain convolution of a transformed weight and/or an
    input padded in forward (timm's ``Conv2dSame``, ``StdConv2d``, ``ScaledStdConv2d``, and any
    registered with :func:`register_conv_subclass`) are converted keeping that transform (the layer's
    ``weight_transform`` / ``input_padding``). Other subclasses are skipped: one warning names each
    skipped layer and why, and a warning says when nothing was converted. NSL layers already in the
    model (and their predictors) are left as they are.

    Predictors are built with GroupNorm (``predictor_norm='group'``) unless told otherwise: convert
    cannot know how the model will be trained (detection and segmentation train with 1-4 images per
    device, often with frozen batch norms, and a feature pyramid's top level is 1x1), and the authors'
    BatchNorm needs batch statistics (it raises on a single value per channel in training). GroupNorm's
    statistics are per sample, so the converted layers train at any batch size and compute the same in
    train and eval mode. ``predictor_norm='batch'`` builds the authors' BatchNorm (as the models of
    :func:`nsl.models.build_model` do by default).

    Args:
        module: any model, e.g. a torchvision-style ResNet.
        kind: the layer kind to build, a name of :data:`nsl.layers.LAYER_KINDS` other than ``'conv'``
            (default ``'static-diagonal'``).
        include: ``(name, conv) -> bool`` selecting the layers to convert.
        inplace: modify ``module`` itself instead of a deep copy.
        predictor_norm: the predictors' normalisation (dynamic kinds only): ``'group'`` (default),
            ``'batch'`` or ``'none'`` (:data:`nsl.layers.PREDICTOR_NORMS`), or a callable
            ``(name, conv) -> str`` choosing it per layer.
        **layer_kwargs: passed to every new layer (e.g. ``similarity_groups=2``, ``predictor_width=32``).
    Returns:
        The converted model.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> nsl.convert(model, kind="static-full")[0]
        NSConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), similarity='full')
        >>> detector = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
        >>> detector = nsl.convert(detector, kind="dynamic-diagonal")  # GroupNorm predictors: trains at batch 1
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    target = layer_kind(kind)
    if target.module not in _NSL_LAYERS:
        nsl_kinds = ", ".join(n for n, k in LAYER_KINDS.items() if k.module in _NSL_LAYERS)
        raise ValueError(f"convert: layer kind {target.name!r} is a plain nn.Conv2d, nothing to convert to; "
                         f"choose an NSL kind ({nsl_kinds})")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (name, conv) -> bool, got {type(include).__name__}")
    has_predictor = target.predictor is not None
    if predictor_norm is None:
        predictor_norm = "group"
    elif not has_predictor:
        with_predictor = ", ".join(n for n, k in LAYER_KINDS.items() if k.predictor is not None)
        raise ValueError(f"convert: predictor_norm applies to layer kinds with a predictor ({with_predictor}); "
                         f"{target.name!r} has none")
    elif not callable(predictor_norm):
        check_predictor_norm("convert", predictor_norm)
    if not inplace:
        module = copy.deepcopy(module)

    skipped: list[str] = []
    seen = {"convs": 0, "nsl": 0}

    def norm_for(name: str, child: nn.Conv2d) -> dict:
        if not has_predictor:
            return {}
        norm = predictor_norm(name, child) if callable(predictor_norm) else predictor_norm
        if not isinstance(norm, str) or norm not in PREDICTOR_NORMS:
            raise ValueError(f"convert: predictor_norm({name or 'the module'!r}, conv) returned {norm!r}; expected "
                             f"one of {', '.join(PREDICTOR_NORMS)}")
        return {"predictor_norm": norm}

    def build(name: str, child: nn.Conv2d, adaptation: ConvAdaptation | None) -> nn.Module:
        args = {**_conv_args(child), **norm_for(name, child)}
        geo = {k: args.pop(k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "bias")}
        new = make_conv(target, **geo, **args, **layer_kwargs)
        new.weight.copy_(child.weight)
        if child.bias is not None:
            new.bias.copy_(child.bias)
        if adaptation is not None:
            new.weight_transform = adaptation.weight_transform
            new.input_padding = adaptation.input_padding
        new.train(child.training)
        return new

    def pick(name: str, child: nn.Module) -> nn.Module | None:
        if isinstance(child, _NSL_LAYERS):
            seen["nsl"] += 1
            return None
        if not isinstance(child, nn.Conv2d):
            return None
        seen["convs"] += 1
        selected = include(name, child) if include is not None else child.kernel_size != (1, 1)
        if not selected:
            return None
        label = name or "the module"
        adaptation = None
        if type(child) is not nn.Conv2d:
            adapter = _adapter_for(child)
            if adapter is None:
                skipped.append(f"{label} ({type(child).__qualname__}: an nn.Conv2d subclass convert does not know, "
                               "its forward may not be a plain convolution; teach it with register_conv_subclass "
                               "from nsl.convert)")
                return None
            adaptation = adapter(child)
            if isinstance(adaptation, str):
                skipped.append(f"{label} ({type(child).__qualname__}: {adaptation})")
                return None
            if target.module is DynamicFilterConv2d:
                skipped.append(f"{label} ({type(child).__qualname__}: dynamic-filter layers take plain convolutions "
                               "only)")
                return None
        if target.module is DynamicFilterConv2d and (child.groups != 1 or child.padding_mode != "zeros"
                                                     or isinstance(child.padding, str)):
            skipped.append(f"{label} (dynamic-filter needs groups=1, numeric zero padding; got groups={child.groups}, "
                           f"padding={child.padding!r}, padding_mode={child.padding_mode!r})")
            return None
        return build(name, child, adaptation)

    replaced = pick("", module)
    if replaced is not None:
        count, module = 1, replaced
    elif isinstance(module, _NSL_LAYERS) or (isinstance(module, nn.Conv2d) and not module._modules):
        count = 0
    else:
        count = _replace(module, pick, descend=lambda m: not isinstance(m, _NSL_LAYERS))
    if skipped:
        warnings.warn(f"nsl.convert skipped {len(skipped)} layer(s): " + "; ".join(skipped), UserWarning,
                      stacklevel=3)
    if count == 0:
        why = [f"{seen['convs']} nn.Conv2d layer(s) found"]
        if seen["nsl"]:
            why.append(f"{seen['nsl']} layer(s) already NSL layers")
        rule = "selected by include" if include is not None else "with a kernel larger than 1x1"
        warnings.warn(f"nsl.convert converted no layer: no convertible nn.Conv2d {rule} ({', '.join(why)})",
                      UserWarning, stacklevel=3)
    return module
