"""Layer kinds of the model zoo (kept for compatibility: the table lives in :mod:`nsl.layers.kinds`).

``from nsl.models.layers import make_conv, LAYER_KINDS, check_layer_kind, DynamicFilterConv2d`` keeps
working; :data:`LAYER_KINDS` maps each kind's name to its :class:`~nsl.layers.LayerKind`.
"""

from __future__ import annotations

from ..layers.dynamic_filter import DynamicFilterConv2d
from ..layers.kinds import (
    LAYER_KINDS,
    LayerKind,
    SharedPredictors,
    check_layer_kind,
    layer_kind,
    make_conv,
    predictor_scope,
)

__all__ = ["LAYER_KINDS", "LayerKind", "SharedPredictors", "DynamicFilterConv2d", "make_conv", "check_layer_kind",
           "layer_kind", "predictor_scope"]
