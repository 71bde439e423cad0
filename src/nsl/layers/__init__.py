"""NSL layers: modules mirroring ``nn.Conv2d``, and the table of layer kinds (:mod:`nsl.layers.kinds`)."""

from .attention import GlobalSimilarity2d
from .dynamic import (
    DYNAMIC_SIMILARITIES,
    PREDICTOR_NORMS,
    PREDICTORS,
    DynamicNSConv2d,
    LightPredictor,
    SimilarityPredictor,
)
from .dynamic_filter import DynamicFilterConv2d
from .kinds import (
    LAYER_KINDS,
    LayerKind,
    SharedPredictors,
    check_layer_kind,
    layer_kind,
    make_conv,
    predictor_scope,
)
from .ns_conv import STATIC_SIMILARITIES, NSConv2d
from .predictor_grid import (
    PREDICTOR_STRIDES,
    PooledPredictor,
    PredictionView,
    SharedPrediction,
    SharedPredictionStage,
)
from .sphere import SphereConv2d

__all__ = [
    "NSConv2d",
    "DynamicNSConv2d",
    "DynamicFilterConv2d",
    "SphereConv2d",
    "GlobalSimilarity2d",
    "SimilarityPredictor",
    "LightPredictor",
    "STATIC_SIMILARITIES",
    "DYNAMIC_SIMILARITIES",
    "PREDICTORS",
    "PREDICTOR_NORMS",
    "LAYER_KINDS",
    "LayerKind",
    "SharedPredictors",
    "layer_kind",
    "check_layer_kind",
    "make_conv",
    "predictor_scope",
    "PREDICTOR_STRIDES",
    "PooledPredictor",
    "SharedPrediction",
    "PredictionView",
    "SharedPredictionStage",
]
