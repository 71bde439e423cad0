"""Cheaper dynamic predictions (issue 17, part 3): ``predictor_stride=2`` (g on a half-resolution grid) and
CNN-9's ``share_prediction`` (one g per stage): float64 references, MAC counts, options and bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from nsl.layers import DynamicNSConv2d, PooledPredictor, SharedPredictionStage, make_conv
from nsl.models import build_model, count_parameters
from nsl.report import count_macs
from nsl.train.config import ConfigError, make_config
from reference import brute_ns_conv2d


def _randomise(module: nn.Module) -> None:
    """Non-zero parameters everywhere (the zero init makes g = 0, which would hide a wrong g)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _pool2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 block means, a partial block at an odd edge averaging what it has (explicit loops)."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, (h + 1) // 2, (w + 1) // 2, dtype=x.dtype)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(2, 3))
    return out


@pytest.mark.parametrize("predictor,size", [("sphere", 8), ("light", 7)])
def test_predictor_stride_2_matches_pooled_upsampled_reference(predictor, size):
    torch.manual_seed(0)
    kind = "dynamic-diagonal" if predictor == "sphere" else "dynamic-diagonal-light"
    layer = make_conv(kind, 3, 5, 3, padding=1, predictor_width=6, predictor_stride=2).double().eval()
    _randomise(layer)
    assert isinstance(layer.predictor, PooledPredictor) and layer.predictor_name == predictor
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    g_half = layer.predictor.inner(_pool2_ceil(x))  # [2, 9, ceil(size/2), ceil(size/2)]
    rows = torch.arange(size) // 2
    g = g_half[:, :, rows][:, :, :, rows]  # nearest: output location y reads the half-grid location y // 2
    assert g.abs().max() > 1e-3
    expected = brute_ns_conv2d(x, layer.weight, 1.0 + g, layer.bias, pad=(1, 1, 1, 1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_predictor_stride_2_on_a_strided_layer_lands_on_its_output_grid():
    layer = make_conv("dynamic-diagonal", 3, 4, 3, stride=2, padding=1, predictor_stride=2).double()
    _randomise(layer)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    assert layer.predictor(x).shape == (1, 9, 5, 5)
    assert layer(x).shape == (1, 4, 5, 5)


@pytest.mark.parametrize("predictor,stride", [("sphere", 1), ("light", 1), ("sphere", 2)])
def test_predictor_stride_0_is_one_prediction_per_image_from_the_mean(predictor, stride):
    torch.manual_seed(0)
    kind = "dynamic-diagonal" if predictor == "sphere" else "dynamic-diagonal-light"
    layer = make_conv(kind, 3, 5, 3, stride=stride, padding=1, predictor_width=6, predictor_stride=0).double().eval()
    _randomise(layer)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    mean = torch.stack([x[:, :, i, j] for i in range(7) for j in range(7)]).mean(0)[:, :, None, None]
    g_image = layer.predictor.inner(mean)  # [2, 9, 1, 1]: the centre tap reads the mean, the padding zeros
    assert g_image.shape == (2, 9, 1, 1) and g_image.abs().max() > 1e-3
    out = 4 if stride == 2 else 7
    g = g_image.expand(2, 9, out, out)
    expected = brute_ns_conv2d(x, layer.weight, 1.0 + g, layer.bias, pad=(1, 1, 1, 1), stride=(stride, stride))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert "predictor_stride=0 (global)" in repr(layer)


def test_predictor_stride_1_is_todays_layer():
    torch.manual_seed(3)
    a = make_conv("dynamic-diagonal", 3, 4, 3, padding=1, predictor_stride=1)
    torch.manual_seed(3)
    b = make_conv("dynamic-diagonal", 3, 4, 3, padding=1)
    assert type(a.predictor) is type(b.predictor) and not isinstance(a.predictor, PooledPredictor)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shared_predictors_keep_one_pooled_predictor_per_geometry():
    from nsl.layers import SharedPredictors

    scope = SharedPredictors()
    a = make_conv("dynamic-diagonal", 4, 4, 3, padding=1, shared=scope, predictor_stride=2)
    b = make_conv("dynamic-diagonal", 4, 4, 3, padding=1, shared=scope, predictor_stride=2)
    c = make_conv("dynamic-diagonal", 4, 4, 3, padding=1, shared=scope)
    assert a.predictor is b.predictor and isinstance(a.predictor, PooledPredictor)
    assert c.predictor is not a.predictor and not isinstance(c.predictor, PooledPredictor)


def test_count_macs_of_a_half_resolution_predictor():
    layer = make_conv("dynamic-diagonal", 4, 6, 3, padding=1, predictor_width=5, predictor_stride=2)
    conv = 6 * 4 * 9 * 64 + 4 * 9 * 64  # the convolution and the modulation of each patch by M(y), 8x8 output
    predictor = (5 * 4 * 9 + 4 * 9) * 16 + 9 * 5 * 9 * 16  # SphereConv (with its patch norm) and conv at 4x4
    assert count_macs(layer, (4, 8, 8)) == conv + predictor
    full = make_conv("dynamic-diagonal", 4, 6, 3, padding=1, predictor_width=5)
    assert count_macs(full, (4, 8, 8)) == conv + 4 * predictor


def _stage_reference(stage: SharedPredictionStage, x: torch.Tensor) -> torch.Tensor:
    """The stage by hand: g from the stage input, every NSL layer with M = 1 + g, BN (eval) and ReLU."""
    g = stage.prediction.predictor(x)
    for block in list(stage)[:3]:
        conv = block.conv
        x = brute_ns_conv2d(x, conv.weight, 1.0 + g, conv.bias, pad=(1, 1, 1, 1))
        x = torch.relu(block.bn(x))
    return nn.functional.max_pool2d(x, 2)


@pytest.mark.parametrize("stride", [1, 2])
def test_share_prediction_uses_the_stage_inputs_g_in_every_layer(stride):
    torch.manual_seed(0)
    model = build_model("cnn9", "dynamic-diagonal", width=4, image_size=8, share_prediction=True,
                        predictor_stride=stride, predictor_width=6).double().eval()
    _randomise(model)
    for s in (model.stage1, model.stage2, model.stage3):
        assert isinstance(s, SharedPredictionStage)
        assert all(isinstance(b.conv, DynamicNSConv2d) for b in list(s)[:3])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    h = model.stem(x)
    torch.testing.assert_close(model.stage1(h), _stage_reference(model.stage1, h), rtol=1e-10, atol=1e-10)
    h = model.stage1(h)
    torch.testing.assert_close(model.stage2(h), _stage_reference(model.stage2, h), rtol=1e-10, atol=1e-10)


def test_share_prediction_counts_one_predictor_per_stage():
    plain = build_model("cnn9", "dynamic-diagonal", width=4, image_size=8)
    shared = build_model("cnn9", "dynamic-diagonal", width=4, image_size=8, share_prediction=True)
    dropped_params = dropped_macs = 0
    side = 8
    for s in (1, 2, 3):
        blocks = list(getattr(plain, f"stage{s}"))[:3]
        for b in blocks[1:]:  # the second and third layers' predictors are dropped
            dropped_params += count_parameters(b.conv.predictor)
            dropped_macs += count_macs(b.conv.predictor, (b.conv.in_channels, side, side))
        side //= 2
    assert count_parameters(shared) == count_parameters(plain) - dropped_params
    assert count_macs(shared, (3, 8, 8)) == count_macs(plain, (3, 8, 8)) - dropped_macs
    # one state_dict entry per predictor parameter: the stage owns it, the layers' views hold none
    assert sum(".prediction.predictor." in k for k in shared.state_dict()) > 0
    assert not any(".conv.predictor." in k for k in shared.state_dict())
    fresh = build_model("cnn9", "dynamic-diagonal", width=4, image_size=8, share_prediction=True)
    fresh.load_state_dict(shared.state_dict())


def test_share_prediction_trains_and_a_layer_alone_is_an_error():
    model = build_model("cnn9", "dynamic-diagonal-light", width=4, image_size=8, share_prediction=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.stage1.prediction.predictor.out.weight.grad is not None
    with pytest.raises(RuntimeError, match=re.escape("call the stage (SharedPredictionStage), not the layer alone")):
        model.stage1[1].conv(torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("call,message", [
    (lambda: make_conv("dynamic-diagonal", 3, 4, 3, predictor_stride=3),
     "make_conv: predictor_stride must be one of 0, 1, 2, got 3"),
    (lambda: make_conv("dynamic-diagonal", 3, 4, 3, predictor_stride=True),
     "make_conv: predictor_stride must be one of 0, 1, 2, got True"),
    (lambda: make_conv("dynamic-diagonal", 3, 4, 3, padding=0, predictor_stride=0),
     "PooledPredictor: predictor_stride 0 (global) reads a 1 x 1 map, which needs 2 * padding >= dilation * "
     "(kernel_size - 1); got padding (0, 0), kernel_size (3, 3), dilation (1, 1)"),
    (lambda: make_conv("conv", 3, 4, 3, predictor_stride=2),
     "make_conv: predictor_stride=2 applies to the dynamic NSL kinds (dynamic-diagonal,"),
    (lambda: make_conv("dynamic-filter", 3, 4, 3, predictor_stride=2), "got 'dynamic-filter'"),
    (lambda: build_model("resnet20", "dynamic-diagonal", share_prediction=True),
     "share_prediction applies to model cnn9 only (its stages keep one grid), got 'resnet20'"),
    (lambda: build_model("cnn9", "static-full", share_prediction=True),
     "share_prediction applies to the dynamic NSL layer kinds (DynamicNSConv2d), got 'static-full'"),
    (lambda: build_model("cnn9", "dynamic-diagonal", share_prediction=True, share_predictor=True),
     "cnn9: share_prediction shares the prediction itself (so the predictor too); give share_predictor=False"),
])
def test_bad_options_are_refused_with_their_name(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.parametrize("overrides,message", [
    (dict(layer="dynamic-diagonal", predictor_stride=4), "predictor_stride must be 0, 1 or 2"),
    (dict(layer="conv", predictor_stride=2), "predictor_stride applies to the dynamic NSL layer kinds"),
    (dict(layer="dynamic-diagonal", model="resnet20", share_prediction=True),
     "share_prediction applies to model cnn9 only, got 'resnet20'"),
    (dict(layer="dynamic-diagonal", share_prediction=True, share_predictor=True),
     "share_prediction shares the predictor too: set share_predictor false with it"),
])
def test_config_checks_the_options(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config("fast", **overrides)


def test_config_builds_the_variant():
    from nsl.train import build_model_for

    cfg = make_config("fast", layer="dynamic-diagonal", width=4, predictor_stride=2, share_prediction=True)
    model = build_model_for(cfg, dict(num_classes=10, in_channels=3, image_size=32))
    assert isinstance(model.stage2, SharedPredictionStage)
    assert isinstance(model.stage2.prediction.predictor, PooledPredictor)


@pytest.mark.parametrize("stride", [pytest.param(s, marks=pytest.mark.slow) for s in (2, 0)])  # about 25 s each
def test_share_prediction_compiles_and_exports(stride, tmp_path):
    """A shared-prediction CNN-9 (the stage's g held between its layers' calls) under torch.compile (one graph,
    forward and gradients as eager) and ONNX export (standard operators, onnxruntime computing the model)."""
    torch.manual_seed(0)
    model = build_model("cnn9", "dynamic-diagonal", width=4, image_size=8, share_prediction=True,
                        predictor_stride=stride, predictor_width=6)
    _randomise(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.train()
    out, want = compiled(x), model(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(o.square().sum(), list(model.parameters())) for o in (out, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)

    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install nsl[test])")
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install nsl[test])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install nsl[test])")
    path = tmp_path / "shared.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"], dynamo=True,
                      external_data=False)
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model(x),
                                   atol=1e-4, rtol=1e-4)
