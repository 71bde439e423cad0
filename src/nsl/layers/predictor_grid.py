"""Cheaper dynamic predictions: ``g`` on a coarser grid, and one ``g`` per stage shared by its layers.

Two ways to pay less for the predictor ``g`` of :class:`~nsl.layers.DynamicNSConv2d` without changing
the layer itself (issue 17, part 3):

* :class:`PooledPredictor` (``predictor_stride=2`` of :func:`nsl.layers.make_conv` and the models):
  the predictor reads the input average-pooled by ``s`` and its ``g`` is upsampled (nearest) to the
  layer's output grid, so each ``s x s`` block of output locations shares one ``M``; the predictor's
  multiply-adds fall about ``s * s`` times. ``predictor_stride=0`` is the global limit: the predictor reads
  the input averaged over all locations, so each image has one ``M`` (the context that DyConv, CondConv and
  ODConv read) and the predictor costs next to nothing.
* :class:`SharedPrediction` / :class:`SharedPredictionStage` (``share_prediction=True`` of CNN-9): one
  prediction computed once from a stage's input and reused by every dynamic layer of the stage (the
  paper's shared parametrisation with the prediction itself shared, not only the predictor's weights).
  Each layer's ``predictor`` is then a :class:`PredictionView` of the stage's prediction.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["PREDICTOR_STRIDES", "check_predictor_stride", "PooledPredictor", "SharedPrediction", "PredictionView",
           "SharedPredictionStage"]

#: the predictor strides :func:`nsl.layers.make_conv` takes: 1 (``g`` at the layer's output resolution), 2 (``g`` on
#: a half-resolution grid) or 0 (global: one ``g`` per image, from the input averaged over all locations)
PREDICTOR_STRIDES = (0, 1, 2)


def check_predictor_stride(owner: str, stride) -> None:
    """Raise ``ValueError`` unless ``stride`` is one of :data:`PREDICTOR_STRIDES` (a Python ``int``, not a bool)."""
    if isinstance(stride, bool) or stride not in PREDICTOR_STRIDES:
        raise ValueError(f"{owner}: predictor_stride must be one of {', '.join(map(str, PREDICTOR_STRIDES))}, "
                         f"got {stride!r}")


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class PooledPredictor(nn.Module):
    """A predictor run on a grid ``stride`` times coarser, its output upsampled to the layer's grid.

    ``g(x) = nearest_{H_out x W_out}(inner(avg_pool_s(x)))`` where ``avg_pool_s`` averages ``s x s``
    blocks (``ceil_mode``: a partial block at an odd edge averages what it has) and ``inner`` is a
    predictor built at the modulated layer's geometry (kernel, stride, padding, dilation), so it maps
    ``[N, C_in, ceil(H/s), ceil(W/s)]`` to about ``[N, P or P*P, H_out/s, W_out/s]``; nearest
    upsampling to ``(H_out, W_out)`` gives every ``s x s`` block of output locations the same ``M``.
    The inner predictor's multiply-adds fall about ``s * s`` times; pooling and upsampling have none.

    ``s = 0`` (global): ``avg_pool`` averages all ``H x W`` locations into one, the inner predictor reads
    that ``[N, C_in, 1, 1]`` map (its zero padding around it, so a "same"-padded layer's centre tap sees the
    mean and the others zeros) and its ``[N, P or P*P, 1, 1]`` is broadcast to every output location: one
    ``M`` per image. It needs ``2 * padding >= dilation * (kernel_size - 1)`` (an output from a 1 x 1 map).

    Args:
        inner: the predictor (e.g. a :class:`~nsl.layers.SimilarityPredictor`), attribute ``inner``.
        kernel_size, stride, padding, dilation: the modulated layer's geometry (for ``H_out, W_out``;
            ``padding`` numeric).
        predictor_stride: ``s``, 2 or 0 (global); 1 needs no wrapper.

    Shapes: ``x [N, C_in, H, W]`` -> ``g [N, P or P*P, H_out, W_out]``, ``H_out`` the layer's.
    """

    def __init__(self, inner: nn.Module, kernel_size, stride, padding, dilation, predictor_stride: int = 2):
        super().__init__()
        check_predictor_stride(type(self).__name__, predictor_stride)
        if predictor_stride == 1:
            raise ValueError("PooledPredictor: predictor_stride 1 is the inner predictor itself; use it unwrapped")
        if isinstance(padding, str):
            raise ValueError(f"PooledPredictor: needs a numeric padding, got {padding!r}")
        if predictor_stride == 0:
            for p, k, d in zip(_pair(padding), _pair(kernel_size), _pair(dilation)):
                if 2 * p < d * (k - 1):
                    raise ValueError(f"PooledPredictor: predictor_stride 0 (global) reads a 1 x 1 map, which needs "
                                     f"2 * padding >= dilation * (kernel_size - 1); got padding {padding}, "
                                     f"kernel_size {kernel_size}, dilation {dilation}")
        self.inner = inner
        self.predictor_stride = predictor_stride
        self.geometry = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
        # what DynamicNSConv2d reads from a given predictor module (its name and normalisation)
        self.kind = getattr(inner, "kind", None)
        self.norm = getattr(inner, "norm", None)

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry
        h_out, w_out = _out_size(x.shape[-2], kh, sh, ph, dh), _out_size(x.shape[-1], kw, sw, pw, dw)
        s = self.predictor_stride
        pooled = F.adaptive_avg_pool2d(x, 1) if s == 0 else F.avg_pool2d(x, s, s, ceil_mode=True)
        return F.interpolate(self.inner(pooled), size=(h_out, w_out), mode="nearest")

    def extra_repr(self) -> str:
        return f"predictor_stride={self.predictor_stride}" + (" (global)" if self.predictor_stride == 0 else "")


class SharedPrediction(nn.Module):
    """A stage's one prediction: ``g = predictor(x_stage)``, computed by :meth:`compute`, read by views.

    The stage (:class:`SharedPredictionStage`) calls :meth:`compute` on its input before its layers run
    and :meth:`clear` after; every layer's ``predictor`` is a :class:`PredictionView` returning that
    ``g``. ``predictor`` (a submodule: its parameters and statistics are the stage's, counted once)
    must map the stage input to the output grid of every layer that reads it.

    Shapes: ``x [N, C_stage, H, W]`` -> ``g [N, P or P*P, H_out, W_out]``.
    """

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor
        self.kind = getattr(predictor, "kind", None)
        self.norm = getattr(predictor, "norm", None)
        self._g: Tensor | None = None

    def compute(self, x: Tensor) -> Tensor:
        """Compute and hold ``g = predictor(x)`` for the views; returns it."""
        self._g = self.predictor(x)
        return self._g

    def clear(self) -> None:
        """Drop the held ``g`` (the stage calls it after its layers ran)."""
        self._g = None

    def view(self) -> PredictionView:
        """A new :class:`PredictionView` of this prediction (a layer's ``predictor``)."""
        return PredictionView(self)


class PredictionView(nn.Module):
    """A layer's ``predictor`` that returns its stage's :class:`SharedPrediction` ``g`` (ignoring its input
    but for the batch size). It holds the source without registering it, so the source's parameters
    appear once in the model (under the stage); calling the layer outside its stage's forward is an error.

    Shapes: ``x [N, C_in, H, W]`` -> the stage's ``g [N, P or P*P, H_out, W_out]``.
    """

    def __init__(self, source: SharedPrediction):
        super().__init__()
        object.__setattr__(self, "_source", source)  # not a submodule: the stage owns it
        self.kind, self.norm = source.kind, source.norm

    def forward(self, x: Tensor) -> Tensor:
        g = self._source._g
        if g is None:
            raise RuntimeError("this layer's similarity is its stage's shared prediction (share_prediction=True): "
                               "call the stage (SharedPredictionStage), not the layer alone")
        if g.shape[0] != x.shape[0]:
            raise RuntimeError(f"the stage's shared prediction has batch {g.shape[0]}, the layer's input "
                               f"{x.shape[0]}")
        return g


class SharedPredictionStage(nn.Sequential):
    """``nn.Sequential`` of a stage whose dynamic layers read one prediction computed from the stage's input.

    ``forward(x)``: ``prediction.compute(x)``, then the modules in order (``prediction`` excepted), then
    ``prediction.clear()``. Build it with the stage's modules and a :class:`SharedPrediction`; point each
    dynamic layer's ``predictor`` at ``prediction.view()`` (the layers must keep the grid the prediction is on).

    Shapes: those of the modules in order.
    """

    def __init__(self, *modules: nn.Module, prediction: SharedPrediction):
        super().__init__(*modules)
        self.prediction = prediction

    def forward(self, x: Tensor) -> Tensor:
        self.prediction.compute(x)
        try:
            for m in self.children():
                if m is not self.prediction:
                    x = m(x)
        finally:
            self.prediction.clear()
        return x
