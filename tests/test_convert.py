"""nsl.convert: kind=, the older keywords, nn.Conv2d subclasses (timm look-alikes) kept exact, warnings."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nsl
from nsl.convert import ConvAdaptation, register_conv_subclass
from nsl.layers import LAYER_KINDS
from nsl.layers.conv_transforms import StandardizedWeight

pytestmark = pytest.mark.usefixtures("unfold_backend")


# ---------------------------------------------------------------------------------------------
# Faithful look-alikes of timm's subclasses (timm is not a dependency): same forward, same module path.
# ---------------------------------------------------------------------------------------------
def _same_total(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def _pad_same(x, kernel_size, stride, dilation):
    ih, iw = x.shape[-2:]
    ph = _same_total(ih, kernel_size[0], stride[0], dilation[0])
    pw = _same_total(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Conv2dSame(nn.Conv2d):
    """timm.layers.conv2d_same.Conv2dSame: TensorFlow 'SAME' padding computed from the input in forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        x = _pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm.layers.std_conv.StdConv2d: the weight standardised per filter in forward (BiT)."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, eps=1e-6):
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0., eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d: standardised, scaled by a learned gain (NFNet)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


Conv2dSame.__module__ = "timm.layers.conv2d_same"
StdConv2d.__module__ = ScaledStdConv2d.__module__ = "timm.layers.std_conv"


def _timm_like_model():
    torch.manual_seed(0)
    m = nn.Sequential(Conv2dSame(3, 6, 3, stride=2), nn.ReLU(), StdConv2d(6, 8, 3), nn.ReLU(),
                      ScaledStdConv2d(8, 8, 3, gain_init=0.7), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        m[4].gain.uniform_(0.5, 1.5)
    return m


STATIC = [n for n, k in LAYER_KINDS.items() if k.foldable]
DYNAMIC = [n for n, k in LAYER_KINDS.items() if k.dynamic and k.module is nsl.DynamicNSConv2d]


@pytest.mark.parametrize("kind", STATIC)
def test_timm_subclasses_convert_exactly(kind):
    model = _timm_like_model()
    x = torch.randn(2, 3, 9, 8)  # odd and even sides: asymmetric 'same' padding at stride 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, no warning
        converted = nsl.convert(model, kind=kind)
    assert [type(converted[i]) for i in (0, 2, 4)] == [nsl.NSConv2d] * 3
    assert type(converted[5]) is nn.Conv2d  # 1x1 stays
    assert torch.equal(converted(x), model(x))  # exactly, at M = I
    converted.eval(), model.eval()
    assert torch.equal(converted(x), model(x))
    folded = nsl.fold(converted)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, nsl.NSConv2d) for m in folded.modules())


@pytest.mark.parametrize("kind", DYNAMIC)
def test_timm_subclasses_convert_to_dynamic_kinds(kind):
    model = _timm_like_model()
    x = torch.randn(2, 3, 9, 8)
    converted = nsl.convert(model, kind=kind)
    assert all(type(converted[i]) is nsl.DynamicNSConv2d for i in (0, 2, 4))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    converted(x).square().sum().backward()
    assert converted[4].weight_transform.gain.grad is not None  # the gain keeps learning


def test_transform_sits_before_m():
    """With M != I the converted layer computes conv(pad(x), T(W) M) (float64 reference)."""
    torch.manual_seed(0)
    src = nn.Sequential(ScaledStdConv2d(3, 4, 3, gain_init=1.3).double(), Conv2dSame(4, 5, 3, stride=2).double())
    conv = nsl.convert(src, kind="static-full")
    with torch.no_grad():
        for layer in conv:
            layer.similarity.add_(0.1 * torch.randn(9, 9, dtype=torch.float64))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    a, b = src
    ta = F.batch_norm(a.weight.reshape(1, 4, -1), None, None, weight=(a.gain * a.scale).view(-1), training=True,
                      momentum=0.0, eps=a.eps).reshape_as(a.weight)
    wa = torch.einsum("ocp,pq->ocq", ta.flatten(2), conv[0].similarity).view_as(ta)
    wb = torch.einsum("ocp,pq->ocq", b.weight.flatten(2), conv[1].similarity).view_as(b.weight)
    h = F.conv2d(x, wa, a.bias, 1, 1)
    ref = F.conv2d(_pad_same(h, (3, 3), (2, 2), (1, 1)), wb, b.bias, 2)
    torch.testing.assert_close(conv(x), ref)


def test_unknown_subclass_skipped_with_one_warning_naming_each():
    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Odd(3, 4, 3), Odd(4, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning) as record:
        out = nsl.convert(model, kind="static-diagonal")
    assert len(record) == 1
    text = str(record[0].message)
    assert text.startswith("nsl.convert skipped 2 layer(s): 0 (")
    assert "test_unknown_subclass_skipped_with_one_warning_naming_each.<locals>.Odd: an nn.Conv2d subclass convert " \
           "does not know" in text and "; 1 (" in text
    assert type(out[0]) is Odd and type(out[2]) is nsl.NSConv2d
    # a look-alike outside timm's modules is not taken for timm's class
    mine = type("StdConv2d", (StdConv2d,), {"__module__": "mine"})
    with pytest.warns(UserWarning) as record:
        nsl.convert(nn.Sequential(mine(3, 4, 3)))
    assert [str(r.message) for r in record] == [
        "nsl.convert skipped 1 layer(s): 0 (StdConv2d: an nn.Conv2d subclass convert does not know, its forward may "
        "not be a plain convolution; teach it with register_conv_subclass from nsl.convert)",
        "nsl.convert converted no layer: no convertible nn.Conv2d with a kernel larger than 1x1 (1 nn.Conv2d layer(s) "
        "found)"]
    # registering teaches convert the class
    register_conv_subclass(mine, lambda conv: ConvAdaptation(weight_transform=StandardizedWeight(conv.eps)))
    x = torch.randn(1, 3, 6, 6)
    m = nn.Sequential(mine(3, 4, 3))
    torch.testing.assert_close(nsl.convert(m, kind="static-full")(x), m(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="register_conv_subclass expects a subclass of nn.Conv2d"):
        register_conv_subclass(nn.Linear, lambda c: ConvAdaptation())


def test_sphere_convs_are_not_plain_convs():
    with pytest.warns(UserWarning, match=r"0 \(SphereConv2d: a SphereNet-normalised convolution \(divided by the input "
                                         r"patch norm\), not w\^T x\)"):
        out = nsl.convert(nn.Sequential(nsl.SphereConv2d(3, 4, 3), nn.Conv2d(4, 4, 3)))
    assert type(out[0]) is nsl.SphereConv2d and type(out[1]) is nsl.NSConv2d


def test_known_subclass_with_unsupported_settings_is_skipped_with_the_reason():
    bad = StdConv2d(3, 4, 3)
    bad.eps = "small"
    with pytest.warns(UserWarning, match=r"skipped 1 layer\(s\): 0 \(StdConv2d: no positive float eps "
                                         r"\(got 'small'\)\)"):
        nsl.convert(nn.Sequential(bad, nn.Conv2d(4, 4, 3)))


def test_nothing_to_convert_is_said():
    with pytest.warns(UserWarning, match=r"converted no layer: .*\(2 nn.Conv2d layer\(s\) found\)"):
        nsl.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)))
    with pytest.warns(UserWarning, match=r"selected by include"):
        nsl.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), include=lambda n, c: False)
    once = nsl.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), kind="dynamic-diagonal")
    with pytest.warns(UserWarning, match=r"1 layer\(s\) already NSL layers"):
        twice = nsl.convert(once, kind="static-full")
    # convert never reaches into an NSL layer: the predictor's plain convs stay plain
    assert type(twice[0].predictor.conv2) is nn.Conv2d


def test_every_nsl_kind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    x = torch.randn(2, 3, 9, 9)
    for kind in LAYER_KINDS.values():
        if kind.module is nn.Conv2d:
            with pytest.raises(ValueError, match="layer kind 'conv' is a plain nn.Conv2d, nothing to convert to"):
                nsl.convert(model, kind=kind.name)
            continue
        out = nsl.convert(model, kind=kind.name)
        assert type(out[0]) is kind.module and type(out[2]) is kind.module
        assert getattr(out[0], "similarity_kind", None) == kind.similarity
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    # the default is static-diagonal; the kind may be given by position
    assert repr(nsl.convert(model)) == repr(nsl.convert(model, kind="static-diagonal"))
    assert repr(nsl.convert(model, "dynamic-full")) == repr(nsl.convert(model, kind="dynamic-full"))
    assert nsl.convert(model, kind="dynamic-diagonal", predictor_width=4)[0].predictor.hidden_channels == 4
    with pytest.raises(ValueError, match="unknown layer kind 'static-fol'"):
        nsl.convert(model, kind="static-fol")
    with pytest.raises(ValueError, match="unknown layer kind 'full'"):  # the old similarity= names are not kinds
        nsl.convert(model, "full")
    with pytest.raises(TypeError, match="unexpected keyword argument 'dynamic'"):  # nor are the old keywords
        nsl.convert(model, kind="static-full", dynamic=True)


# ---------------------------------------------------------------------------------------------
# predictor_norm: converted layers train at batch 1 on a 1x1 map
# ---------------------------------------------------------------------------------------------
def _to_1x1():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))


@pytest.mark.parametrize("kind", [n for n, k in nsl.LAYER_KINDS.items() if k.predictor is not None])
def test_convert_default_group_norm_trains_at_batch_1_on_a_1x1_map(kind):
    torch.manual_seed(0)
    model = _to_1x1()
    x = torch.randn(1, 3, 1, 1)
    converted = nsl.convert(model, kind=kind).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    out = converted(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nsl.convert(model, kind="dynamic-diagonal", predictor_norm="batch").train()(x)


def test_group_norm_predictor_matches_brute_force_float64():
    """``'group'``: per sample, per group of channels: ``(x - mean) / sqrt(var + 1e-3) * gamma + beta``."""
    torch.manual_seed(1)
    layer = nsl.DynamicNSConv2d(4, 5, 3, padding=1, predictor_norm="group", predictor_init="authors").double()
    pred = layer.predictor
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        pred.bn2.weight.normal_()
        pred.bn2.bias.normal_()

        def gn(t, norm):
            g = norm.num_groups
            v = t.view(t.shape[0], g, -1)
            v = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-3)
            return v.view_as(t) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

        assert pred.bn1.num_groups == 8 and pred.bn2.num_groups == 1
        expected = gn(pred.conv2(torch.relu(gn(pred.conv1(x), pred.bn1))), pred.bn2)
        for mode in (True, False):  # no running statistics: train and eval agree
            pred.train(mode)
            torch.testing.assert_close(pred(x), expected)


@pytest.mark.parametrize("channels,groups", [(64, 8), (128, 16), (256, 32), (512, 32), (16, 2), (9, 1), (81, 9),
                                             (3, 1)])
def test_predictor_norm_groups(channels, groups):
    from nsl.layers.dynamic import predictor_norm_groups
    assert predictor_norm_groups(channels) == groups


def test_predictor_norm_bad_values_are_refused():
    with pytest.raises(ValueError, match=re.escape("DynamicNSConv2d: unknown predictor_norm 'layer'; expected one of "
                                                   "batch, group, none")):
        nsl.DynamicNSConv2d(4, 4, 3, predictor_norm="layer")
    with pytest.raises(ValueError, match=re.escape("convert: unknown predictor_norm 'bn'")):
        nsl.convert(_to_1x1(), kind="dynamic-diagonal", predictor_norm="bn")
    with pytest.raises(ValueError, match=re.escape("convert: predictor_norm applies to layer kinds with a predictor")):
        nsl.convert(_to_1x1(), kind="static-full", predictor_norm="group")
    with pytest.raises(ValueError, match=re.escape("returned 'x'; expected one of batch, group, none")):
        nsl.convert(_to_1x1(), kind="dynamic-diagonal", predictor_norm=lambda name, conv: "x")
    with pytest.raises(ValueError, match=re.escape("layer kind 'conv' has no predictor, so predictor_norm='group'")):
        nsl.layers.make_conv("conv", 3, 3, 3, predictor_norm="group")


def test_predictor_norm_per_layer_and_default_batch_elsewhere():
    converted = nsl.convert(_to_1x1(), kind="dynamic-diagonal",
                            predictor_norm=lambda name, conv: "none" if name == "0" else "batch")
    assert isinstance(converted[0].predictor.bn2, nn.Identity) and isinstance(converted[2].predictor.bn2,
                                                                             nn.BatchNorm2d)
    assert isinstance(nsl.DynamicNSConv2d(4, 4, 3).predictor.bn2, nn.BatchNorm2d)  # the layers' default
    assert isinstance(nsl.layers.make_conv("dynamic-diagonal", 4, 4, 3).predictor.bn2, nn.BatchNorm2d)
