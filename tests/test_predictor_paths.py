"""The predictors' fast forward paths compute what the predictors computed before them.

``_frozen_predictor`` is a frozen copy of the predictor math as it was before the fast paths
(written with ``F.conv2d`` from the formulas, the patch norm as ``conv(x*x, ones)``, the norms as
the modules themselves), so the layers are checked in float64 against it for every predictor,
diagonal and full ``M``, every normalisation, train and eval mode: output, every gradient and the
norms' running statistics after the step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nsl
from nsl.functional import ns_conv2d


def _frozen_sphere_conv(x, conv):
    """``conv(x, w / ||w||?) / sqrt(conv(x*x, 1) + eps) + b`` (SphereConv2d, groups 1, zero padding)."""
    w = conv.weight
    if conv.normalize_weight:
        w = w / torch.sqrt(w.pow(2).sum((1, 2, 3), keepdim=True) + conv.eps)
    geometry = (conv.stride, conv.padding, conv.dilation)
    ones = torch.ones(1, *w.shape[1:], dtype=w.dtype)
    out = F.conv2d(x, w, None, *geometry) / torch.sqrt(F.conv2d(x * x, ones, None, *geometry) + conv.eps)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def _frozen_predictor(p, x):
    """``g(x)`` as the predictors computed it before their fast paths."""
    if isinstance(p, nsl.LightPredictor):
        geometry = (p.dw.stride, p.dw.padding, p.dw.dilation)
        h = F.relu(p.bn0(F.conv2d(x, p.dw.weight, None, *geometry, groups=p.dw.groups)))
        h = F.relu(p.bn1(F.conv2d(h, p.pw.weight)))
        return torch.tanh(F.conv2d(h, p.out.weight, p.out.bias))
    h = F.relu(p.bn1(_frozen_sphere_conv(x, p.conv1)))
    if isinstance(p.conv2, nsl.SphereConv2d):
        return p.bn2(_frozen_sphere_conv(h, p.conv2))
    return p.bn2(F.conv2d(h, p.conv2.weight, p.conv2.bias, p.conv2.stride, p.conv2.padding, p.conv2.dilation))


def _frozen_layer(layer, x):
    g = _frozen_predictor(layer.predictor, x)
    P = layer.kernel_size[0] * layer.kernel_size[1]
    if layer.similarity_kind == "diagonal":
        sim = g + 1.0
    else:
        sim = g.view(g.shape[0], P, P, *g.shape[2:]) + torch.eye(P, dtype=g.dtype).view(1, P, P, 1, 1)
    return ns_conv2d(x, layer.weight, sim, layer.bias, layer.stride, layer.padding, layer.dilation)


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial parameters and running statistics (so a folded norm is not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            elif name.endswith("weight") and t.dim() == 1:  # a norm's scale
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _check_train_then_eval(layer: nn.Module, x: torch.Tensor, *, rtol: float, atol: float,
                           parameters_and_buffers: bool) -> None:
    """``layer`` against a frozen-math copy of itself, in train then eval mode: outputs and x-gradients (for a
    random output gradient) and, with ``parameters_and_buffers``, every parameter's gradient and every buffer
    (the running statistics) after each pass."""
    frozen = copy.deepcopy(layer)
    for training in (True, False):
        layer.train(training)
        frozen.train(training)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, expected = layer(xa), _frozen_layer(frozen, xb)
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
        gout = torch.randn_like(out)
        out.backward(gout)
        expected.backward(gout)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol, atol=atol)
        if not parameters_and_buffers:
            continue
        for (name, p), q in zip(layer.named_parameters(), frozen.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
            p.grad = q.grad = None
        for (name, b), c in zip(layer.named_buffers(), frozen.buffers()):
            torch.testing.assert_close(b, c, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


GEOMETRIES = {  # kernel, stride, padding, dilation
    "3x3": (3, 1, 1, 1),
    "3x5/s2/d2": ((3, 5), 2, (1, 2), (2, 1)),
}


@pytest.mark.parametrize("norm,geometry", [("batch", "3x3"), ("batch", "3x5/s2/d2"), ("group", "3x5/s2/d2"),
                                           ("none", "3x3")])
@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("predictor", ["sphere", "cosine", "light"])
def test_layer_matches_frozen_math_train_and_eval(predictor, similarity, norm, geometry):
    kernel, stride, padding, dilation = GEOMETRIES[geometry]
    torch.manual_seed(0)
    layer = nsl.DynamicNSConv2d(5, 4, kernel, stride, padding, dilation, similarity=similarity, predictor=predictor,
                                predictor_init="authors", predictor_norm=norm, dtype=torch.float64)
    _randomise(layer, 1)
    _check_train_then_eval(layer, torch.randn(2, 5, 9, 8, dtype=torch.float64), rtol=1e-10, atol=1e-12,
                           parameters_and_buffers=True)


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("predictor", ["sphere", "cosine", "light"])
def test_inference_paths_match_frozen_math(predictor, similarity):
    """Eval mode without gradients (where the fast paths may work in place), a channels-last and a
    non-contiguous input, and weights changed between calls (nothing stale is reused)."""
    torch.manual_seed(0)
    layer = nsl.DynamicNSConv2d(6, 4, 3, padding=1, similarity=similarity, predictor=predictor,
                                predictor_init="authors", dtype=torch.float64).eval()
    _randomise(layer, 2)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    strided = torch.randn(2, 6, 9, 18, dtype=torch.float64)[..., ::2]
    inputs = [x, x.contiguous(memory_format=torch.channels_last), strided]
    with torch.no_grad():
        for xi in inputs:
            torch.testing.assert_close(layer(xi), _frozen_layer(layer, xi), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(layer.predictor(xi), _frozen_predictor(layer.predictor, xi),
                                       rtol=1e-10, atol=1e-12)
        _randomise(layer, 3)  # new weights and running statistics: the next call must see them
        torch.testing.assert_close(layer(x), _frozen_layer(layer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("predictor", ["sphere", "cosine", "light"])
def test_float32_channels_last_path_matches_frozen_math(predictor, similarity):
    """The float32 CPU path (where the predictors run channels-last) against the frozen math, train and
    eval; ``g`` comes back contiguous."""
    torch.manual_seed(0)
    layer = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity=similarity, predictor=predictor,
                                predictor_init="authors")
    _randomise(layer, 4)
    x = torch.randn(4, 8, 12, 12)
    _check_train_then_eval(layer, x, rtol=1e-4, atol=1e-4, parameters_and_buffers=False)
    assert layer.predictor(x).is_contiguous()  # (eval mode: changes no running statistics)
