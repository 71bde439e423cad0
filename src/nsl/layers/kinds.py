"""The table of layer kinds: every convolution a model can be built with, and what it is.

A *layer kind* names a convolution module and its options; it is the ``layer`` argument of
:func:`nsl.models.build_model` and the few-shot backbones, the ``layer`` field of the training
configs, the CLI's ``--layer`` and what :func:`nsl.convert` can build (``kind=``). Everything that
needs to know what a kind is reads :data:`LAYER_KINDS` (name -> :class:`LayerKind`); nothing parses
kind names.

=============================  ==========================================================================
``conv``                       ``nn.Conv2d``: the baseline
``static-diagonal``            :class:`NSConv2d`, ``M = diag(m)`` (a learned kernel shape)
``static-full``                :class:`NSConv2d`, full ``M``
``static-lowrank``             :class:`NSConv2d`, ``M = I + U V^T`` (option ``rank``, default 2)
``dynamic-diagonal``           :class:`DynamicNSConv2d`, diagonal ``M(y)``, the authors' sphere predictor
``dynamic-full``               :class:`DynamicNSConv2d`, full ``M(y)``, sphere predictor
``dynamic-diagonal-cosine``    :class:`DynamicNSConv2d`, diagonal ``M(y)``, cosine predictor (the
                               authors' best CIFAR model)
``dynamic-diagonal-light``     :class:`DynamicNSConv2d`, diagonal ``M(y)``, :class:`LightPredictor`
``dynamic-full-light``         :class:`DynamicNSConv2d`, full ``M(y)``, :class:`LightPredictor`
``dynamic-filter``             :class:`DynamicFilterConv2d`: a dynamic filter network layer (Jia et al. 2016)
=============================  ==========================================================================

Options every kind with a predictor takes (:func:`make_conv`, and through it the models):
``predictor_width`` (the predictor's hidden channels, the layers' ``hidden_channels``; default 64
for diagonal and 128 for full sphere/cosine predictors, 16 for the light one) and ``shared``
(a :class:`SharedPredictors`: layers built with one share one predictor per input width and
geometry, the paper's shared parametrisation) and ``predictor_norm`` (the predictor's normalisation,
:data:`~nsl.layers.dynamic.PREDICTOR_NORMS`: ``'batch'``, the authors' BatchNorm and the default of
the models; ``'group'``, GroupNorm, which needs no batch statistics and is :func:`nsl.convert`'s
default; ``'none'``) and ``predictor_stride`` (1; 2: ``g`` predicted on a half-resolution grid and
upsampled, :class:`~nsl.layers.predictor_grid.PooledPredictor`; 0: one ``g`` per image from the globally
pooled input; the ``DynamicNSConv2d`` kinds).
``paper=True`` selects the authors' initialisations (:attr:`LayerKind.paper_options`); otherwise every
NSL layer starts exactly as its plain convolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch.nn as nn

from .._geometry import pair
from ._checks import check_positive_int
from .dynamic import DynamicNSConv2d, check_predictor_norm
from .dynamic_filter import DynamicFilterConv2d
from .ns_conv import NSConv2d
from .predictor_grid import PooledPredictor, check_predictor_stride

__all__ = ["LayerKind", "LAYER_KINDS", "SharedPredictors", "layer_kind", "check_layer_kind", "make_conv",
           "predictor_scope"]


@dataclass(frozen=True)
class LayerKind:
    """One layer kind of :data:`LAYER_KINDS`: the module it builds and what that module is.

    Attributes:
        name: the kind's name (``'dynamic-diagonal'``).
        module: the class built (``nn.Conv2d``, :class:`NSConv2d`, :class:`DynamicNSConv2d`,
            :class:`DynamicFilterConv2d`).
        options: constructor keywords fixed by the kind (``{'similarity': 'diagonal', 'predictor': 'sphere'}``).
        paper_options: constructor keywords added by ``paper=True`` (the authors' initialisations).
        dynamic: the layer's ``M`` (or filter) is predicted from the input at every location.
        similarity: structure of ``M`` (``'diagonal'``, ``'full'``, ``'lowrank'``; the layer's
            ``similarity_kind``), or ``None`` for kinds without one (``conv``, ``dynamic-filter``).
        predictor: the built-in predictor (``'sphere'``, ``'cosine'``, ``'light'``) or ``None``.
        description: one line, for documentation and ``--help``.
    """

    name: str
    module: type[nn.Module]
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    paper_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    dynamic: bool = False
    similarity: str | None = None
    predictor: str | None = None
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "paper_options", MappingProxyType(dict(self.paper_options)))

    @property
    def foldable(self) -> bool:
        """A static ``M`` that :func:`nsl.fold` folds into a plain convolution's weight."""
        return self.module is NSConv2d

    @property
    def kernel_shape(self) -> bool:
        """Layers of this kind take a kernel-shape gate (:mod:`nsl.shape`): static and dynamic NSL layers."""
        return self.module in (NSConv2d, DynamicNSConv2d)

    @property
    def per_filter_shape(self) -> bool:
        """Layers of this kind take a per-filter kernel shape (``[C_out, P]``): not dynamic full ``M``."""
        return self.kernel_shape and not (self.dynamic and self.similarity == "full")


def _kinds(*kinds: LayerKind) -> Mapping[str, LayerKind]:
    return MappingProxyType({k.name: k for k in kinds})


_STATIC_PAPER = {"similarity_init": "authors"}
_DYNAMIC_PAPER = {"predictor_init": "authors"}

#: Layer kind name -> :class:`LayerKind`, in the order of the documentation (read-only).
LAYER_KINDS: Mapping[str, LayerKind] = _kinds(
    LayerKind("conv", nn.Conv2d, description="nn.Conv2d, the baseline"),
    LayerKind("static-diagonal", NSConv2d, {"similarity": "diagonal"}, _STATIC_PAPER, similarity="diagonal",
              description="static NSL, M = diag(m): a learned kernel shape"),
    LayerKind("static-full", NSConv2d, {"similarity": "full"}, _STATIC_PAPER, similarity="full",
              description="static NSL, full M"),
    LayerKind("static-lowrank", NSConv2d, {"similarity": "lowrank"}, _STATIC_PAPER, similarity="lowrank",
              description="static NSL, M = I + U V^T (rank 2 unless rank= is given)"),
    LayerKind("dynamic-diagonal", DynamicNSConv2d, {"similarity": "diagonal", "predictor": "sphere"}, _DYNAMIC_PAPER,
              dynamic=True, similarity="diagonal", predictor="sphere",
              description="dynamic NSL, diagonal M(y), the authors' sphere predictor"),
    LayerKind("dynamic-full", DynamicNSConv2d, {"similarity": "full", "predictor": "sphere"}, _DYNAMIC_PAPER,
              dynamic=True, similarity="full", predictor="sphere",
              description="dynamic NSL, full M(y), sphere predictor"),
    LayerKind("dynamic-diagonal-cosine", DynamicNSConv2d, {"similarity": "diagonal", "predictor": "cosine"},
              _DYNAMIC_PAPER, dynamic=True, similarity="diagonal", predictor="cosine",
              description="dynamic NSL, diagonal M(y), cosine predictor (the authors' best CIFAR model)"),
    LayerKind("dynamic-diagonal-light", DynamicNSConv2d, {"similarity": "diagonal", "predictor": "light"},
              _DYNAMIC_PAPER, dynamic=True, similarity="diagonal", predictor="light",
              description="dynamic NSL, diagonal M(y), light predictor (depthwise + two 1x1 convs)"),
    LayerKind("dynamic-full-light", DynamicNSConv2d, {"similarity": "full", "predictor": "light"}, _DYNAMIC_PAPER,
              dynamic=True, similarity="full", predictor="light",
              description="dynamic NSL, full M(y), light predictor"),
    LayerKind("dynamic-filter", DynamicFilterConv2d, {}, _DYNAMIC_PAPER, dynamic=True, predictor="sphere",
              description="dynamic filter network layer (Jia et al. 2016), the sphere predictor's filters"),
)


def layer_kind(kind) -> LayerKind:
    """The :class:`LayerKind` named ``kind`` (a :class:`LayerKind` is returned as it is).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if isinstance(kind, LayerKind):
        return kind
    if isinstance(kind, str) and kind in LAYER_KINDS:
        return LAYER_KINDS[kind]
    raise ValueError(f"unknown layer kind {kind!r}; valid kinds: {', '.join(LAYER_KINDS)}")


def check_layer_kind(kind: str) -> str:
    """Return ``kind`` if it is a known layer kind name, else raise ValueError listing the valid ones."""
    return layer_kind(kind).name


class SharedPredictors:
    """A scope in which dynamic layers share their predictors (the paper's shared parametrisation).

    Every layer built by :func:`make_conv` with ``shared=scope`` looks up a predictor for its
    layer kind, input channels, kernel size, stride, padding, dilation, predictor width,
    initialisation, device and dtype: the first such layer builds it, the later ones reuse the same
    module, so its parameters (and batch-norm statistics) are one set, counted once by
    ``model.parameters()``. The models open one scope per stage (``share_predictor=True``).
    """

    def __init__(self) -> None:
        self._predictors: dict[tuple, nn.Module] = {}

    def __len__(self) -> int:
        return len(self._predictors)

    def predictors(self) -> list[nn.Module]:
        """The distinct predictor modules of this scope, in creation order."""
        return list(self._predictors.values())

    def get(self, key: tuple) -> nn.Module | None:
        """The predictor stored under ``key``, or ``None``."""
        return self._predictors.get(key)

    def add(self, key: tuple, predictor: nn.Module) -> None:
        """Store ``predictor`` under ``key`` (the first layer of that geometry built it)."""
        self._predictors[key] = predictor


def predictor_scope(kind: str | LayerKind, share_predictor: bool) -> SharedPredictors | None:
    """A new :class:`SharedPredictors` scope if ``share_predictor`` (models call it once per stage), else ``None``.

    Raises:
        ValueError: ``share_predictor`` for a kind without a predictor (the message lists those with one).
    """
    k = layer_kind(kind)
    if not isinstance(share_predictor, bool):
        raise ValueError(f"share_predictor must be True or False, got {share_predictor!r}")
    if not share_predictor:
        return None
    if k.predictor is None:
        raise ValueError(f"share_predictor applies to layer kinds with a predictor ("
                         f"{', '.join(n for n, v in LAYER_KINDS.items() if v.predictor is not None)}), got {k.name!r}")
    return SharedPredictors()


def _geometry_key(kind: LayerKind, in_channels, kernel_size, stride, padding, options: dict) -> tuple:
    pad = padding if isinstance(padding, str) else pair(padding)
    return (kind.name, in_channels, pair(kernel_size), pair(stride), pad, pair(options.get("dilation", 1)),
            options.get("hidden_channels"), options.get("predictor_init", "zero"), options.get("predictor_bias", True),
            options.get("predictor_norm", "batch"), options.get("padding_mode", "zeros"),
            options.get("predictor_stride", 1),
            str(options.get("device")), str(options.get("dtype")))


def make_conv(kind: str | LayerKind, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
              bias: bool = True, paper: bool = False, predictor_width: int | None = None,
              shared: SharedPredictors | None = None, predictor_bias: bool = True, predictor_norm: str = "batch",
              predictor_stride: int = 1, **options) -> nn.Module:
    """A convolution of layer kind ``kind`` (see :data:`LAYER_KINDS`) with ``nn.Conv2d``'s geometry.

    Args:
        kind: a name of :data:`LAYER_KINDS` (or a :class:`LayerKind`).
        in_channels, out_channels, kernel_size, stride, padding, bias: as ``nn.Conv2d``.
        paper: the authors' initialisations (static ``similarity_init='authors'``, dynamic
            ``predictor_init='authors'``) instead of the exact-identity start.
        predictor_width: hidden channels of the predictor (kinds with a predictor only; ``None``:
            the predictor's default). The layers' own name for it, ``hidden_channels``, is accepted too.
        shared: a :class:`SharedPredictors` scope: layers of equal input channels and geometry built
            with the same scope share one predictor (kinds with a predictor only).
        predictor_bias: ``False``: the predictor's convs have no bias (the authors' code has none);
            nothing to do for kinds without a predictor.
        predictor_norm: the predictor's normalisation, ``'batch'`` (default: the authors' BatchNorm),
            ``'group'`` (GroupNorm, no batch statistics: trains at batch 1) or ``'none'``; kinds with
            a predictor only (another value than ``'batch'`` for a kind without one is an error).
        predictor_stride: 1 (default: ``g`` predicted at every output location) or 2: the predictor reads
            the input average-pooled by 2 and its ``g`` is upsampled (nearest) to the output grid
            (:class:`~nsl.layers.predictor_grid.PooledPredictor`, about 4x fewer predictor multiply-adds);
            0 (global): one ``g`` per image, predicted from the input averaged over all locations;
            kinds built on :class:`DynamicNSConv2d` only.
        **options: passed to the layer (e.g. ``dilation``, ``groups``, ``rank``, ``similarity_groups``).

    Returns:
        ``kind.module(in_channels, out_channels, kernel_size, stride=, padding=, bias=, **kind.options, ...)``.

    Raises:
        ValueError: unknown kind, unknown ``predictor_norm`` or ``predictor_stride``, or a predictor option for a
            kind without a predictor.
    """
    k = layer_kind(kind)
    options = dict(options)
    check_predictor_norm("make_conv", predictor_norm)
    check_predictor_stride("make_conv", predictor_stride)
    if predictor_stride != 1 and k.module is not DynamicNSConv2d:
        raise ValueError(f"make_conv: predictor_stride={predictor_stride} applies to the dynamic NSL kinds ("
                         f"{', '.join(n for n, v in LAYER_KINDS.items() if v.module is DynamicNSConv2d)}), "
                         f"got {k.name!r}")
    if predictor_width is not None:
        check_positive_int("make_conv", "predictor_width", predictor_width)
        if options.get("hidden_channels", predictor_width) != predictor_width:
            raise ValueError(f"make_conv: predictor_width={predictor_width} and hidden_channels="
                             f"{options['hidden_channels']} name one option; give one of them")
        options["hidden_channels"] = predictor_width
    if k.predictor is None and ("hidden_channels" in options or shared is not None or predictor_norm != "batch"):
        with_predictor = ", ".join(n for n, v in LAYER_KINDS.items() if v.predictor is not None)
        given = ("shared" if shared is not None else "predictor_width" if "hidden_channels" in options
                 else f"predictor_norm={predictor_norm!r}")
        raise ValueError(f"layer kind {k.name!r} has no predictor, so {given} does not apply; kinds with a "
                         f"predictor: {with_predictor}")
    if shared is not None and not isinstance(shared, SharedPredictors):
        raise TypeError(f"make_conv: shared must be a SharedPredictors scope, got {type(shared).__name__}")
    for name in k.options:
        if name in options:
            raise ValueError(f"make_conv: layer kind {k.name!r} sets {name}={k.options[name]!r}; choose another "
                             f"kind instead of passing {name}={options[name]!r}")
    if not predictor_bias and k.predictor is not None:
        options["predictor_bias"] = False
    if predictor_norm != "batch":  # a kind with a predictor (checked above)
        options["predictor_norm"] = predictor_norm
    if paper:
        options = {**k.paper_options, **options}
    key = None
    if shared is not None:
        key = _geometry_key(k, in_channels, kernel_size, stride, padding, {**options, "predictor_stride":
                                                                             predictor_stride})
        predictor = shared.get(key)
        if predictor is not None:
            options["predictor"] = predictor
            options.pop("hidden_channels", None)
            options.pop("predictor_norm", None)
    layer = k.module(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                     **{**k.options, **options})
    if predictor_stride != 1 and not isinstance(layer.predictor, PooledPredictor):  # not a shared one, wrapped
        layer.predictor = PooledPredictor(layer.predictor, layer.kernel_size, layer.stride, layer.padding,
                                          layer.dilation, predictor_stride)
    if key is not None and shared.get(key) is None:
        shared.add(key, layer.predictor)
    return layer
