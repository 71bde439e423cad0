"""CUDA tests: every dynamic backend on the GPU against the float64 brute-force reference (CPU).

Skipped where there is no CUDA device. Covers ``reference``, ``unfold``, ``ztrick`` and ``triton``
(the fused kernels of :mod:`nsl._triton`) in float32, bfloat16 and float16, diagonal and full M,
forward and the gradients for x, W and M, TF32 on/off, autocast, batch 0, the NaN-at-padding
rule, and geometries that pick each launch configuration (narrow and wide channel tiles, several
channel blocks, stride, dilation, groups, 5x5 and 1x3 kernels). And the light predictor's operator
(``torch.ops.nsl.light_predictor``: Triton forward and backward) against the same operator in float64 on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA tests run only on a GPU machine", allow_module_level=True)

from nsl import functional as NF  # noqa: E402
from nsl.functional import conv_output_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import brute_ns_conv2d  # noqa: E402

DEVICE = torch.device("cuda")
BACKENDS = ["reference", "unfold", "ztrick", "triton"]


def _triton_reason() -> str | None:
    try:
        from nsl import _triton
    except Exception as e:  # noqa: BLE001
        return f"nsl._triton does not import: {e}"
    return _triton.unavailable_reason(DEVICE)


def _skip_unless_backend(backend: str) -> None:
    if backend == "triton":
        reason = _triton_reason()
        if reason:
            pytest.skip(f"triton kernels unavailable on this GPU: {reason}")


def run(backend, x, weight, sim, stride, padding, dilation, groups):
    with NF.use_backend(backend):
        return NF.ns_conv2d(x, weight, sim, None, stride, padding, dilation, groups)


# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
GEOMETRIES = {
    "narrow-3x3": (3, 5, 7, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "wide-blocks": (2, 72, 80, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 64-wide tiles, 3 channel blocks
    "stride2-groups2": (2, 8, 12, 11, 9, (3, 3), (2, 2), (1, 1), (1, 1), 2),
    "k5x5-dilation2": (1, 6, 5, 13, 12, (5, 5), (1, 1), (3, 2), (2, 1), 1),
    "k1x3-odd": (3, 4, 3, 7, 9, (1, 3), (1, 2), (0, 1), (1, 2), 1),
    "many-rows": (4, 16, 16, 33, 31, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # many tiles, split dW reduction
}
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}  # relative to max |reference|


def _inputs(geom, full, seed=0):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups = geom
    gen = torch.Generator().manual_seed(seed)
    ho, wo = conv_output_size((h, w), k, stride, padding, dilation)
    p = k[0] * k[1]
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, *k, generator=gen, dtype=torch.float64) / (c_in * p / groups) ** 0.5
    sim = 1 + 0.5 * torch.randn((n, p, p, ho, wo) if full else (n, p, ho, wo), generator=gen, dtype=torch.float64)
    gout = torch.randn(n, c_out, ho, wo, generator=gen, dtype=torch.float64)
    return x, weight, sim, gout, (stride, padding, dilation, groups)


_REFERENCES: dict = {}


def _reference(x, weight, sim, gout, geo):
    key = (tuple(x.shape), tuple(sim.shape), geo, *(float(t.sum()) for t in (x, weight, sim, gout)))
    if key not in _REFERENCES:  # the same inputs are checked against several backends
        _REFERENCES[key] = _reference_uncached(x, weight, sim, gout, geo)
    return _REFERENCES[key]


def _reference_uncached(x, weight, sim, gout, geo):
    stride, padding, dilation, groups = geo
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, weight, sim)]
    out = brute_ns_conv2d(*leaves, stride=stride, pad=(padding[0], padding[0], padding[1], padding[1]),
                          dilation=dilation, groups=groups)
    out.backward(gout.double().cpu())
    return [out.detach()] + [t.grad for t in leaves]


def _on_gpu(backend, x, weight, sim, gout, geo, dtype):
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_(True) for t in (x, weight, sim)]
    out = run(backend, *leaves, *geo)
    out.backward(gout.to(DEVICE, dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_close(got, want, dtype, tol=None, names=("out", "dx", "dw", "dsim")):
    tol = TOL[dtype] if tol is None else tol
    for g, r, name in zip(got, want, names):
        assert g.device.type == "cuda" and g.dtype == dtype, f"{name}: {g.dtype} on {g.device}"
        assert g.shape == r.shape, f"{name} shape {list(g.shape)} != {list(r.shape)}"
        if r.numel() == 0:
            continue
        err = (g.double().cpu() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


@pytest.fixture(autouse=True)
def no_tf32():
    """IEEE float32 in matmuls (PyTorch's default) and in cuDNN convolutions (TF32 by default there,
    used by the ztrick backend's 1x1 convolution) unless a test asks for TF32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, name, full, dtype):
    _skip_unless_backend(backend)
    x, w, m, g, geo = _inputs(GEOMETRIES[name], full)
    # the reference sees the same rounded inputs
    x, w, m, g = (t.to(dtype).double() for t in (x, w, m, g))
    _assert_close(_on_gpu(backend, x, w, m, g, geo, dtype), _reference(x, w, m, g, geo), dtype)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_triton_float32_precision_follows_allow_tf32(full):
    """IEEE float32 by default (error ~1e-6); TF32 only when allowed (error ~1e-3, still close)."""
    _skip_unless_backend("triton")
    x, w, m, g, geo = _inputs(GEOMETRIES["wide-blocks"], full)
    want = _reference(x, w, m, g, geo)
    _assert_close(_on_gpu("triton", x, w, m, g, geo, torch.float32), want, torch.float32, tol=2e-5)
    torch.backends.cuda.matmul.allow_tf32 = True
    _assert_close(_on_gpu("triton", x, w, m, g, geo, torch.float32), want, torch.float32, tol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_in_the_autocast_dtype(backend, dtype):
    _skip_unless_backend(backend)
    if backend == "triton" and "triton" not in NF.BACKENDS:
        pytest.skip("functional has no 'triton' backend yet")
    x, w, m, g, geo = _inputs(GEOMETRIES["narrow-3x3"], full=False)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (x, w, m)]
    with torch.autocast("cuda", dtype=dtype):
        out = run(backend, *leaves, *geo)
    assert out.dtype == dtype
    out.backward(g.to(DEVICE, dtype))
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    want = _reference(*(t.to(dtype).double() for t in (x, w, m, g)), geo)
    err = (out.double().cpu() - want[0]).abs().max().item() / want[0].abs().max().item()
    assert err < TOL[dtype]


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, full):
    _skip_unless_backend(backend)
    x, w, m, g, geo = _inputs((0, 3, 4, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1), full)
    got = _on_gpu(backend, x, w, m, g, geo, torch.float32)
    assert [list(t.shape) for t in got] == [[0, 4, 5, 6], [0, 3, 5, 6], [4, 3, 3, 3], list(m.shape)]
    assert torch.count_nonzero(got[2]) == 0


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_m_at_a_padded_tap_gives_nan(backend, full):
    _skip_unless_backend(backend)
    x, w, m, g, geo = _inputs((1, 2, 3, 4, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1), full)
    if full:
        m[0, 4, 0, 0, 0] = float("nan")
    else:
        m[0, 0, 0, 0] = float("nan")
    want = brute_ns_conv2d(x, w, m, pad=(1, 1, 1, 1))
    with torch.no_grad():
        got = run(backend, *(t.to(DEVICE, torch.float32) for t in (x, w, m)), *geo).cpu()
    assert torch.isnan(want[0, :, 0, 0]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_triton_non_contiguous_inputs():
    _skip_unless_backend("triton")
    x, w, m, g, geo = _inputs(GEOMETRIES["narrow-3x3"], full=False)
    want = _reference(x, w, m, g, geo)
    xs = x.float().to(DEVICE).to(memory_format=torch.channels_last).requires_grad_(True)
    ms = m.float().to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    ws = w.float().to(DEVICE).requires_grad_(True)
    out = run("triton", xs, ws, ms, *geo)
    out.backward(g.float().to(DEVICE).to(memory_format=torch.channels_last))
    _assert_close([out.detach(), xs.grad, ws.grad, ms.grad], want, torch.float32)


# ---- the light predictor's operator (Triton forward and backward on CUDA) -------------------------------------
LIGHT_NORMS = ["none", "running", "batch", "group"]
LIGHT_GRADS = ("x", "dw_weight", "pw_weight", "out_weight", "out_bias", "weight0", "bias0", "weight1", "bias1")


def _light_run(args, device, dtype, grad):
    """``torch.ops.nsl.light_predictor`` on ``args`` (x and the three convolutions' weights and bias in ``dtype``,
    the norms' tensors float32; float64 everything for the reference) on ``device``, then autograd with ``grad``:
    ``(sim, statistics, gradients of LIGHT_GRADS (None where the tensor is None))``."""
    ref = dtype == torch.float64
    tensors = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(device, dtype if (i < 5 or ref) else torch.float32)
            a = a.requires_grad_(i in (0, 1, 2, 3, 4, 5, 6, 9, 10))
        tensors.append(a)
    out = torch.ops.nsl.light_predictor(*tensors)
    out[0].backward(grad.to(device, out[0].dtype))
    leaves = [tensors[i] for i in (0, 1, 2, 3, 4, 5, 6, 9, 10)]
    return out[0].detach(), out[1:], [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("norm", LIGHT_NORMS)
def test_light_predictor_operator(norm, full, dtype):
    """The operator on CUDA (the Triton kernels of nsl._triton.light_forward/light_backward) against the same
    operator in float64 on CPU (the fused C++ kernel, itself tested against the PyTorch math), on the same rounded
    values: sim, the batch statistics and the nine gradients through autograd."""
    _skip_unless_backend("triton")
    from nsl._light_ops import NORM_CODES, fused_ready
    from test_triton_light import _inputs as light_inputs

    # 2 tiles, 2 input-channel blocks and 2 hidden blocks in every kernel
    args = light_inputs(3, 40, 9, 11, (3, 3), 20, full, NORM_CODES[norm], (4, 5) if norm == "group" else (1, 1))
    args = [a.to(dtype).double() if isinstance(a, torch.Tensor) and i < 5 else a for i, a in enumerate(args)]
    assert fused_ready(args[0].to(DEVICE, dtype))
    grad = torch.randn(3, 81 if full else 9, 9, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sim, stats, grads = _light_run(args, DEVICE, dtype, grad)
    want_sim, want_stats, want_grads = _light_run(args, "cpu", torch.float64, grad)
    tol = TOL[dtype] * (2 if dtype != torch.float32 else 1)
    names = ("sim", "mean0", "var0", "mean1", "var1") + LIGHT_GRADS
    for g, r, name in zip((sim, *stats, *grads), (want_sim, *want_stats, *want_grads), names):
        if r is None:
            assert g is None, name
            continue
        assert g.device.type == "cuda", f"{name} on {g.device}"
        assert g.shape == r.shape, f"{name} shape {list(g.shape)} != {list(r.shape)}"
        if r.numel() == 0:
            continue
        err = (g.double().cpu() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
