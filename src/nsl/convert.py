"""Model surgery: turn convolutions into NSL layers (:func:`convert`) and back (:func:`fold`)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from .layers import DYNAMIC_SIMILARITIES, PREDICTORS, STATIC_SIMILARITIES, DynamicNSConv2d, NSConv2d

__all__ = ["fold", "convert"]


def _conv_args(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)


def _replace(root: nn.Module, pick: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace every submodule for which ``pick(name, module)`` returns a new module; count them.

    A module reachable under several names (shared) is replaced once, by the same new module.
    """
    done: dict[int, nn.Module] = {}
    count = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if id(child) in done:
                setattr(module, child_name, done[id(child)])
                continue
            new = pick(full, child)
            if new is not None:
                done[id(child)] = new
                setattr(module, child_name, new)
                count += 1
    return count


@torch.no_grad()
def fold(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every static :class:`NSConv2d` by the ``nn.Conv2d`` computing the same function.

    Each layer's weight becomes ``W'[o, c, q] = sum_p W[o, c, p] M[p, q]`` (its
    :meth:`NSConv2d.effective_weight`); geometry, padding mode and bias are kept, so outputs match
    up to float rounding and the folded model costs exactly a plain CNN. Dynamic layers are left
    as they are (their ``M`` depends on the input).

    Args:
        module: a model (or a single :class:`NSConv2d`).
        inplace: modify ``module`` itself instead of a deep copy.
    Returns:
        The folded model (``module`` itself when ``inplace``; a new ``nn.Conv2d`` when ``module``
        is a single static layer).
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
        return conv

    replaced = pick("", module)
    if replaced is not None:
        return replaced
    _replace(module, pick)
    return module


@torch.no_grad()
def convert(module: nn.Module, similarity: str = "diagonal", dynamic: bool = False,
            predictor: str = "sphere", include: Callable[[str, nn.Conv2d], bool] | None = None,
            inplace: bool = False, **layer_kwargs) -> nn.Module:
    """Replace the ``nn.Conv2d`` layers of any model by NSL layers computing the same function.

    Every plain ``nn.Conv2d`` whose kernel is larger than 1x1 (or, with ``include``, every one for
    which ``include(qualified_name, conv)`` is true) becomes an :class:`NSConv2d` (``dynamic=False``)
    or a :class:`DynamicNSConv2d` (``dynamic=True``) with the same geometry, padding mode, device
    and dtype, and a copy of its weight and bias. Static ``M`` starts at the identity and dynamic
    predictors start with ``g = 0`` exactly, so the converted model computes the same function as
    the original at conversion, in train and in eval mode.

    Args:
        module: any model, e.g. a torchvision-style ResNet.
        similarity: ``'identity' | 'diagonal' | 'full' | 'lowrank'`` (static) or
            ``'diagonal' | 'full'`` (dynamic).
        dynamic: build :class:`DynamicNSConv2d` layers.
        predictor: the dynamic predictor (``'sphere' | 'cosine' | 'light'``).
        include: ``(name, conv) -> bool`` selecting the layers to convert.
        inplace: modify ``module`` itself instead of a deep copy.
        **layer_kwargs: passed to every new layer (e.g. ``similarity_groups=2``, ``hidden_channels=32``).
    Returns:
        The converted model.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> nsl.convert(model, "full")[0]
        NSConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), similarity='full')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    valid = DYNAMIC_SIMILARITIES if dynamic else STATIC_SIMILARITIES
    if similarity not in valid:
        raise ValueError(f"unknown similarity {similarity!r} for a {'dynamic' if dynamic else 'static'} layer; "
                         f"expected one of {', '.join(valid)}")
    if dynamic and not isinstance(predictor, str):
        raise TypeError("convert builds one predictor per layer: pass a predictor name "
                        f"({', '.join(PREDICTORS)}), not a module")
    if dynamic and predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; expected one of {', '.join(PREDICTORS)}")
    if include is not None and not callable(include):
        raise TypeError(f"include must be a callable (name, conv) -> bool, got {type(include).__name__}")
    if not inplace:
        module = copy.deepcopy(module)

    def pick(name: str, child: nn.Module) -> nn.Module | None:
        if type(child) is not nn.Conv2d:  # plain convolutions only, not NSL layers or other subclasses
            return None
        selected = include(name, child) if include is not None else child.kernel_size != (1, 1)
        if not selected:
            return None
        args = _conv_args(child)
        if dynamic:
            new = DynamicNSConv2d(**args, similarity=similarity, predictor=predictor, **layer_kwargs)
        else:
            new = NSConv2d(**args, similarity=similarity, **layer_kwargs)
        new.weight.copy_(child.weight)
        if child.bias is not None:
            new.bias.copy_(child.bias)
        new.train(child.training)
        return new

    if type(module) is nn.Conv2d:
        replaced = pick("", module)
        return module if replaced is None else replaced
    _replace(module, pick)
    return module
