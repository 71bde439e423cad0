"""nsl: neural similarity learning for PyTorch.

Convolution generalised from the inner product ``w^T x`` to a learnable bilinear similarity
``w^T M x`` (Liu et al., "Neural Similarity Learning", NeurIPS 2019): ``M`` learned (static NSL,
:class:`NSConv2d`) or predicted per location by a small network (dynamic NSL,
:class:`DynamicNSConv2d`). :func:`fold` turns static layers back into ordinary convolutions and
:func:`convert` turns the convolutions of any model into NSL layers.
"""

from . import functional, regularizers, shape
from .convert import convert, fold, register_conv_subclass
from .functional import ns_conv2d, sphere_conv2d
from .layers import (
    LAYER_KINDS,
    DynamicFilterConv2d,
    DynamicNSConv2d,
    GlobalSimilarity2d,
    LightPredictor,
    NSConv2d,
    SimilarityPredictor,
    SphereConv2d,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "ns_conv2d",
    "sphere_conv2d",
    "NSConv2d",
    "DynamicNSConv2d",
    "SphereConv2d",
    "GlobalSimilarity2d",
    "regularizers",
    "shape",
    "SimilarityPredictor",
    "LightPredictor",
    "fold",
    "convert",
    "register_conv_subclass",
    "LAYER_KINDS",
    "DynamicFilterConv2d",
]
