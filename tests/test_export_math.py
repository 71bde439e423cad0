"""The export formulation of dynamic NSL (``nsl._export_math``) against the brute-force formula and the operator.

Float64: equal to ``tests/reference.py`` to rounding at every geometry (stride, padding, dilation, groups,
non-square and even kernels, diagonal and full ``M``, odd sizes); float32 within float32 rounding of the
operator; and the ONNX graph it exports (``torch.onnx.export``, standard operators only) computes the same in
onnxruntime.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import nsl
from nsl import _export_math
from nsl._geometry import ConvGeometry
from reference import brute_ns_conv2d

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
GEOMETRIES = [
    (2, 3, 5, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 6, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    (3, 4, 7, 9, 11, (3, 5), (1, 2), (1, 2), (1, 1), 1),
    (2, 5, 3, 11, 10, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    (2, 3, 4, 10, 9, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    (3, 6, 4, 8, 7, (2, 3), (2, 1), (0, 1), (2, 1), 2),
    (2, 4, 4, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 4),
    (2, 2, 3, 6, 5, (5, 5), (1, 1), (3, 0), (1, 1), 1),
    (2, 3, 4, 7, 7, (2, 2), (1, 1), (1, 1), (1, 1), 1),
]


def _gid(geom) -> str:
    n, c, o, h, w, (kh, kw), s, p, d, g = geom
    return f"n{n}c{c}o{o}-{h}x{w}-k{kh}x{kw}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-g{g}"


def _inputs(geom, layout, dtype, seed=0):
    n, c, o, h, w, (kh, kw), stride, padding, dilation, groups = geom
    gen = torch.Generator().manual_seed(seed)
    p = kh * kw
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c // groups, kh, kw, generator=gen, dtype=torch.float64)
    shape = (n, p, ho, wo) if layout == "diag" else (n, p, p, ho, wo)
    sim = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, weight, sim)], (stride, padding, dilation, groups)


def _export_formula(x, weight, sim, stride, padding, dilation, groups):
    xpad = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    geometry = ConvGeometry.of(x, weight, stride, padding, dilation)
    return _export_math.dynamic_ns_conv2d_export(xpad, weight, sim, groups, geometry)


@pytest.mark.parametrize("layout", ["diag", "full"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=_gid)
def test_float64_equals_the_formula(geom, layout):
    (x, weight, sim), (stride, padding, dilation, groups) = _inputs(geom, layout, torch.float64)
    want = brute_ns_conv2d(x, weight, sim, None, stride, (padding[0], padding[0], padding[1], padding[1]),
                           dilation, groups)
    got = _export_formula(x, weight, sim, stride, padding, dilation, groups)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["diag", "full"])
@pytest.mark.parametrize("geom", GEOMETRIES[:6], ids=_gid)
def test_float32_matches_the_operator(geom, layout):
    (x, weight, sim), geo = _inputs(geom, layout, torch.float32, seed=1)
    want = torch.ops.nsl.dynamic_ns_conv2d(x, weight, sim, *(list(v) for v in geo[:3]), geo[3])
    got = _export_formula(x, weight, sim, *geo)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _TwoLayers(torch.nn.Module):
    """A diagonal (stride 2, dilation 2, groups 2, odd sizes) and a full (5x3 kernel, padding 2x1) dynamic
    convolution whose similarities are inputs, through ``ns_conv2d`` (export backend under ONNX export)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.w1 = torch.nn.Parameter(torch.randn(6, 2, 3, 3, generator=gen))
        self.w2 = torch.nn.Parameter(torch.randn(3, 6, 5, 3, generator=gen))

    def forward(self, x, m, big_m):
        y = nsl.functional.ns_conv2d(x, self.w1, m, stride=2, padding=2, dilation=2, groups=2)
        return nsl.functional.ns_conv2d(y, self.w2, big_m, padding=(2, 1))


@pytest.mark.slow  # tier 2: an ONNX export and an onnxruntime session (test_layers runs one in the default tier)
def test_onnx_graph_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install nsl[test])")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install nsl[test])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install nsl[test])")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 11, 9, generator=gen)
    m = torch.randn(2, 9, 6, 5, generator=gen)  # 11x9 -> 6x5 (stride 2, padding 2, dilation 2)
    big_m = torch.randn(2, 15, 15, 6, 5, generator=gen)  # 5x3 kernel, padding (2, 1): 6x5 -> 6x5
    model = _TwoLayers().eval()
    path = tmp_path / "two.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x, m, big_m), str(path), input_names=["x", "m", "M"], output_names=["out"],
                          dynamo=True, external_data=False)
        want = model.double()(x.double(), m.double(), big_m.double()).float()
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert "Einsum" not in Counter(n.op_type for n in graph.node)
    # one 1x1 Conv per filter position (9 + 15) and no other: no shift convolution materialising P copies
    kernels = [next(list(a.ints) for a in n.attribute if a.name == "kernel_shape") for n in graph.node
               if n.op_type == "Conv"]
    assert kernels == [[1, 1]] * 24
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "m": m.numpy(), "M": big_m.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
