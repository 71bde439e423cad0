"""Model zoo: every model with every layer kind, CNN-9's structure, convert/fold equivalence, dynamic filter."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nsl
from nsl.models import (
    CNN9,
    LAYER_KINDS,
    MODEL_LAYERS,
    MODELS,
    DynamicFilterConv2d,
    build_model,
    count_parameters,
    make_conv,
)

pytestmark = pytest.mark.usefixtures("unfold_backend")


SIZES = {"cnn9": 16, "resnet20": 8, "resnet32": 8, "resnet56": 8, "resnet18": 32, "resnet50": 32,
         "sphere-attention": 8}
KIND_TYPES = {name: kind.module for name, kind in LAYER_KINDS.items()}


def test_registry_lists():
    assert set(MODELS) == {"cnn9", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50",
                           "sphere-attention"}
    old_kinds = {"conv", "static-diagonal", "static-full", "dynamic-diagonal", "dynamic-full",
                 "dynamic-diagonal-cosine", "dynamic-filter"}
    assert old_kinds < set(LAYER_KINDS)  # every kind of earlier releases is still there
    assert {"static-lowrank", "dynamic-diagonal-light", "dynamic-full-light"} < set(LAYER_KINDS)


_TIER_2 = ("resnet18", "resnet32", "resnet50", "resnet56")  # the deep and the ImageNet ResNets


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _TIER_2 else n for n in MODELS])
def test_every_model_and_kind_shapes(name):
    torch.manual_seed(0)
    s = SIZES[name]
    x = torch.randn(2, 1, s, s)
    # the kinds of earlier releases on every model; the newer kinds run in cnn9, resnet20, conv4 (test_kinds.py)
    kinds = [k for k in LAYER_KINDS if k not in ("static-lowrank", "dynamic-diagonal-light", "dynamic-full-light")]
    for kind in MODEL_LAYERS.get(name, kinds):  # sphere-attention: conv only (its cosine convs)
        kw = {"image_size": s} if name in ("cnn9", "sphere-attention") else {}
        model = build_model(name, kind, num_classes=5, in_channels=1, paper=LAYER_KINDS[kind].dynamic, **kw)
        out = model(x)
        assert out.shape == (2, 5), (name, kind)
        assert torch.isfinite(out).all(), (name, kind)
        kind_type = nsl.SphereConv2d if name == "sphere-attention" else KIND_TYPES[kind]
        n_kind = sum(type(m) is kind_type for m in model.modules())
        assert n_kind > 0, (name, kind)


def test_cnn9_structure_and_parameter_count():
    model = build_model("cnn9", "conv", 10)
    assert type(model) is CNN9
    assert count_parameters(model) == 511_210  # computed by hand from the section-6 description
    assert type(model.stem.conv) is nn.Conv2d and model.stem.conv.weight.shape == (32, 3, 3, 3)
    for kind in ("static-diagonal", "static-full", "dynamic-diagonal", "dynamic-filter"):
        m = build_model("cnn9", kind, 10, bn_eps=1e-3)
        convs = [mod for mod in m.modules() if type(mod) is KIND_TYPES[kind]]
        assert [c.out_channels for c in convs] == [32] * 3 + [64] * 3 + [128] * 3
        assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
        assert sum(isinstance(mod, nn.MaxPool2d) for mod in m.modules()) == 3
        assert type(m.stem.conv) is nn.Conv2d  # the first conv stays plain
        assert m.classifier.kernel_size == (4, 4) and m.classifier.padding == (0, 0)
        assert all(b.eps == 1e-3 for b in (m.stem.bn, m.stage1[0].bn, m.stage3[2].bn))
    assert count_parameters(build_model("cnn9", "static-diagonal")) == 511_210 + 9 * 9
    assert count_parameters(build_model("cnn9", "static-full")) == 511_210 + 9 * 81
    assert build_model("cnn9", "conv")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_paper_flag_selects_authors_inits():
    m = build_model("cnn9", "static-diagonal", paper=True)
    assert torch.equal(m.stage1[0].conv.similarity, torch.eye(3).flatten())
    m = build_model("cnn9", "static-diagonal")
    assert torch.equal(m.stage1[0].conv.similarity, torch.ones(9))
    assert build_model("cnn9", "dynamic-diagonal", paper=True).stage2[0].conv.predictor_init == "authors"
    assert build_model("cnn9", "dynamic-full").stage2[0].conv.predictor_init == "zero"
    cos = build_model("cnn9", "dynamic-diagonal-cosine").stage1[0].conv
    assert cos.predictor_name == "cosine"


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*cnn9, resnet20"):
        build_model("vgg", "conv")
    with pytest.raises(ValueError, match="unknown layer kind 'dyn'.*dynamic-diagonal-cosine"):
        build_model("cnn9", "dyn")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model("cnn9", "conv", image_size=12)


@pytest.mark.parametrize("name", ["cnn9", "resnet20", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_native_nsl_equals_converted_conv_model(name):
    """With the default (identity) inits, an NSL model given the baseline's weights computes the same
    function, and its state dict is exactly what nsl.convert makes of the baseline."""
    torch.manual_seed(0)
    s = SIZES[name] if name != "cnn9" else 32
    x = torch.randn(2, 3, s, s)
    base = build_model(name, "conv").eval()
    ref = base(x)
    keep = (lambda n, c: c.kernel_size == (3, 3) and not n.startswith("stem")) if name == "cnn9" else \
        (lambda n, c: c.kernel_size == (3, 3) and n != "conv1")
    for kind in ("static-full", "static-diagonal", "dynamic-diagonal"):
        dyn = kind.startswith("dynamic")
        native = build_model(name, kind)
        extra = {"predictor_norm": "batch"} if dyn else {}  # the models' BatchNorm predictors
        converted = nsl.convert(base, kind, include=keep, **extra)
        native.load_state_dict(converted.state_dict(), strict=True)  # same parameter names and shapes
        native.eval()
        torch.testing.assert_close(native(x), ref, rtol=1e-5, atol=1e-5)
        if not dyn:
            torch.testing.assert_close(nsl.fold(native)(x), ref, rtol=1e-5, atol=1e-5)


def test_dynamic_filter_starts_as_conv_and_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    for stride in (1, 2):
        layer = DynamicFilterConv2d(4, 6, 3, stride=stride, padding=1, predictor_init="authors")
        plain = F.conv2d(x, layer.weight, layer.bias, stride, 1)
        torch.testing.assert_close(layer(x), plain)  # A = 0: exactly the convolution
        out = layer(x)
        out.square().sum().backward()
        assert layer.mix.weight.grad.abs().sum() > 0  # A learns at once through the centre tap
        with torch.no_grad():
            layer.mix.weight.normal_()
        # reference: W(y)[o, c, p] = W[o, c, p] + A[o, c] f(y)[p], evaluated with unfold
        f = layer.filters_from(x)  # [N, P, Ho, Wo]
        ho, wo = f.shape[-2:]
        cols = F.unfold(x, 3, padding=1, stride=stride).view(2, 4, 9, ho * wo)  # [N, C, P, L]
        W = layer.weight.view(6, 4, 9)
        A = layer.mix.weight.view(6, 4)
        ref = torch.einsum("ocp,ncpl->nol", W, cols) + torch.einsum("oc,npl,ncpl->nol", A, f.flatten(2), cols)
        ref = ref.view(2, 6, ho, wo) + layer.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


def test_make_conv_kinds():
    for kind, cls in KIND_TYPES.items():
        layer = make_conv(kind, 3, 4, 3, padding=1)
        assert type(layer) is cls
        assert layer(torch.randn(1, 3, 5, 5)).shape == (1, 4, 5, 5)
    assert make_conv("dynamic-full", 3, 4, 3, padding=1).similarity_kind == "full"
    with pytest.raises(ValueError, match="valid kinds"):
        make_conv("nope", 3, 4, 3)


def test_training_step_updates_every_nsl_parameter():
    torch.manual_seed(0)
    for kind in ("static-full", "dynamic-diagonal", "dynamic-filter"):
        m = build_model("cnn9", kind, image_size=16, paper=True)
        loss = F.cross_entropy(m(torch.randn(4, 3, 16, 16) * 50), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        conv = m.stage2[1].conv
        grads = [p.grad for n, p in conv.named_parameters() if "mix" not in n]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), kind
