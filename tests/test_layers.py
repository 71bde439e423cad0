"""NSConv2d, DynamicNSConv2d, SphereConv2d, fold and convert; argument and input checks of every layer class."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nsl
from nsl.functional import use_backend
from reference import brute_ns_conv2d

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


def _twin_conv(layer: nn.Conv2d) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    conv.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
    return conv


# ---------------------------------------------------------------------------------------------
# NSConv2d
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("similarity", ["identity", "diagonal", "full", "lowrank"])
@pytest.mark.parametrize("kernel,stride,dilation,groups", [(3, 1, 1, 1), ((3, 5), 2, 2, 2), (5, 1, 1, 2), (1, 1, 1, 1)])
def test_static_starts_as_conv(padding_mode, similarity, kernel, stride, dilation, groups):
    torch.manual_seed(0)
    layer = nsl.NSConv2d(4, 6, kernel, stride, 2, dilation, groups, padding_mode=padding_mode, similarity=similarity)
    x = torch.randn(3, 4, 11, 10)
    torch.testing.assert_close(layer(x), _twin_conv(layer)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("similarity", ["diagonal", "full", "lowrank"])
@pytest.mark.parametrize("similarity_groups", [1, 2])
def test_static_equals_reparametrised_conv(similarity, similarity_groups):
    torch.manual_seed(1)
    layer = nsl.NSConv2d(4, 6, 3, padding=1, similarity=similarity, similarity_groups=similarity_groups).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    M = layer.similarity_matrix().reshape(similarity_groups, 9, 9)
    # reference: each input-channel block contracted with its own M by the brute-force loop
    block = 4 // similarity_groups
    expected = sum(
        brute_ns_conv2d(x[:, s * block:(s + 1) * block], layer.weight[:, s * block:(s + 1) * block], M[s],
                        pad=(1, 1, 1, 1))
        for s in range(similarity_groups)
    ) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(nsl.fold(layer)(x), expected)


def test_static_parameters_and_init():
    diag = nsl.NSConv2d(3, 4, 3, similarity="diagonal")
    assert diag.weight.shape == (4, 3, 3, 3) and diag.bias.shape == (4,)
    assert diag.similarity.shape == (9,) and torch.equal(diag.similarity.detach(), torch.ones(9))
    authors = nsl.NSConv2d(3, 4, 3, similarity="diagonal", similarity_init="authors")
    assert authors.similarity.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    full = nsl.NSConv2d(3, 4, (3, 5), similarity="full", similarity_groups=3)
    assert full.similarity.shape == (3, 15, 15)
    assert torch.equal(full.similarity.detach(), torch.eye(15).expand(3, 15, 15))
    assert not hasattr(nsl.NSConv2d(3, 4, 3, similarity="identity"), "similarity")
    low = nsl.NSConv2d(3, 4, 3, similarity="lowrank", rank=3)
    assert low.similarity_u.shape == (9, 3) and torch.equal(low.similarity_matrix().detach(), torch.eye(9))
    with torch.no_grad():
        diag.similarity.mul_(3)
    diag.reset_parameters()
    assert torch.equal(diag.similarity.detach(), torch.ones(9))


def test_static_gradients_reach_similarity():
    layer = nsl.NSConv2d(3, 4, 3, padding=1, similarity="lowrank")
    layer(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert layer.similarity_u.grad.abs().sum() > 0  # U starts at 0 but gets a gradient through V
    layer = nsl.NSConv2d(3, 4, 3, padding=1, similarity="full")
    layer(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert layer.similarity.grad.shape == (9, 9) and layer.similarity.grad.abs().sum() > 0


def test_repr():
    assert repr(nsl.NSConv2d(3, 8, 3, padding=1, similarity="diagonal")) == (
        "NSConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), similarity='diagonal')")
    assert "similarity_init='authors'" in repr(nsl.NSConv2d(3, 8, 3, similarity="diagonal", similarity_init="authors"))
    assert "predictor='light'" in repr(nsl.DynamicNSConv2d(3, 8, 3, predictor="light"))
    assert "normalize_weight=True" in repr(nsl.SphereConv2d(3, 8, 3, normalize_weight=True))


def test_device_and_dtype_arguments():
    layer = nsl.NSConv2d(3, 4, 3, similarity="full", dtype=torch.float64, device="cpu")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    dyn = nsl.DynamicNSConv2d(3, 4, 3, padding=1, similarity="full", dtype=torch.float64)
    assert {p.dtype for p in dyn.parameters()} == {torch.float64}
    assert dyn(torch.randn(1, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# DynamicNSConv2d
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("predictor", ["sphere", "cosine", "light"])
@pytest.mark.parametrize("stride", [1, 2])
def test_dynamic_starts_as_conv_train_and_eval(similarity, predictor, stride):
    torch.manual_seed(2)
    layer = nsl.DynamicNSConv2d(4, 6, 3, stride, 1, similarity=similarity, predictor=predictor)
    conv = _twin_conv(layer)
    x = torch.randn(3, 4, 9, 9)
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
@pytest.mark.parametrize("predictor", ["sphere", "cosine", "light"])
def test_dynamic_matches_brute_force_after_training_step(similarity, predictor):
    torch.manual_seed(3)
    layer = nsl.DynamicNSConv2d(4, 5, (3, 5), 2, (1, 2), (2, 1), similarity=similarity, predictor=predictor,
                                predictor_init="authors").double()
    x = torch.randn(2, 4, 12, 11, dtype=torch.float64)
    layer(x).square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
    layer.eval()
    sim = layer.similarity_from(x)
    assert sim.shape == ((2, 15, 5, 6) if similarity == "diagonal" else (2, 15, 15, 5, 6))
    assert (sim - (1 if similarity == "diagonal" else torch.eye(15).view(1, 15, 15, 1, 1))).abs().max() > 0
    expected = brute_ns_conv2d(x, layer.weight, sim, layer.bias, (2, 2), (1, 1, 2, 2), (2, 1))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_dynamic_padding_modes(padding_mode):
    layer = nsl.DynamicNSConv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), _twin_conv(layer)(x), atol=1e-5, rtol=1e-5)


def test_predictor_identity_init_is_exact_and_authors_init_is_near_identity():
    x = torch.randn(4, 8, 10, 10) * 50  # raw-pixel scale
    zero = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="diagonal")
    assert torch.equal(zero.similarity_from(x), torch.ones(4, 9, 10, 10))
    authors = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="diagonal", predictor_init="authors")
    authors.eval()  # running stats at init: BN is the identity, the tiny conv keeps m near 1
    assert (authors.similarity_from(x) - 1).abs().max() < 0.05


@pytest.mark.parametrize("similarity", ["diagonal", "full"])
def test_light_predictor_is_bounded(similarity):
    """``g = tanh(...)``: however large the last conv grows, ``M(y) - I`` stays in (-1, 1), the range of the
    SphereConv predictor's cosines (unbounded, it reached -24..+38 and collapsed CNN-9 at lr 0.1)."""
    torch.manual_seed(0)
    layer = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity=similarity, predictor="light")
    with torch.no_grad():
        layer.predictor.out.weight.normal_(0, 100.0)
    x = torch.randn(4, 8, 10, 10) * 50
    seen = []  # the last conv's output, before the bound
    layer.predictor.out.register_forward_hook(lambda module, args, output: seen.append(output))
    g = layer.predictor(x)
    (pre,) = seen
    assert pre.abs().max() > 10  # the bound is doing the work
    torch.testing.assert_close(g, torch.tanh(pre))
    assert g.abs().max() <= 1.0 and (g.abs() > 0.99).any()
    eye = torch.eye(9).view(1, 9, 9, 1, 1)
    m = layer.similarity_from(x)
    assert ((m - 1).abs() <= 1 if similarity == "diagonal" else (m - eye).abs() <= 1).all()


def test_sphere_predictor_structure():
    diag = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="diagonal").predictor
    assert diag.conv1.out_channels == 64 and isinstance(diag.bn2, nn.BatchNorm2d) and diag.bn2.eps == 1e-3
    full = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="full").predictor
    assert full.conv1.out_channels == 128 and full.conv2.out_channels == 81
    assert isinstance(full.bn1, nn.Identity) and isinstance(full.bn2, nn.Identity)
    cos = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="full", predictor="cosine").predictor
    assert cos.conv1.normalize_weight and cos.conv2.normalize_weight and isinstance(cos.bn2, nn.BatchNorm2d)


def test_shared_predictor():
    a = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="diagonal")
    b = nsl.DynamicNSConv2d(8, 8, 3, padding=1, similarity="diagonal", predictor=a.predictor)
    model = nn.Sequential(a, nn.ReLU(), b)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 2 * (8 * 8 * 9 + 8) + sum(p.numel() for p in a.predictor.parameters())
    model(torch.randn(2, 8, 6, 6)).sum().backward()
    restored = nn.Sequential(nsl.DynamicNSConv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nsl.DynamicNSConv2d(8, 8, 3, padding=1))
    restored.load_state_dict(model.state_dict())


def test_custom_predictor_module_and_shape_error():
    custom = nn.Conv2d(4, 9, 3, padding=1)
    layer = nsl.DynamicNSConv2d(4, 4, 3, padding=1, predictor=custom)
    assert layer(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)
    bad = nsl.DynamicNSConv2d(4, 4, 3, padding=1, similarity="full", predictor=nn.Conv2d(4, 9, 3, padding=1))
    with pytest.raises(ValueError, match=r"predictor returned shape \[1, 9, 5, 5\]; expected \[N, 81, H_out, "
                                         r"W_out\] \(P \* P channels for full similarity with a 3x3 kernel\)"):
        bad(torch.randn(1, 4, 5, 5))


def test_record_similarity():
    layer = nsl.DynamicNSConv2d(4, 4, 3, padding=1, similarity="full")
    layer.record_similarity = True
    layer(torch.randn(2, 4, 5, 5))
    assert layer.last_similarity.shape == (2, 9, 9, 5, 5) and not layer.last_similarity.requires_grad


@pytest.mark.parametrize("backend", ["reference", "unfold", "ztrick"])
def test_dynamic_layer_backends_agree(backend):
    torch.manual_seed(4)
    layer = nsl.DynamicNSConv2d(6, 4, 3, padding=1, similarity="full", predictor_init="authors").double()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    with use_backend("reference"):
        ref = layer(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(layer.parameters()))
    with use_backend(backend):
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# SphereConv2d
# ---------------------------------------------------------------------------------------------
def test_sphere_conv_against_loop():
    torch.manual_seed(5)
    layer = nsl.SphereConv2d(3, 4, 3, padding=1, normalize_weight=True).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = layer(x)
    xp = F.pad(x, (1, 1, 1, 1))
    for n, o, i, j in [(0, 0, 0, 0), (1, 3, 2, 4), (0, 2, 4, 1)]:
        patch = xp[n, :, i:i + 3, j:j + 3]
        w = layer.weight[o]
        w = w.detach()
        cos = (patch * w).sum() / math.sqrt((patch ** 2).sum() + 1e-4) / math.sqrt((w ** 2).sum() + 1e-4)
        torch.testing.assert_close(out[n, o, i, j].detach(), cos + layer.bias[o].detach())
    assert (out - layer.bias.view(1, -1, 1, 1)).abs().max() <= 1.0


def test_sphere_conv_gradcheck():
    layer = nsl.SphereConv2d(2, 3, 3, stride=2, padding=1, groups=1, normalize_weight=True).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# fold / convert / state_dict / compile / export
# ---------------------------------------------------------------------------------------------
def _small_resnet() -> nn.Module:
    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.down(x))

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8, 16, 2),
                         Block(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.mark.parametrize("kind", ["static-diagonal", "static-full", "static-lowrank", "dynamic-diagonal",
                                  "dynamic-full", "dynamic-diagonal-light"])
def test_convert_preserves_function(kind):
    torch.manual_seed(6)
    model = _small_resnet()
    x = torch.randn(4, 3, 12, 12)
    converted = nsl.convert(model, kind)
    layer = nsl.DynamicNSConv2d if kind.startswith("dynamic") else nsl.NSConv2d
    assert sum(isinstance(m, layer) for m in converted.modules()) == 5  # the 3x3 convs, not the 1x1 shortcuts
    plain = [n for n, m in converted.named_modules() if type(m) is nn.Conv2d and "predictor" not in n]
    assert plain == ["3.down.0", "4.down.0"]
    for mode in (False, True):
        model.train(mode)
        converted.train(mode)
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, layer) for m in model.modules())  # not in place by default


def test_convert_include_and_inplace():
    model = _small_resnet()
    out = nsl.convert(model, "static-full", include=lambda name, conv: name.startswith("3."), inplace=True)
    assert out is model
    names = [n for n, m in model.named_modules() if isinstance(m, nsl.NSConv2d)]
    assert names == ["3.conv1", "3.conv2", "3.down.0"]
    single = nsl.convert(nn.Conv2d(3, 4, 3), "static-diagonal")
    assert isinstance(single, nsl.NSConv2d)


def test_fold_is_a_plain_conv_with_same_outputs():
    torch.manual_seed(7)
    model = nsl.convert(_small_resnet(), "static-full")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nsl.NSConv2d):
                m.similarity.add_(torch.randn_like(m.similarity) * 0.3)
    model.eval()
    x = torch.randn(4, 3, 12, 12)
    folded = nsl.fold(model)
    assert not any(isinstance(m, nsl.NSConv2d) for m in folded.modules())
    assert any(isinstance(m, nsl.NSConv2d) for m in model.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    single = nsl.NSConv2d(3, 4, 3, similarity="diagonal", padding_mode="reflect", padding=1)
    conv = nsl.fold(single)
    assert type(conv) is nn.Conv2d and conv.padding_mode == "reflect"
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), single(x))


def test_fold_keeps_dynamic_layers():
    model = nn.Sequential(nsl.DynamicNSConv2d(3, 4, 3, padding=1), nsl.NSConv2d(4, 4, 3, padding=1))
    folded = nsl.fold(model)
    assert isinstance(folded[0], nsl.DynamicNSConv2d) and type(folded[1]) is nn.Conv2d


def test_state_dict_round_trip():
    torch.manual_seed(8)
    for layer in (nsl.NSConv2d(3, 4, 3, similarity="full"), nsl.DynamicNSConv2d(3, 4, 3, similarity="full")):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        buf.seek(0)
        twin = type(layer)(3, 4, 3, similarity="full")
        twin.load_state_dict(torch.load(buf, weights_only=True))
        x = torch.randn(2, 3, 6, 6)
        layer.eval()
        twin.eval()
        torch.testing.assert_close(twin(x), layer(x))


def test_torch_compile():
    torch.manual_seed(9)
    model = nn.Sequential(nsl.NSConv2d(3, 4, 3, padding=1, similarity="full"), nn.ReLU(),
                          nsl.DynamicNSConv2d(4, 4, 3, padding=1, predictor="light", predictor_init="authors"))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_training_step():
    torch.manual_seed(9)
    model = nn.Sequential(nsl.NSConv2d(3, 4, 3, padding=1, similarity="full"), nn.ReLU(),
                          nsl.DynamicNSConv2d(4, 4, 3, padding=1, similarity="full", predictor_init="authors"))
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_onnx_export_of_folded_and_dynamic_models(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install nsl[test])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install nsl[test])")
    torch.manual_seed(10)
    static = nsl.fold(nn.Sequential(nsl.NSConv2d(3, 4, 3, padding=1, similarity="full"), nn.ReLU())).eval()
    dynamic = nn.Sequential(nsl.DynamicNSConv2d(3, 4, 3, padding=1, similarity="diagonal",
                                                predictor_init="authors")).eval()
    x = torch.randn(2, 3, 8, 8)
    for name, model in (("static", static), ("dynamic", dynamic)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="unknown similarity 'cosine'; expected one of identity, diagonal, full"):
        nsl.NSConv2d(3, 4, 3, similarity="cosine")
    with pytest.raises(ValueError, match="unknown similarity 'identity' for a dynamic layer; expected one of "
                                         "diagonal, full"):
        nsl.DynamicNSConv2d(3, 4, 3, similarity="identity")
    with pytest.raises(ValueError, match="unknown predictor 'mlp'; expected one of sphere, cosine, light or an "
                                         "nn.Module"):
        nsl.DynamicNSConv2d(3, 4, 3, predictor="mlp")
    with pytest.raises(ValueError, match="similarity_groups = 2 must divide the input channels per group, "
                                         "in_channels / groups = 3"):
        nsl.NSConv2d(3, 4, 3, similarity_groups=2)
    with pytest.raises(ValueError, match="unknown similarity_init 'eye'"):
        nsl.NSConv2d(3, 4, 3, similarity_init="eye")
    with pytest.raises(ValueError, match="expected 3 input channels, got input of shape \\[1, 5, 6, 6\\]"):
        nsl.DynamicNSConv2d(3, 4, 3)(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="unknown layer kind 'dynamic-lowrank'"):
        nsl.convert(nn.Conv2d(3, 4, 3), "dynamic-lowrank")
    with pytest.raises(TypeError, match="fold expects an nn.Module, got Tensor"):
        nsl.fold(torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# One argument check and one input check for every layer class of nsl.layers (hostile inputs)
# ---------------------------------------------------------------------------------------------
def _conv_like(cls, **extra):
    def build(**kw):
        args = {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1, **extra, **kw}
        return cls(**args)
    return build


def _predictor(cls, **extra):
    def build(**kw):
        kw.pop("out_channels", None)
        kw.pop("groups", None)
        args = {"in_channels": 3, "kernel_size": 3, "padding": 1, **extra, **kw}
        return cls(**args)
    return build


#: every layer class: (factory(**overrides), channels of its input, geometry arguments it takes)
LAYER_CLASSES = {
    "NSConv2d": (_conv_like(nsl.NSConv2d, similarity="full"), 3, "conv"),
    "DynamicNSConv2d": (_conv_like(nsl.DynamicNSConv2d), 3, "conv"),
    "DynamicNSConv2d (light, full)": (_conv_like(nsl.DynamicNSConv2d, predictor="light", similarity="full"), 3, "conv"),
    "DynamicFilterConv2d": (_conv_like(nsl.layers.DynamicFilterConv2d), 3, "conv"),
    "SphereConv2d": (_conv_like(nsl.SphereConv2d), 3, "conv"),
    "SimilarityPredictor": (_predictor(nsl.SimilarityPredictor), 3, "predictor"),
    "LightPredictor": (_predictor(nsl.LightPredictor), 3, "predictor"),
    "GlobalSimilarity2d": (lambda **kw: nsl.GlobalSimilarity2d(**{"channels": 3, **kw}), 3, "channels"),
}
CONV_ARGS = [("in_channels", 0, "a positive int"), ("in_channels", -2, "a positive int"),
             ("in_channels", 2.5, "a positive int"), ("in_channels", True, "a positive int"),
             ("out_channels", 0, "a positive int"), ("kernel_size", 0, "positive ints"),
             ("kernel_size", (3, 0), "positive ints"), ("kernel_size", (3, 3, 3), "an int or a pair of ints"),
             ("stride", 0, "positive ints"), ("dilation", 0, "positive ints"), ("padding", -1, "ints >= 0"),
             ("padding", "full", "'same', 'valid' or ints >= 0"), ("groups", 0, "a positive int")]


def _class_name(key: str) -> str:
    return key.partition(" ")[0]


def _argument_cases():
    for key, (_, _, takes) in LAYER_CLASSES.items():
        for arg, value, expected in CONV_ARGS:
            if takes == "channels":  # GlobalSimilarity2d: channels only, no convolution geometry
                if arg == "in_channels":
                    yield key, "channels", value, expected
            elif takes == "conv" or arg not in ("out_channels", "groups"):  # predictors: no out_channels, groups
                yield key, arg, value, expected


@pytest.mark.parametrize("key, arg, value, expected", list(_argument_cases()))
def test_constructor_arguments_are_checked_by_name(key, arg, value, expected):
    factory = LAYER_CLASSES[key][0]
    with pytest.raises(ValueError, match=f"^{re.escape(f'{_class_name(key)}: {arg} must be {expected}')}"
                                         f".*got {re.escape(repr(value))}"):
        factory(**{arg: value})


@pytest.mark.parametrize("key", ["NSConv2d", "DynamicNSConv2d", "SphereConv2d"])
def test_groups_must_divide_channels(key):
    with pytest.raises(ValueError, match=f"{key}: out_channels = 4 must be divisible by groups = 3"):
        LAYER_CLASSES[key][0](in_channels=3, groups=3)


@pytest.mark.parametrize("cls", [nsl.SimilarityPredictor, nsl.LightPredictor, nsl.DynamicNSConv2d])
def test_hidden_channels_zero_is_refused_not_defaulted(cls):
    args = (3, 4, 3) if cls is nsl.DynamicNSConv2d else (3, 3)
    with pytest.raises(ValueError, match=f"{cls.__name__}: hidden_channels must be a positive int or None, got 0"):
        cls(*args, hidden_channels=0)


@pytest.mark.parametrize("key", list(LAYER_CLASSES))
def test_input_checks_and_unbatched_input(key):
    torch.manual_seed(0)
    factory, c, _ = LAYER_CLASSES[key]
    layer = factory()
    name = _class_name(key)
    x = torch.randn(2, c, 5, 6)
    with use_backend("unfold"):
        # dtype other than the parameters': one TypeError naming both
        with pytest.raises(TypeError, match=f"{name}: input dtype float64 does not match the layer's parameters "
                                            r"\(float32\)"):
            layer(x.double())
        for bad in (torch.int64, torch.uint8, torch.bool):
            with pytest.raises(TypeError, match=f"{name}: expected a floating-point input .*got dtype "
                                                f"{str(bad).replace('torch.', '')}"):
                layer(x.to(bad))
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor input, got ndarray"):
            layer(x.numpy())
        # wrong rank or channels: ValueError with the shape
        for shape in ((5, 6), (1, 2, c, 5, 6), (c,)):
            with pytest.raises(ValueError, match=f"{name}: expected input of shape \\[N, C, H, W\\] or unbatched "
                                                 f"\\[C, H, W\\], got shape {re.escape(str(list(shape)))}"):
                layer(torch.randn(*shape))
        with pytest.raises(ValueError, match=f"{name}: expected {c} input channels, got input of shape "
                                             r"\[2, 7, 5, 6\]"):
            layer(torch.randn(2, c + 4, 5, 6))
        with pytest.raises(ValueError, match=f"{name}: expected {c} input channels, got input of shape \\[7, 5, 6\\]"):
            layer(torch.randn(c + 4, 5, 6))
        # unbatched [C, H, W] is a batch of one, as in nn.Conv2d
        layer.eval()
        single = layer(x[0])
        torch.testing.assert_close(single, layer(x[:1])[0])
        assert single.dim() == 3
        # the rule is "the parameters' dtype": a float64 layer takes float64 input
        out64 = layer.double()(x.double())
        assert out64.dtype == torch.float64
        # under autocast any floating dtype is taken (the ops cast), as nn.Conv2d
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(layer(x.bfloat16()).float()).all()


def _sphere_conv2d_formula(x, w, bias, stride, padding, dilation, groups, normalize_weight, eps=1e-4):
    """The SphereConv formula written out: conv(x, w) / (||x_patch|| * ||w_o||^[normalize_weight]) + b."""
    out = F.conv2d(x, w, None, stride, padding, dilation, groups)
    ones = torch.ones(groups, w.shape[1], w.shape[2], w.shape[3], dtype=x.dtype)
    norm = torch.sqrt(F.conv2d(x * x, ones, None, stride, padding, dilation, groups) + eps)
    out = out / norm.repeat_interleave(w.shape[0] // groups, dim=1)
    if normalize_weight:
        out = out / torch.sqrt(w.pow(2).sum((1, 2, 3)) + eps).view(1, -1, 1, 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("normalize_weight", [False, True])
@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 0, 1, 2), (1, "same", 2, 3)])
def test_sphere_conv2d_matches_its_formula_in_float64(normalize_weight, stride, padding, dilation, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 6 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    got = nsl.sphere_conv2d(x, w, b, stride, padding, dilation, groups, normalize_weight=normalize_weight)
    ref = _sphere_conv2d_formula(x, w, b, stride, padding, dilation, groups, normalize_weight)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(got, (x, w, b), g)
    refs = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
