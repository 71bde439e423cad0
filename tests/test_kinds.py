"""The table of layer kinds (nsl.layers.LAYER_KINDS): every kind builds, trains, keeps its checkpoint keys,
works in the models; predictor width and the shared predictor; the table's properties are what the layers do."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nsl
from nsl.fewshot import build_backbone
from nsl.layers import LAYER_KINDS, LayerKind, SharedPredictors, layer_kind, make_conv
from nsl.models import build_model, count_parameters
from nsl.shape import attach_kernel_shape

PREDICTOR_KINDS = [n for n, k in LAYER_KINDS.items() if k.predictor is not None]
NO_PREDICTOR_KINDS = [n for n, k in LAYER_KINDS.items() if k.predictor is None]
NEW_KINDS = ["static-lowrank", "dynamic-diagonal-light", "dynamic-full-light"]


pytestmark = pytest.mark.usefixtures("unfold_backend")


def _hidden(predictor: nn.Module) -> int:
    return predictor.hidden_channels


def test_table_is_read_only_and_named_by_its_keys():
    assert all(isinstance(k, LayerKind) and k.name == n for n, k in LAYER_KINDS.items())
    with pytest.raises(TypeError):
        LAYER_KINDS["mine"] = LAYER_KINDS["conv"]
    with pytest.raises(TypeError):
        LAYER_KINDS["static-full"].options["similarity"] = "diagonal"
    assert set(NEW_KINDS) < set(LAYER_KINDS)
    assert layer_kind("static-full") is LAYER_KINDS["static-full"]
    with pytest.raises(ValueError, match="unknown layer kind 'dyn'; valid kinds: conv, static-diagonal"):
        layer_kind("dyn")
    with pytest.raises(ValueError, match=r"unknown layer kind \['conv'\]"):
        layer_kind(["conv"])
    # nsl.models re-exports the same table
    from nsl.models import LAYER_KINDS as models_kinds
    assert models_kinds is LAYER_KINDS


@pytest.mark.parametrize("name", list(LAYER_KINDS))
def test_every_kind_builds_what_the_table_says_and_trains(name):
    torch.manual_seed(0)
    kind = LAYER_KINDS[name]
    layer = make_conv(name, 3, 4, 3, padding=1)
    assert type(layer) is kind.module
    assert getattr(layer, "similarity_kind", None) == kind.similarity
    if isinstance(layer, nsl.DynamicNSConv2d):
        assert layer.predictor_name == kind.predictor
    assert hasattr(layer, "predictor") == (kind.predictor is not None)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 4, 6, 6)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # paper=True adds the kind's paper options and nothing else
    paper = make_conv(name, 3, 4, 3, padding=1, paper=True)
    for option, value in kind.paper_options.items():
        assert getattr(paper, option) == value


# The state_dict keys the kinds of earlier releases wrote: checkpoints of these kinds must keep loading.
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_SPHERE_DIAG = ["predictor.conv1.weight", *(f"predictor.bn1.{k}" for k in _BN), "predictor.conv2.weight",
                *(f"predictor.bn2.{k}" for k in _BN)]
OLD_KEYS = {
    "conv": ["weight", "bias"],
    "static-diagonal": ["weight", "bias", "similarity"],
    "static-full": ["weight", "bias", "similarity"],
    "dynamic-diagonal": ["weight", "bias", *_SPHERE_DIAG],
    "dynamic-diagonal-cosine": ["weight", "bias", *_SPHERE_DIAG],
    "dynamic-full": ["weight", "bias", "predictor.conv1.weight", "predictor.conv1.bias", "predictor.conv2.weight",
                     "predictor.conv2.bias"],
    "dynamic-filter": ["weight", "bias", *_SPHERE_DIAG, "mix.weight"],
}


@pytest.mark.parametrize("name", list(OLD_KEYS))
def test_state_dict_keys_of_old_kinds_are_unchanged(name):
    assert sorted(make_conv(name, 3, 4, 3, padding=1).state_dict()) == sorted(OLD_KEYS[name])


@pytest.mark.parametrize("name", NEW_KINDS)
@pytest.mark.parametrize("model", ["cnn9", "resnet20", "conv4"])
def test_new_kinds_work_in_models_and_start_as_the_baseline(model, name):
    """A model of a new kind, given the baseline's weights, computes the baseline's function (M starts at I,
    the light predictor's last conv at zero)."""
    torch.manual_seed(0)
    if model == "conv4":
        base, net = build_backbone("conv4", "conv", width=4), build_backbone("conv4", name, width=4)
        x = torch.randn(2, 3, 16, 16)
    else:
        kw = {"image_size": 8, "width": 4}
        base, net = build_model(model, "conv", **kw), build_model(model, name, **kw)
        x = torch.randn(2, 3, 8, 8)
    n_layers = sum(type(m) is LAYER_KINDS[name].module for m in net.modules())
    assert n_layers == sum(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in base.modules()) - \
        (1 if model != "conv4" else 0)  # the stem stays a plain conv
    missing, unexpected = net.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing
    base.eval(), net.eval()
    torch.testing.assert_close(net(x), base(x), rtol=1e-5, atol=1e-5)
    net.train()
    net(x).square().mean().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "predictor" not in n or "out" in n)


@pytest.mark.parametrize("name", PREDICTOR_KINDS)
def test_predictor_width_is_honoured(name):
    layer = make_conv(name, 3, 4, 3, padding=1, predictor_width=8)
    assert _hidden(layer.predictor) == 8
    first = layer.predictor.conv1 if hasattr(layer.predictor, "conv1") else layer.predictor.pw
    assert first.out_channels == 8
    assert layer(torch.randn(1, 3, 5, 5)).shape == (1, 4, 5, 5)
    # the layers' own name for it is accepted, and the two must agree
    assert _hidden(make_conv(name, 3, 4, 3, hidden_channels=8).predictor) == 8
    with pytest.raises(ValueError, match="predictor_width=8 and hidden_channels=16 name one option"):
        make_conv(name, 3, 4, 3, predictor_width=8, hidden_channels=16)
    with pytest.raises(ValueError, match="predictor_width must be a positive int, got 0"):
        make_conv(name, 3, 4, 3, predictor_width=0)
    net = build_model("cnn9", name, image_size=8, width=4, predictor_width=6)
    assert {_hidden(m.predictor) for m in net.modules() if hasattr(m, "predictor")} == {6}
    net = build_backbone("conv4", name, width=4, predictor_width=6)
    assert {_hidden(m.predictor) for m in net.modules() if hasattr(m, "predictor")} == {6}


@pytest.mark.parametrize("name", NO_PREDICTOR_KINDS)
def test_predictor_options_need_a_kind_with_a_predictor(name):
    with pytest.raises(ValueError, match=f"layer kind '{name}' has no predictor, so predictor_width does not apply; "
                                         "kinds with a predictor: dynamic-diagonal"):
        make_conv(name, 3, 4, 3, predictor_width=8)
    with pytest.raises(ValueError, match=f"predictor_width applies to layer kinds with a predictor .*got '{name}'"):
        build_model("cnn9", name, predictor_width=8)
    with pytest.raises(ValueError, match=f"share_predictor applies to layer kinds with a predictor .*got '{name}'"):
        build_model("resnet20", name, share_predictor=True)
    with pytest.raises(ValueError, match=f"share_predictor applies to layer kinds with a predictor .*got '{name}'"):
        build_backbone("conv4", name, share_predictor=True)


def test_kind_options_cannot_be_overridden():
    with pytest.raises(ValueError, match="layer kind 'static-full' sets similarity='full'; choose another kind"):
        make_conv("static-full", 3, 4, 3, similarity="diagonal")
    assert make_conv("static-lowrank", 3, 4, 3, rank=3).similarity_u.shape == (9, 3)


def _stage_groups(model, stages):
    """For each stage, the dynamic layers grouped by (input channels, stride): the layers that must share."""
    groups = []
    for stage in stages:
        by_key: dict[tuple, list] = {}
        for m in getattr(model, stage).modules():
            if hasattr(m, "predictor") and isinstance(m, nn.Conv2d):
                by_key.setdefault((m.in_channels, m.stride), []).append(m)
        groups.extend(by_key.values())
    return groups


@pytest.mark.parametrize("model, stages", [("cnn9", ["stage1", "stage2", "stage3"]),
                                           ("resnet20", ["layer1", "layer2", "layer3"])])
@pytest.mark.parametrize("name", ["dynamic-diagonal", "dynamic-full-light", "dynamic-filter"])
def test_shared_predictor_is_one_module_per_stage_and_geometry(model, stages, name):
    torch.manual_seed(0)
    kw = {"image_size": 8, "width": 4} if model == "cnn9" else {"width": 4}
    shared = build_model(model, name, share_predictor=True, **kw)
    unshared = build_model(model, name, **kw)
    groups = _stage_groups(shared, stages)
    assert any(len(g) > 1 for g in groups)
    for g in groups:
        assert all(m.predictor is g[0].predictor for m in g)  # one module in a group
    distinct = {id(g[0].predictor): g[0].predictor for g in groups}
    assert len(distinct) == len(groups)  # and a different one for every group
    # parameters counted once: the unshared model has one predictor per layer
    per_predictor = [sum(p.numel() for p in g[0].predictor.parameters()) for g in groups]
    extra = sum(n * (len(g) - 1) for n, g in zip(per_predictor, groups))
    assert count_parameters(unshared) - count_parameters(shared) == extra
    if model != "cnn9":
        return
    # a shared model trains and round-trips through its state dict
    x = torch.randn(2, 3, 8, 8)
    shared(x).square().mean().backward()
    again = build_model(model, name, share_predictor=True, **kw)
    again.load_state_dict(shared.state_dict())
    shared.eval(), again.eval()
    torch.testing.assert_close(again(x), shared(x))


def test_shared_predictors_scope_in_make_conv():
    scope = SharedPredictors()
    a = make_conv("dynamic-diagonal", 8, 8, 3, padding=1, shared=scope)
    b = make_conv("dynamic-diagonal", 8, 16, 3, padding=1, shared=scope)  # out channels may differ
    c = make_conv("dynamic-diagonal", 8, 8, 3, stride=2, padding=1, shared=scope)  # another geometry
    d = make_conv("dynamic-diagonal", 4, 8, 3, padding=1, shared=scope)  # other input channels
    assert a.predictor is b.predictor
    assert len({id(m.predictor) for m in (a, c, d)}) == 3 and len(scope) == 3
    assert b.predictor_name == "sphere"
    with pytest.raises(TypeError, match="shared must be a SharedPredictors scope, got dict"):
        make_conv("dynamic-diagonal", 8, 8, 3, shared={})
    resnet12 = build_backbone("resnet12", "dynamic-diagonal-light", widths=(4, 4, 8, 8), share_predictor=True)
    block = resnet12.blocks[2]
    assert block.conv2.predictor is block.conv3.predictor and block.conv1.predictor is not block.conv2.predictor
    conv4 = build_backbone("conv4", "dynamic-diagonal", width=4, share_predictor=True)
    convs = [blk.conv for blk in conv4.blocks]
    assert convs[1].predictor is convs[2].predictor is convs[3].predictor is not convs[0].predictor


@pytest.mark.parametrize("name", list(LAYER_KINDS))
def test_table_properties_are_what_the_layers_do(name):
    kind = LAYER_KINDS[name]
    model = nn.Sequential(make_conv(name, 3, 4, 3, padding=1))
    assert (type(nsl.fold(model)[0]) is nn.Conv2d and type(model[0]) is not nn.Conv2d) == kind.foldable
    if kind.kernel_shape:
        attach_kernel_shape(model, per_filter=False)
        if kind.per_filter_shape:
            attach_kernel_shape(model, per_filter=True)
        else:
            with pytest.raises(ValueError, match="per-filter kernel shapes need a diagonal M"):
                attach_kernel_shape(model, per_filter=True)
    else:
        with pytest.raises(ValueError):
            attach_kernel_shape(model)
    assert kind.dynamic == isinstance(model[0], (nsl.DynamicNSConv2d, nsl.layers.DynamicFilterConv2d))


def test_bias_false_drops_every_conv_bias():
    """build_model(bias=False): the authors' models have no bias in any conv (conv CNN-9: 511,200 parameters)."""
    assert count_parameters(build_model("cnn9", "conv")) - count_parameters(build_model("cnn9", "conv", bias=False)) \
        == 10
    assert count_parameters(build_model("cnn9", "conv", bias=False)) == 511_200
    for name in PREDICTOR_KINDS:
        for model in ("cnn9", "resnet20"):
            kw = {"image_size": 8, "width": 4} if model == "cnn9" else {"width": 4}
            with_bias, without = build_model(model, name, **kw), build_model(model, name, bias=False, **kw)
            keys, fewer = set(with_bias.state_dict()), set(without.state_dict())
            assert fewer <= keys and all(k.endswith("bias") for k in keys - fewer)
            conv_biases = [k for k, m in without.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
            assert conv_biases == [], (model, name, conv_biases)
    with pytest.raises(ValueError, match="bias must be True or False, got 'no'"):
        build_model("cnn9", "conv", bias="no")


@pytest.mark.parametrize("name", ["static-diagonal", "static-full", "dynamic-diagonal", "dynamic-full"])
def test_similarity_kind_speaks_the_table_vocabulary(name):
    """functional.similarity_kind() names the layer kind whose M has the tensor's layout; the table maps it to the
    layers' own similarity_kind ('diagonal' / 'full')."""
    layer = make_conv(name, 3, 4, 3, padding=1)
    if LAYER_KINDS[name].dynamic:
        layer.record_similarity = True
        layer(torch.randn(2, 3, 5, 5))
        sim = layer.last_similarity
    else:
        sim = layer.similarity
    got = nsl.functional.similarity_kind(sim, 9)
    assert got == name
    assert LAYER_KINDS[got].similarity == layer.similarity_kind
    assert LAYER_KINDS[got].dynamic == isinstance(layer, nsl.DynamicNSConv2d)
