"""NSL layers: modules mirroring ``nn.Conv2d``."""

from .attention import GlobalSimilarity2d
from .dynamic import DYNAMIC_SIMILARITIES, PREDICTORS, DynamicNSConv2d, LightPredictor, SimilarityPredictor
from .ns_conv import STATIC_SIMILARITIES, NSConv2d
from .sphere import SphereConv2d

__all__ = [
    "NSConv2d",
    "DynamicNSConv2d",
    "SphereConv2d",
    "GlobalSimilarity2d",
    "SimilarityPredictor",
    "LightPredictor",
    "STATIC_SIMILARITIES",
    "DYNAMIC_SIMILARITIES",
    "PREDICTORS",
]
