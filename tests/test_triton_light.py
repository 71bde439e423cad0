"""The light predictor's Triton forward (``nsl._triton.light_forward``) through Triton's interpreter.

Every case runs the kernel with ``TRITON_INTERPRET=1`` on CPU tensors (set per test) and compares it with
:func:`nsl._light_ops.light_math` in float64 on the same (cast) inputs: ``sim`` and the returned batch
statistics (which ``light_math`` takes from ``torch.var_mean``), for the four norm codes, diagonal and full
outputs, identity on and off, stride 2, dilation 2, 5x5 and 1x3 kernels, batch 0/1/3, odd sizes, several
tiles and channel blocks (C > BLOCK_C, hidden > BLOCK_H, H_out * W_out > BLOCK_M), non-contiguous input,
inputs with a large mean (the variance's numerics), float16 and bfloat16 (the interpreter casts bfloat16 dot
operands to float32, ``DOT_F32``: the bfloat16 dot instruction itself is compiled only in
tests/test_triton_aot.py), bad arguments, and the operator's CUDA dispatch pieces that run without a GPU.
The backward (``nsl._triton.light_backward``) against :func:`nsl._light_ops.light_backward_math` in float64: all
nine gradients, every norm code, diagonal and full, several blocks, the ``need_x``/``need_params`` flags.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")

from types import SimpleNamespace  # noqa: E402

from nsl import _light_ops, _ops  # noqa: E402
from nsl import _triton as NT  # noqa: E402
from nsl._light_ops import NORM_CODES, light_backward_math, light_math  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(n, c, h, w, k, hidden, full, norm, groups=(1, 1), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
            identity=True, bias=True, shift=0.0, seed=0):
    """The 22 arguments of ``light_math`` / ``light_forward`` in float64 (``x`` shifted by ``shift``)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset

    P = k[0] * k[1]
    outc = P * P if full else P
    x = rnd(n, c, h, w, offset=shift)
    norm_args = [rnd(c, scale=0.3, offset=1.0), rnd(c, scale=0.3), rnd(c, scale=0.5),
                 rnd(c, scale=0.2, offset=1.0).abs(),
                 rnd(hidden, scale=0.3, offset=1.0), rnd(hidden, scale=0.3), rnd(hidden, scale=0.5),
                 rnd(hidden, scale=0.2, offset=1.0).abs()]
    if norm != NORM_CODES["running"]:
        norm_args[2] = norm_args[3] = norm_args[6] = norm_args[7] = None
    if norm == NORM_CODES["none"]:
        norm_args = [None] * 8
    return (x, rnd(c, 1, *k, scale=0.5), rnd(hidden, c, 1, 1, scale=c ** -0.5),
            rnd(outc, hidden, 1, 1, scale=hidden ** -0.5), rnd(outc, scale=0.3) if bias else None, *norm_args,
            stride, padding, dilation, norm, groups[0], groups[1], 1e-5, 1e-5, identity)


def _cast(args, dtype):
    """The tensors among ``args`` in ``dtype`` (x and the three convolutions' weights and bias; the norms'
    parameters float32, as autocast leaves them)."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(dtype if i < 5 else torch.float32)
        out.append(a)
    return out


TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}  # error relative to max |reference|
NAMES = ("sim", "mean0", "var0", "mean1", "var1")


def _assert_values(g, r, name, tol):
    """``g`` equals the float64 reference ``r`` to ``tol`` relative to max ``|r|`` (NaN where ``r`` is all NaN)."""
    if r.numel() == 0:
        return
    if torch.isnan(r).all():
        assert torch.isnan(g).all(), f"{name}: expected NaN (statistics of nothing)"
        return
    err = (g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def _check(args, dtype=torch.float32):
    """Run the kernel on ``args`` cast to ``dtype`` and compare with ``light_math`` in float64 on the same values."""
    cast = _cast(args, dtype)
    want = light_math(*[a.double() if isinstance(a, torch.Tensor) else a for a in cast])
    got = NT.light_forward(*cast)
    for g, r, name in zip(got, want, NAMES):
        expected_dtype = dtype if name == "sim" else torch.float32
        assert g.dtype == expected_dtype, f"{name} has dtype {g.dtype}, expected {expected_dtype}"
        assert g.shape == r.shape, f"{name} shape {list(g.shape)} != {list(r.shape)}"
        assert g.is_contiguous(), f"{name} is not contiguous"
        _assert_values(g, r, name, TOL[dtype])
    return got


# name: (n, c, h, w, (kh, kw), hidden, full, extra keyword arguments)
CASES = {
    "batch3-odd": (3, 3, 5, 7, (3, 3), 6, False, {}),
    "batch1-stride2": (1, 4, 7, 6, (3, 3), 5, False, {"stride": (2, 2)}),
    "k5x5-dilation2": (1, 2, 7, 6, (5, 5), 4, False, {"padding": (3, 2), "dilation": (2, 1)}),
    "k1x3-stride-dilation": (3, 2, 5, 7, (1, 3), 3, False, {"stride": (1, 2), "padding": (0, 1),
                                                            "dilation": (1, 2)}),
    "no-identity-no-bias": (2, 3, 5, 5, (3, 3), 4, False, {"identity": False, "bias": False}),
    "full": (2, 3, 5, 6, (3, 2), 4, True, {}),
    "full-k1x3-no-identity": (3, 2, 5, 7, (1, 3), 3, True, {"identity": False, "stride": (2, 2),
                                                            "padding": (0, 2), "dilation": (1, 2)}),
    # 2 tiles per sample (81 > BLOCK_M = 64; statistics: 3 > 32), 2 input-channel blocks (40 > 32), 2 hidden
    # blocks (20 > 16)
    "blocks": (2, 40, 9, 9, (3, 3), 20, False, {}),
}
GROUPS = {"batch3-odd": (3, 2), "batch1-stride2": (2, 5), "k5x5-dilation2": (1, 2), "k1x3-stride-dilation": (2, 3),
          "no-identity-no-bias": (3, 1), "full": (1, 4), "full-k1x3-no-identity": (2, 1), "blocks": (4, 5)}


@pytest.mark.parametrize("norm", list(NORM_CODES))
@pytest.mark.parametrize("case", list(CASES))
def test_float32(case, norm):
    n, c, h, w, k, hidden, full, extra = CASES[case]
    groups = GROUPS[case] if norm == "group" else (1, 1)
    got = _check(_inputs(n, c, h, w, k, hidden, full, NORM_CODES[norm], groups, **extra))
    P = k[0] * k[1]
    assert got[0].shape[1] == (P * P if full else P)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_statistics_of_inputs_with_a_large_mean(norm):
    """x ~ 1000 + N(0, 1): the statistics are combined from per-tile means and squared deviations, so the
    variance keeps its digits (a float32 E[a^2] - E[a]^2 would lose them all)."""
    args = _inputs(2, 3, 9, 9, (3, 3), 4, False, NORM_CODES[norm], (3, 2) if norm == "group" else (1, 1),
                   shift=1000.0)
    cast = _cast(args, torch.float32)
    got = NT.light_forward(*cast)
    want = light_math(*[a.double() if isinstance(a, torch.Tensor) else a for a in cast])
    for g, r, name in zip(got[1:], want[1:], NAMES[1:]):
        rel = ((g.double() - r).abs() / r.abs()).max().item()
        assert rel < 1e-4, f"{name}: relative error {rel:.3g}"


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom:UserWarning")  # light_math on no values
@pytest.mark.parametrize("norm", ["none", "running", "batch"])
def test_empty_batch(norm):
    got = _check(_inputs(0, 3, 5, 6, (3, 3), 4, False, NORM_CODES[norm]))
    assert list(got[0].shape) == [0, 9, 5, 6]


def test_empty_batch_group_norm():
    """Group statistics of no samples: ``[0, groups]`` (``light_math`` itself cannot reshape an empty batch)."""
    args = _cast(_inputs(0, 3, 5, 6, (3, 3), 4, True, NORM_CODES["group"], (3, 2)), torch.float32)
    got = NT.light_forward(*args)
    assert [list(t.shape) for t in got] == [[0, 81, 5, 6], [0, 3], [0, 3], [0, 2], [0, 2]]
    assert all(t.dtype == torch.float32 for t in got)


def test_non_contiguous_input():
    args = list(_inputs(3, 3, 5, 7, (3, 3), 6, False, NORM_CODES["batch"]))
    want = light_math(*[a.float().double() if isinstance(a, torch.Tensor) else a for a in args])
    x = args[0].float().to(memory_format=torch.channels_last)
    pw = args[2].float().transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x.is_contiguous() or pw.is_contiguous())
    got = NT.light_forward(x, args[1].float(), pw, *_cast(args[3:], torch.float32))
    for g, r, name in zip(got, want, NAMES):
        err = (g.double() - r).abs().max().item() / r.abs().max().item()
        assert err < TOL[torch.float32], f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16-upcast-dot"])
@pytest.mark.parametrize("norm", ["running", "group"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_half_precision(dtype, norm, full):
    groups = (3, 2) if norm == "group" else (1, 1)
    _check(_inputs(3, 3, 5, 7, (3, 3), 4, full, NORM_CODES[norm], groups, seed=1), dtype)


def test_bad_arguments():
    args = _cast(_inputs(1, 3, 5, 5, (3, 3), 4, False, NORM_CODES["running"]), torch.float32)
    with pytest.raises(TypeError, match="float64 is not supported"):
        NT.light_forward(*_cast(args, torch.float64))
    bad = list(args)
    bad[2] = bad[2].half()
    with pytest.raises(TypeError, match="pw_weight is torch.float16 on cpu, expected torch.float32 on cpu"):
        NT.light_forward(*bad)
    bad = list(args)
    bad[3] = bad[3].to("meta")
    with pytest.raises(TypeError, match="out_weight is torch.float32 on meta, expected torch.float32 on cpu"):
        NT.light_forward(*bad)
    bad = list(args)
    bad[7] = bad[7].to("meta")
    with pytest.raises(TypeError, match="mean0 must be a floating-point tensor on cpu, got torch.float32 on meta"):
        NT.light_forward(*bad)
    bad = list(args)
    bad[3] = bad[3][:5]
    with pytest.raises(ValueError, match=r"out_weight \[5, 4, 1, 1\]"):
        NT.light_forward(*bad)
    bad = list(args)
    bad[7] = None
    with pytest.raises(ValueError, match="norm 1 .running. needs mean0, var0, mean1 and var1"):
        NT.light_forward(*bad)
    bad = list(args)
    bad[16], bad[17] = NORM_CODES["group"], 2
    with pytest.raises(ValueError, match="groups0 2 must divide C = 3"):
        NT.light_forward(*bad)
    bad[16] = 7
    with pytest.raises(ValueError, match="norm must be 0, 1, 2 or 3"):
        NT.light_forward(*bad)


def test_every_stage_is_an_aot_variant():
    """The launcher's stages and dtypes are all listed for ahead-of-time compilation."""
    variants = NT.light_aot_variants()
    assert len(variants) == sum(map(len, NT.LIGHT_STAGES.values())) * 4  # float32 (IEEE, TF32), bfloat16, float16
    for kernel, stages in NT.LIGHT_STAGES.items():
        assert {v[3]["STAGE"] for v in variants if v[0] == kernel} == set(stages)
    assert all(v[1] == NT.LIGHT_CONFIG and v[0] in NT.LIGHT_KERNELS for v in variants)
    assert all(min(b for k, b in v[3].items() if k.startswith("BLOCK")) >= 16 for v in variants)  # tl.dot


# ---- backward ------------------------------------------------------------------------------------------
GRAD_NAMES = ("dx", "d_dw", "d_pw", "d_out", "d_out_bias", "d_weight0", "d_bias0", "d_weight1", "d_bias1")
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _backward_arguments(args, dtype, need_x=True, need_params=True, seed=3):
    """The 25 arguments of ``light_backward`` for the forward ``args`` cast to ``dtype``: ``sim`` and the batch
    statistics from the Triton forward (as the operator's autograd saves them), a random ``grad_sim``."""
    cast = _cast(args, dtype)
    sim, m0, v0, m1, v1 = NT.light_forward(*cast)
    if cast[16] in (NORM_CODES["batch"], NORM_CODES["group"]):
        cast[7], cast[8], cast[11], cast[12] = m0, v0, m1, v1
    grad = torch.randn(sim.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return [grad, sim, *cast[:4], *cast[5:], need_x, need_params]


def _check_backward(args, dtype=torch.float32, need_x=True, need_params=True):
    """``light_backward`` against ``light_backward_math`` in float64 on the same (cast) values."""
    bargs = _backward_arguments(args, dtype, need_x, need_params)
    want = light_backward_math(*[a.double() if isinstance(a, torch.Tensor) else a for a in bargs])
    got = NT.light_backward(*bargs)
    assert len(got) == 9
    for g, r, name in zip(got, want, GRAD_NAMES):
        if r is None:
            assert g is None, f"{name} computed, light_backward_math gives None"
            continue
        assert g is not None, f"{name} is None"
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        assert g.shape == r.shape, f"{name} shape {list(g.shape)} != {list(r.shape)}"
        _assert_values(g, r, name, GRAD_TOL[dtype])
    return got


# the backward's tiles are the statistics' (32 locations): "blocks-1" has 2 tiles, 2 channel and 2 hidden blocks
BACKWARD_CASES = [("full", norm) for norm in NORM_CODES] + [
    ("batch3-odd", "batch"), ("blocks-1", "batch"), ("blocks-1", "group"), ("k5x5-dilation2", "group"),
    ("k1x3-stride-dilation", "running"), ("batch1-stride2", "batch"), ("no-identity-no-bias", "none"),
    ("full-k1x3-no-identity", "batch")]


@pytest.mark.parametrize("case,norm", BACKWARD_CASES)
def test_backward_float32(case, norm):
    n, c, h, w, k, hidden, full, extra = (1, 40, 6, 7, (3, 3), 20, False, {}) if case == "blocks-1" else CASES[case]
    groups = ((4, 5) if case == "blocks-1" else GROUPS[case]) if norm == "group" else (1, 1)
    _check_backward(_inputs(n, c, h, w, k, hidden, full, NORM_CODES[norm], groups, **extra))


@pytest.mark.parametrize("need_x,need_params", [(True, False), (False, True)])
def test_backward_only_what_is_asked(need_x, need_params):
    got = _check_backward(_inputs(2, 3, 5, 6, (3, 3), 4, False, NORM_CODES["group"], (3, 2)),
                          need_x=need_x, need_params=need_params)
    assert (got[0] is not None) == need_x
    assert all((g is not None) == need_params for g in got[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16-upcast-dot"])
def test_backward_half_precision(dtype):
    _check_backward(_inputs(2, 3, 5, 6, (3, 3), 4, False, NORM_CODES["batch"], seed=1), dtype)


@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom:UserWarning")  # light_math on no values
@pytest.mark.parametrize("norm", ["none", "running", "batch"])
def test_backward_empty_batch(norm):
    got = _check_backward(_inputs(0, 3, 5, 6, (3, 3), 4, False, NORM_CODES[norm]))
    assert list(got[0].shape) == [0, 3, 5, 6] and not got[1].any()  # no locations: d_dw = 0


def test_backward_bad_arguments():
    bargs = _backward_arguments(_inputs(1, 3, 5, 5, (3, 3), 4, False, NORM_CODES["batch"]), torch.float32)
    bad = list(bargs)
    bad[0] = bad[0][:, :4]
    with pytest.raises(ValueError, match=r"grad_sim must be \[1, 9, 5, 5\] on cpu, got \[1, 4, 5, 5\] on cpu"):
        NT.light_backward(*bad)
    bad = list(bargs)
    bad[8] = None  # var0
    with pytest.raises(ValueError, match="norms 1-3 need mean0, var0, mean1 and var1"):
        NT.light_backward(*bad)
    bad = list(bargs)
    bad[4] = bad[4].half()
    with pytest.raises(TypeError, match="pw_weight is torch.float16 on cpu, expected torch.float32 on cpu"):
        NT.light_backward(*bad)


# ---- dispatch (no GPU here: the CUDA kernel called directly, fused_ready on stand-ins for CUDA tensors) ------
def test_both_operators_have_cuda_kernels():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nsl::light_predictor", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nsl::light_predictor_backward", "CUDA")


@pytest.mark.parametrize("kernel", ["triton", "unfold"])
def test_cuda_kernel_runs_triton_or_light_math(monkeypatch, kernel):
    """The operator's CUDA kernel runs the Triton launcher where ``kernel_for`` says 'triton' (here on CPU tensors
    through the interpreter), else ``light_math``, with the same results either way."""
    picked = []
    monkeypatch.setattr(_ops, "kernel_for", lambda device, dtype: picked.append((device, dtype)) or kernel)
    calls, real = [], NT.light_forward
    monkeypatch.setattr(NT, "light_forward", lambda *a: calls.append(1) or real(*a))
    args = _cast(_inputs(2, 3, 5, 6, (3, 3), 4, False, NORM_CODES["batch"]), torch.float32)
    got = _light_ops._forward_cuda(*args)
    want = light_math(*args)
    assert picked == [(args[0].device, torch.float32)]
    assert len(calls) == (kernel == "triton")
    for g, r, name in zip(got, want, NAMES):
        assert g.is_contiguous() and g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kernel", ["triton", "unfold"])
def test_cuda_backward_kernel_runs_triton_or_light_backward_math(monkeypatch, kernel):
    monkeypatch.setattr(_ops, "kernel_for", lambda device, dtype: kernel)
    calls, real = [], NT.light_backward
    monkeypatch.setattr(NT, "light_backward", lambda *a: calls.append(1) or real(*a))
    bargs = _backward_arguments(_inputs(2, 3, 5, 6, (3, 3), 4, False, NORM_CODES["batch"]), torch.float32,
                                need_x=False)
    got = _light_ops._backward_cuda(*bargs)
    want = light_backward_math(*bargs)
    assert len(calls) == (kernel == "triton")
    assert got[0].numel() == 0  # dx not asked for: an empty tensor
    for g, r, name in zip(got[1:], want[1:], GRAD_NAMES[1:]):
        assert g.is_contiguous(), name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def _cuda_like(dtype):
    """A stand-in with a CUDA tensor's ``device`` and ``dtype`` (all ``fused_ready`` reads of it)."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def test_fused_ready_on_cuda_follows_triton(monkeypatch):
    reasons = {"reason": None}
    asked = []

    def unavailable(device):
        asked.append(torch.device(device))
        return reasons["reason"]

    monkeypatch.setattr(NT, "light_unavailable_reason", unavailable)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _light_ops.fused_ready(_cuda_like(dtype)), dtype
    assert asked[-1] == torch.device("cuda", 0)
    assert not _light_ops.fused_ready(_cuda_like(torch.float64))  # no Triton float64: the modules run
    reasons["reason"] = "no CUDA device"
    assert not _light_ops.fused_ready(_cuda_like(torch.float32))
    assert not _light_ops.fused_ready(SimpleNamespace(device=torch.device("meta"), dtype=torch.float32))
    reasons["reason"] = None
    monkeypatch.setattr(_light_ops._func, "transforms_active", lambda: True)  # the contexts come before the device
    assert not _light_ops.fused_ready(_cuda_like(torch.float32))


# ---- the probe that guards a GPU (run here on CPU tensors through the interpreter) ----------------------------
def test_light_probe_agrees_with_the_math_in_the_interpreter():
    assert NT._run_light_probe(torch.device("cpu")) is None


def test_light_probe_reports_a_wrong_result(monkeypatch):
    real = NT.light_forward

    def off(*args):
        sim, *stats = real(*args)
        return (sim * 1.01, *stats)

    monkeypatch.setattr(NT, "light_forward", off)
    why = NT._run_light_probe(torch.device("cpu"))
    assert why is not None and why.startswith("the probe's sim is off by "), why


def test_light_probe_reports_a_kernel_that_fails(monkeypatch):
    def fail(*args):
        raise RuntimeError("PTX assembly aborted\nsecond line")

    monkeypatch.setattr(NT, "light_backward", fail)
    assert NT._run_light_probe(torch.device("cpu")) == "compiling failed: RuntimeError: PTX assembly aborted"


def test_light_unavailable_reason_probes_each_gpu_once_and_warns_once(monkeypatch):
    monkeypatch.setattr(NT, "_light_probe", {})
    monkeypatch.setattr(NT, "unavailable_reason", lambda device: None)  # as on a GPU with Triton
    probes = []
    monkeypatch.setattr(NT, "_run_light_probe", lambda device: probes.append(device) or "the probe's sim is off")
    with pytest.warns(RuntimeWarning, match=re.escape("not used on cuda:0 (the probe's sim is off)")):
        assert NT.light_unavailable_reason(torch.device("cuda", 0)) == "the probe's sim is off"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NT.light_unavailable_reason(torch.device("cuda", 0)) == "the probe's sim is off"
    assert probes == [torch.device("cuda", 0)]
    monkeypatch.setattr(NT, "unavailable_reason", lambda device: "no CUDA device")
    assert NT.light_unavailable_reason(torch.device("cuda", 1)) == "no CUDA device"
    assert probes == [torch.device("cuda", 0)]
