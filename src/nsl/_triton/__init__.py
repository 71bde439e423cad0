"""Fused Triton kernels of dynamic neural similarity convolution (CUDA; CPU through Triton's interpreter).

Shapes (``P = kh * kw``, positions row-major ``q = i * kw + j`` with offset ``(i, j)``,
``L = H_out * W_out``), the calling convention of :mod:`nsl._cpp`::

    x      [N, C_in, H, W]
    weight [C_out, C_in / groups, kh, kw]
    sim    [N, P, H_out, W_out]       diagonal: m
           [N, P, P, H_out, W_out]    full: M[n, p, q] links filter position p with input position q
    out    [N, C_out, H_out, W_out],  H_out = (H + 2 ph - dh (kh - 1) - 1) // sh + 1

With ``x_q[n, c](y) = x[n, c, y_h sh + dh i - ph, y_w sw + dw j - pw]`` (zero outside the image)::

    diagonal: out[n, o](y) = sum_{c in group(o), q} W[o, c, q] m[n, q](y) x_q[n, c](y)
    full:     out[n, o](y) = sum_{c, p} W[o, c, p] sum_q M[n, p, q](y) x_q[n, c](y)

No bias. A padded tap is a zero multiplied by ``M``: a NaN or inf there gives NaN (IEEE), as in
every other backend.

Kernels (:mod:`nsl._triton.kernels`), each an implicit GEMM with float32 accumulation that never
writes the ``P x C_in x L`` columns to memory; the backward needs only ``x``, ``W`` and ``M``:

* forward: a program per (output positions x output channels) tile loops over positions ``p`` and
  input-channel blocks, builds the modulated tile ``m_p x_p`` (full: ``sum_q M[p, q] x_q``) in
  registers and feeds it to ``tl.dot``;
* ``dx``: the transposed (gather) formulation over input positions, ``gout`` tiles times ``W_p``
  scaled by ``M`` (no atomics); when ``dM`` is needed too and ``M`` is diagonal, the same kernel also gives
  it from the same ``h_q = W_q^T gout`` tile (``DSIM``: one GEMM per tap instead of two), as the CPU kernel does;
* ``dW``: per (group, position) a ``[C_out-tile, C_in-tile]`` reduction over output positions,
  split over positions for parallelism and atomically added into a float32 buffer (the order of
  those additions varies, so dW is not bitwise reproducible run to run; a partial-sums buffer
  would be, at SPLIT times the weight's memory);
* ``dM`` alone (``x`` needs no gradient, e.g. the first layer, or full ``M``): ``h_p = W_p^T gout`` on chip
  (``tl.dot``), reduced against the input taps.

float32 operands use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is True at
launch; bfloat16/float16 operands feed the dot directly (float32 accumulation); outputs are in the
input dtype. The launcher picks among the fixed :data:`LAUNCH_CONFIGS` (no autotuning), so that
:func:`aot_variants` lists every compiled variant a launch can need.

Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs the same kernel code through
numpy, except that bfloat16 dot operands are cast to float32 first (the interpreter computes
bfloat16 ``tl.dot`` wrongly); so on CPU the bfloat16 *dot instruction* is not verified, while its
inputs, accumulation and output casts are. Kernels are wrapped lazily (at the first launch), so
importing this package never imports or launches anything and works without Triton.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
from dataclasses import dataclass

import torch

from .._geometry import output_size, pair

__all__ = ["unavailable_reason", "forward", "backward", "LAUNCH_CONFIGS", "LaunchConfig", "aot_variants",
           "pick_config", "light_forward", "light_backward", "light_unavailable_reason", "LIGHT_CONFIG", "LightConfig",
           "light_aot_variants"]

KERNELS = ("fwd", "dx", "dw", "dsim")


@dataclass(frozen=True)
class LaunchConfig:
    """One launch configuration: block sizes (M x N output tile, K reduction step) and scheduling.

    ``fwd``: M = output positions, N = output channels, K = input channels. ``dx`` (and ``dx+dsim``, the
    same kernel giving ``dM`` too): M = input positions, N = input channels, K = output channels. ``dw``:
    M = output channels, N = input channels, K = output positions. ``dsim``: M = output positions, N = input
    channels, K = output channels, and ``block_q`` taps per program for full ``M``.
    """

    kernel: str
    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    block_q: int = 16
    block_k_ieee: int = 16

    def constexprs(self, fp32_ieee: bool = False) -> dict:
        """The block-size constexprs; float32 IEEE dots (FMA, register-hungry) take the smaller
        ``block_k_ieee`` reduction step, TF32 and 16-bit dots ``block_k``."""
        block_k = self.block_k_ieee if fp32_ieee else self.block_k
        out = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": block_k}
        if self.kernel == "dsim":
            out["BLOCK_Q"] = self.block_q
        return out


#: Every configuration the launcher can choose, per launch (see :func:`pick_config`); ``dx+dsim`` is the ``dx`` kernel
#: with its ``dM`` share (``DSIM``): its second accumulator needs a 16-wide reduction step and no software pipelining
#: to stay within 255 registers without spilling (wider or pipelined, every float32 and bfloat16 variant spilled).
LAUNCH_CONFIGS: dict[str, tuple[LaunchConfig, ...]] = {
    "fwd": (LaunchConfig("fwd", "n64", 64, 64, 32, 8, 2),),
    "dx": (LaunchConfig("dx", "n64", 64, 64, 32, 8, 2),),
    "dx+dsim": (LaunchConfig("dx", "n64-k16", 64, 64, 16, 8, 1),),
    "dw": (LaunchConfig("dw", "m64", 64, 64, 32, 8, 2),),
    "dsim": (LaunchConfig("dsim", "m64", 64, 32, 32, 8, 2),),
}

# dtypes and, for float32, the two dot precisions; DOT_F32 (operands cast to float32) is only used by
# the interpreter for bfloat16 and never compiled for a GPU.
_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DW_TARGET_PROGRAMS = 512  # split the dW reduction until about this many programs run (GPU)
_DW_MIN_STEPS = 8  # ... but give every program at least this many BLOCK_K steps


def pick_config(kernel: str, channels: int) -> LaunchConfig:
    """The configuration the launcher uses for ``kernel`` (a key of :data:`LAUNCH_CONFIGS`); ``channels`` is the
    N-dimension size (output channels per group for ``fwd``, input channels per group for ``dx``). With two configs
    narrow layers (<= 32 channels) take the first, wider ones the second; today every kernel has one
    tile shape (a 32-wide variant for narrow layers doubled the ahead-of-time compile test's time
    without a GPU measurement to justify it), and the reduction step depends on the dtype
    (:meth:`LaunchConfig.constexprs`)."""
    configs = LAUNCH_CONFIGS[kernel]
    if len(configs) == 1:
        return configs[0]
    return configs[0] if channels <= 32 else configs[1]


def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """The PRECISION constexprs launched for ``dtype`` (tl.dot ignores it for 16-bit operands)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def _signature(kernel: str, dtype: torch.dtype) -> dict[str, str]:
    """Triton signature (argument name -> type) of ``kernel`` for tensors of ``dtype``."""
    t = "*" + _TL_DTYPES[dtype]
    geometry = ["C", "H", "W", "Cg", "Og", "Ho", "Wo", "KW", "P", "SH", "SW", "PH", "PW", "DH", "DW"]
    if kernel == "fwd":
        sig = {"x_ptr": t, "wt_ptr": t, "sim_ptr": t, "out_ptr": t, "NL": "i32"}
    elif kernel == "dx":
        sig = {"g_ptr": t, "wt_ptr": t, "sim_ptr": t, "dx_ptr": t, "x_ptr": t, "dsim_ptr": "*fp32", "NHW": "i32"}
    elif kernel == "dw":
        sig = {"g_ptr": t, "x_ptr": t, "sim_ptr": t, "dw_ptr": "*fp32", "NL": "i32"}
    else:
        sig = {"g_ptr": t, "x_ptr": t, "wt_ptr": t, "dsim_ptr": t, "NL": "i32"}
    sig.update(dict.fromkeys(geometry, "i32"))
    if kernel == "dw":
        sig.update({"ROWS_PER_SPLIT": "i32", "O_TILES": "i32", "C_TILES": "i32"})
    names = ["FULL", "BLOCK_M", "BLOCK_N", "BLOCK_K"] + {"dsim": ["BLOCK_Q"], "dx": ["DSIM"]}.get(kernel, [])
    sig.update(dict.fromkeys(names + ["DOT_F32", "PRECISION"], "constexpr"))
    return sig


def aot_variants() -> list[tuple[str, LaunchConfig, dict[str, str], dict]]:
    """Every ``(kernel name, config, signature, constexprs)`` a GPU launch can compile.

    For :func:`triton.compile` (``ASTSource(fn=jit_kernel(name), signature=..., constexprs=...)``):
    each config of :data:`LAUNCH_CONFIGS`, diagonal and full ``M``, float32 (IEEE and TF32),
    bfloat16 and float16; ``dx`` with and without its ``dM`` share (``DSIM``, diagonal only).
    """
    out = []
    for launch, configs in LAUNCH_CONFIGS.items():
        for cfg in configs:
            for dtype in _TL_DTYPES:
                for precision in _precisions(dtype):
                    for full in ((False,) if launch == "dx+dsim" else (False, True)):
                        ieee = dtype == torch.float32 and precision == "ieee"
                        constexprs = {"FULL": full, **cfg.constexprs(ieee), "DOT_F32": False, "PRECISION": precision}
                        if cfg.kernel == "dx":
                            constexprs["DSIM"] = launch == "dx+dsim"
                        out.append((cfg.kernel, cfg, _signature(cfg.kernel, dtype), constexprs))
    return out


# ---- the light predictor's forward (nsl._triton.light) ---------------------------------------
LIGHT_KERNELS = ("light_fwd", "light_bwd")
#: The stages of ``light_fwd``: per-tile statistics of the depthwise output, of the hidden layer, ``sim``, and (for
#: the backward) the hidden layer's input ``a1``; of ``light_bwd``: ``dy0``'s sums with ``d_pw``, then ``da0`` with
#: ``d_dw``.
LIGHT_STAGES = {"light_fwd": (0, 1, 2, 3), "light_bwd": (0, 1)}


@dataclass(frozen=True)
class LightConfig:
    """The light predictor kernel's launch configuration: ``block_m`` output locations per program (``sim``,
    stage 2) and ``block_m_stats`` (the statistics' stages 0 and 1, whose ``[M, M]`` summing matrix is
    register-hungry), and the channel blocks ``block_c`` (input channels, the 1x1 conv's reduction step),
    ``block_h`` (hidden channels kept on chip at once) and ``block_o`` (output channels per program); every block
    at least 16 (``tl.dot``)."""

    name: str
    block_m: int
    block_m_stats: int
    block_c: int
    block_h: int
    block_o: int
    num_warps: int
    num_stages: int

    def constexprs(self, stage: int) -> dict:
        """The block-size constexprs of :func:`nsl._triton.light.light_fwd_kernel` for ``stage``."""
        return {"BLOCK_M": self.block_m if stage == 2 else self.block_m_stats, "BLOCK_C": self.block_c,
                "BLOCK_H": self.block_h, "BLOCK_O": self.block_o}


#: The one configuration the light launcher uses (no autotuning; unmeasured on a GPU). ``block_h = 16`` is the
#: light predictor's default hidden width, so by default the depthwise conv is computed once per program.
#: ``block_m_stats = 32``: at 64 the statistics' stages spill (280-600 B of stack, sm_80/sm_90, triton 3.8.0;
#: 64 with 8 warps still spills in stage 0); at 32 they use about 167 registers and no stack.
LIGHT_CONFIG = LightConfig("m64", 64, 32, 32, 16, 16, 4, 2)


def _light_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton signature of ``light_fwd`` for inputs of ``dtype`` (``out_ptr``: float32 statistics in stages 0 and
    1, ``sim`` in ``dtype`` in stage 2; the norm vectors and ``m2_ptr`` float32)."""
    t = "*" + _TL_DTYPES[dtype]
    sig = {"x_ptr": t, "dw_ptr": t, "pw_ptr": t, "ow_ptr": t, "bias_ptr": t}
    sig.update(dict.fromkeys(("mean0_ptr", "scale0_ptr", "shift0_ptr", "mean1_ptr", "scale1_ptr", "shift1_ptr"),
                             "*fp32"))
    sig.update({"out_ptr": t, "m2_ptr": "*fp32"})
    ints = ["C", "H", "W", "Ho", "Wo", "KW", "P", "HID", "OUTC", "SH", "SW", "PH", "PW", "DH", "DW", "NSTRIDE0",
            "NSTRIDE1", "ID_STEP", "TILES"]
    sig.update(dict.fromkeys(ints, "i32"))
    names = ["STAGE", "BLOCK_M", "BLOCK_C", "BLOCK_H", "BLOCK_O", "DOT_F32", "PRECISION"]
    sig.update(dict.fromkeys(names, "constexpr"))
    return sig


def _light_bwd_signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton signature of ``light_bwd`` for inputs of ``dtype`` (everything computed is float32)."""
    t = "*" + _TL_DTYPES[dtype]
    sig = {"x_ptr": t, "dw_ptr": t, "pw_ptr": t}
    sig.update(dict.fromkeys(("da1_ptr", "mean0_ptr", "scale0_ptr", "shift0_ptr", "rstd0_ptr", "gamma0_ptr",
                              "e1_ptr", "e2_ptr", "s_dy_ptr", "s_dyx_ptr", "dpw_ptr", "da0_ptr", "ddw_ptr"), "*fp32"))
    ints = ["C", "H", "W", "Ho", "Wo", "KW", "P", "HID", "SH", "SW", "PH", "PW", "DH", "DW", "NSTRIDE0", "TILES"]
    sig.update(dict.fromkeys(ints, "i32"))
    sig.update(dict.fromkeys(["STAGE", "BLOCK_M", "BLOCK_C", "BLOCK_H", "DOT_F32", "PRECISION"], "constexpr"))
    return sig


def _light_bwd_constexprs() -> dict:
    """The block-size constexprs of ``light_bwd`` (the statistics' tile, :data:`LIGHT_CONFIG`)."""
    return {"BLOCK_M": LIGHT_CONFIG.block_m_stats, "BLOCK_C": LIGHT_CONFIG.block_c, "BLOCK_H": LIGHT_CONFIG.block_h}


def light_aot_variants() -> list[tuple[str, LightConfig, dict[str, str], dict]]:
    """Every ``(kernel name, config, signature, constexprs)`` a GPU launch of the light kernels can compile
    (as :func:`aot_variants`): :data:`LIGHT_CONFIG` x each kernel's stages (:data:`LIGHT_STAGES`) x float32 (IEEE
    and TF32), bfloat16, float16. ``light_fwd``'s stages 0, 1 and 3 write float32 through ``out_ptr``, so their
    signature types it fp32."""
    out = []
    for kernel, stages in LIGHT_STAGES.items():
        for stage in stages:
            for dtype in _TL_DTYPES:
                for precision in _precisions(dtype):
                    if kernel == "light_fwd":
                        sig = _light_signature(dtype)
                        if stage != 2:
                            sig["out_ptr"] = "*fp32"
                        blocks = LIGHT_CONFIG.constexprs(stage)
                    else:
                        sig, blocks = _light_bwd_signature(dtype), _light_bwd_constexprs()
                    constexprs = {"STAGE": stage, **blocks, "DOT_F32": False, "PRECISION": precision}
                    out.append((kernel, LIGHT_CONFIG, sig, constexprs))
    return out


# --------------------------------------------------------------------------------------------
# lazy kernel wrapping
# --------------------------------------------------------------------------------------------
_lock = threading.Lock()
_wrapped: dict[tuple[str, bool], object] = {}
_probe: dict[int, str | None] = {}


def _raw(name: str, wrap):
    """The kernel function ``name``, for ``wrap`` (``JITFunction`` or ``InterpretedFunction``). Where its module lists
    device functions (``HELPERS``, names), a copy of the function whose globals are a namespace of its own: the
    module's globals with each helper replaced by ``wrap`` of a copy of it whose globals are that namespace too, so
    the kernel and every helper call the helpers wrapped (a compiled kernel can call only a ``JITFunction``, which the
    interpreter cannot call); the module is not changed."""
    if name in LIGHT_KERNELS:
        from . import light as module

        fn = getattr(module, f"{name}_kernel")
    else:
        from . import kernels as module

        fn = getattr(module, f"ns_{name}_kernel")
    helpers = getattr(module, "HELPERS", ())
    if not helpers:
        return fn
    scope = dict(fn.__globals__)
    scope.update({helper: wrap(_with_globals(getattr(module, helper), scope)) for helper in helpers})
    return _with_globals(fn, scope)


def _with_globals(fn, scope: dict):
    """A copy of the function ``fn`` whose globals are ``scope``. The code object is ``fn``'s, so Triton finds the same
    name, qualified name, file, line and source (``inspect`` goes by ``__code__``); ``__module__`` is
    ``scope["__name__"]``, ``fn``'s module."""
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = fn.__annotations__  # the constexpr parameters
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def jit_kernel(name: str, interpret: bool = False):
    """The kernel ``name`` (one of ``fwd, dx, dw, dsim``, or ``light_fwd, light_bwd``) as a Triton
    ``JITFunction`` or, with ``interpret``, as the interpreter's ``InterpretedFunction``; built once per process."""
    key = (name, interpret)
    fn = _wrapped.get(key)
    if fn is None:
        with _lock:
            fn = _wrapped.get(key)
            if fn is None:
                if interpret:
                    from triton.runtime.interpreter import InterpretedFunction as wrap
                else:
                    from triton.runtime.jit import JITFunction as wrap
                fn = wrap(_raw(name, wrap))
                _wrapped[key] = fn
    return fn


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
        return "triton is not installed" if isinstance(e, ModuleNotFoundError) else f"triton fails to import: {e}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on tensors of ``device``, otherwise one sentence saying why.

    CUDA: Triton importable and a probe kernel compiles and runs on that device (checked once per
    device). CPU: Triton importable and ``TRITON_INTERPRET=1`` set (the interpreter). Never raises.
    """
    try:
        device = torch.device(device)
        missing = _triton_missing()
        if missing:
            return missing
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "CPU tensors run the Triton kernels only in the interpreter (set TRITON_INTERPRET=1)"
            return None
        if device.type != "cuda":
            return f"the Triton kernels run on CUDA devices, not {device.type}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _probe:
            _probe[index] = _run_probe(torch.device("cuda", index))
        return _probe[index]
    except Exception as e:  # noqa: BLE001 - never raise from a capability check
        return f"checking the Triton kernels failed: {type(e).__name__}: {e}"


def _run_probe(device: torch.device) -> str | None:
    try:
        x = torch.ones(1, 1, 3, 3, device=device)
        w = torch.ones(1, 1, 3, 3, device=device)
        m = torch.ones(1, 9, 1, 1, device=device)
        out = forward(x, w, m, (1, 1), (0, 0), (1, 1), 1)
        torch.cuda.synchronize(device)
        if abs(float(out.item()) - 9.0) > 1e-3:
            return f"compiling failed: the probe kernel computed {float(out.item())} instead of 9"
    except Exception as e:  # noqa: BLE001 - any failure disables the kernels on this device
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return f"compiling failed: {type(e).__name__}: {first}"
    return None


_light_probe: dict[int, str | None] = {}


def light_unavailable_reason(device: torch.device) -> str | None:
    """None when the light predictor's Triton kernels (:func:`light_forward`, :func:`light_backward`) serve tensors
    of ``device``, otherwise one sentence saying why: :func:`unavailable_reason`, then, once per CUDA device, a
    probe (a 2 x 4 x 6 x 6 input, batch statistics, forward and every gradient) that must agree with the PyTorch
    math (``nsl._light_math.light_math`` / ``light_backward_math``) to 1e-3. The first failure on a device is also
    a warning. These kernels are compiled for sm_80/sm_90 and tested in Triton's interpreter; the probe keeps a
    device where they do not compile or compute right on the PyTorch path. Never raises."""
    why = unavailable_reason(device)
    try:
        device = torch.device(device)
        if why is not None or device.type != "cuda":
            return why
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _light_probe:
            _light_probe[index] = _run_light_probe(torch.device("cuda", index))
            if _light_probe[index] is not None:
                import warnings

                warnings.warn(f"nsl: the light predictor's Triton kernels are not used on cuda:{index} "
                              f"({_light_probe[index]}); its PyTorch ops run instead", RuntimeWarning, stacklevel=2)
        return _light_probe[index]
    except Exception as e:  # noqa: BLE001 - never raise from a capability check
        return f"checking the light predictor's Triton kernels failed: {type(e).__name__}: {e}"


def _run_light_probe(device: torch.device) -> str | None:
    from .._light_math import NORM_CODES, light_backward_math, light_math

    try:
        gen = torch.Generator().manual_seed(0)
        c, hidden, p = 4, 8, 9

        def t(*shape):
            return torch.randn(*shape, generator=gen).to(device)

        x, dw, pw, out, bias = t(2, c, 6, 6), t(c, 1, 3, 3), t(hidden, c, 1, 1) * 0.5, t(p, hidden, 1, 1) * 0.3, t(p)
        norms = (t(c) * 0.1 + 1, t(c) * 0.1, None, None, t(hidden) * 0.1 + 1, t(hidden) * 0.1, None, None)
        geo = ([1, 1], [1, 1], [1, 1], NORM_CODES["batch"], 1, 1, 1e-5, 1e-5, True)
        got = light_forward(x, dw, pw, out, bias, *norms, *geo)
        ref = light_math(x, dw, pw, out, bias, *norms, *geo)
        gsim = t(*ref[0].shape)
        def used(stats):  # the norms' parameters with the batch statistics the forward used
            return (norms[0], norms[1], stats[0], stats[1], norms[4], norms[5], stats[2], stats[3])

        grads = light_backward(gsim, got[0], x, dw, pw, out, *used(got[1:]), *geo, True, True)
        refs = light_backward_math(gsim, ref[0], x, dw, pw, out, *used(ref[1:]), *geo, True, True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for name, a, b in [("sim", got[0], ref[0]), ("mean0", got[1], ref[1]), ("var0", got[2], ref[2])] + [
                (f"gradient {i}", a, b) for i, (a, b) in enumerate(zip(grads, refs)) if b is not None]:
            err = float((a.float() - b.float()).abs().max()) / max(1.0, float(b.float().abs().max()))
            if not err <= 1e-3:
                return f"the probe's {name} is off by {err:.3g} (relative)"
    except Exception as e:  # noqa: BLE001 - any failure disables the kernels on this device
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return f"compiling failed: {type(e).__name__}: {first}"
    return None


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_dims(x, weight, sim, stride, padding, dilation, groups):
    """``(N, C_out, full, dims)``: the kernels' integer arguments ``dims`` (after checking the shapes)."""
    n, c, h, w = x.shape
    out_c, cg, kh, kw = weight.shape
    p = kh * kw
    full = sim.dim() == 5
    ho, wo = sim.shape[-2], sim.shape[-1]
    expected_h, expected_w = output_size((h, w), (kh, kw), stride, padding, dilation)
    sim_shape = (n, p, p, expected_h, expected_w) if full else (n, p, expected_h, expected_w)
    if cg * groups != c or out_c % groups or tuple(sim.shape) != sim_shape:
        raise ValueError(f"nsl._triton: inconsistent shapes x {list(x.shape)}, weight {list(weight.shape)}, "
                         f"sim {list(sim.shape)} for groups {groups}, stride {stride}, padding {padding}, "
                         f"dilation {dilation} (expected sim {list(sim_shape)})")
    dims = (c, h, w, cg, out_c // groups, ho, wo, kw, p, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1])
    return n, out_c, full, dims


def _check(tensors, names) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    for t, name in zip(tensors, names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nsl._triton: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"nsl._triton: {name} is {t.dtype} on {t.device}, expected {dtype} on {device}")
    if dtype not in _TL_DTYPES:
        raise TypeError(f"nsl._triton: dtype {dtype} is not supported (float32, bfloat16, float16)")


def _mode(x: torch.Tensor) -> tuple[bool, bool, str]:
    """(interpret, DOT_F32, PRECISION) for tensors like ``x``."""
    interpret = x.device.type == "cpu"
    dot_f32 = interpret and x.dtype == torch.bfloat16
    tf32 = x.dtype == torch.float32 and not interpret and torch.backends.cuda.matmul.allow_tf32
    return interpret, dot_f32, "tf32" if tf32 else "ieee"


def _fp32_ieee(x: torch.Tensor, dot_f32: bool, precision: str) -> bool:
    return (x.dtype == torch.float32 or dot_f32) and precision == "ieee"


def _weight_t(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[C_out, Cg, kh, kw]`` -> ``[G, P, Cg, Og]`` contiguous (output channels innermost)."""
    out_c, cg, kh, kw = weight.shape
    return weight.reshape(groups, out_c // groups, cg, kh * kw).permute(0, 3, 2, 1).contiguous()


def _pairs(stride, padding, dilation):
    return pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")


def _forward(x, weight, sim, stride, padding, dilation, groups) -> torch.Tensor:
    _check((x, weight, sim), ("x", "weight", "sim"))
    stride, padding, dilation = _pairs(stride, padding, dilation)
    groups = int(groups)
    n, out_c, full, dims = _launch_dims(x, weight, sim, stride, padding, dilation, groups)
    ho, wo = dims[5], dims[6]
    out = torch.empty(n, out_c, ho, wo, dtype=x.dtype, device=x.device)
    nl = n * ho * wo
    if nl == 0:
        return out
    x, sim, wt = x.contiguous(), sim.contiguous(), _weight_t(weight, groups)
    interpret, dot_f32, precision = _mode(x)
    ieee = _fp32_ieee(x, dot_f32, precision)
    cfg = pick_config("fwd", dims[4])
    grid = (_cdiv(nl, cfg.block_m), _cdiv(dims[4], cfg.block_n), groups)
    jit_kernel("fwd", interpret)[grid](x, wt, sim, out, nl, *dims, FULL=full, **cfg.constexprs(ieee),
                                       DOT_F32=dot_f32, PRECISION=precision, num_warps=cfg.num_warps,
                                       num_stages=cfg.num_stages)
    return out


def dw_split(rows: int, programs: int, block: int, interpret: bool) -> tuple[int, int]:
    """``(SPLIT, ROWS_PER_SPLIT)`` of the dW reduction over ``rows`` output positions when
    ``programs`` (tiles x groups x positions) programs run without splitting: enough splits to reach
    about 512 programs on a GPU (4 in the interpreter, to keep it quick yet exercise the split),
    each split a multiple of ``block`` rows and at least 8 (interpreter: 1) blocks long."""
    target, min_steps = (4, 1) if interpret else (_DW_TARGET_PROGRAMS, _DW_MIN_STEPS)
    split = max(1, min(_cdiv(target, programs), _cdiv(rows, block * min_steps)))
    per = _cdiv(_cdiv(rows, split), block) * block
    return _cdiv(rows, per), per


def _backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dw, need_dsim, fuse_dsim):
    _check((x, weight, sim), ("x", "weight", "sim"))
    stride, padding, dilation = _pairs(stride, padding, dilation)
    groups = int(groups)
    n, out_c, full, dims = _launch_dims(x, weight, sim, stride, padding, dilation, groups)
    c, h, w, cg, og, ho, wo, _, p = dims[:9]
    if tuple(grad_out.shape) != (n, out_c, ho, wo):
        raise ValueError(f"nsl._triton: grad_out has shape {list(grad_out.shape)}, expected {[n, out_c, ho, wo]}")
    grad_out = grad_out.to(device=x.device, dtype=x.dtype).contiguous()
    x, sim = x.contiguous(), sim.contiguous()
    wt = _weight_t(weight, groups)
    interpret, dot_f32, precision = _mode(x)
    ieee = _fp32_ieee(x, dot_f32, precision)
    nl = n * ho * wo
    common = {"FULL": full, "DOT_F32": dot_f32, "PRECISION": precision}
    dx = dw = dsim = None
    if need_dx:
        dx = torch.empty_like(x)
        if dx.numel():
            with_dsim = need_dsim and nl > 0 and fuse_dsim and not full  # the dx kernel's docstring: why diagonal
            cfg = pick_config("dx+dsim" if with_dsim else "dx", cg)
            grid = (_cdiv(n * h * w, cfg.block_m), _cdiv(cg, cfg.block_n), groups)
            # dM's per-channel-tile shares (the kernel's docstring); an unfilled one-element dummy where not asked
            f32 = {"dtype": torch.float32, "device": x.device}
            part = torch.zeros(grid[1] * groups, *sim.shape, **f32) if with_dsim else torch.empty(1, **f32)
            jit_kernel("dx", interpret)[grid](grad_out, wt, sim, dx, x, part, n * h * w, *dims, **common,
                                              **cfg.constexprs(ieee), DSIM=with_dsim, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
            if with_dsim:  # the slots summed in a fixed order: reproducible
                dsim = (part[0] if part.shape[0] == 1 else part.sum(0)).to(x.dtype)
    if need_dw:
        buf = torch.zeros(out_c, cg, p, dtype=torch.float32, device=x.device)
        if nl:
            cfg = pick_config("dw", og)
            o_tiles, c_tiles = _cdiv(og, cfg.block_m), _cdiv(cg, cfg.block_n)
            block_k = cfg.constexprs(ieee)["BLOCK_K"]
            split, per = dw_split(nl, o_tiles * c_tiles * groups * p, block_k, interpret)
            grid = (o_tiles * c_tiles * groups * p, split)
            jit_kernel("dw", interpret)[grid](grad_out, x, sim, buf, nl, *dims, per, o_tiles, c_tiles, **common,
                                              **cfg.constexprs(ieee), num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
        dw = buf.to(x.dtype).reshape(weight.shape)
    if need_dsim and dsim is None:
        dsim = torch.empty_like(sim)
        if nl:
            cfg = pick_config("dsim", cg)
            grid = (_cdiv(nl, cfg.block_m), p, _cdiv(p, cfg.block_q) if full else 1)
            jit_kernel("dsim", interpret)[grid](grad_out, x, wt, dsim, nl, *dims, **common,
                                                **cfg.constexprs(ieee), num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages)
    return dx, dw, dsim


def _on_device(t):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def forward(x, weight, sim, stride, padding, dilation, groups) -> torch.Tensor:
    """Dynamic NSL forward ``[N, C_out, H_out, W_out]`` (module docstring), no bias.

    ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``, ``sim [N, P, Ho, Wo]`` or
    ``[N, P, P, Ho, Wo]``, one dtype (float32, bfloat16, float16) on one device; ``stride``,
    ``padding`` (symmetric), ``dilation`` pairs; ``groups`` int. Not autograd-aware.
    """
    with _on_device(x):
        return _forward(x, weight, sim, stride, padding, dilation, groups)


def backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dw, need_dsim,
             fuse_dsim: bool = True):
    """Gradients ``(dx | None, dw | None, dsim | None)`` of :func:`forward` for ``grad_out``
    ``[N, C_out, H_out, W_out]``; each computed only when its ``need_*`` flag is true. Needs only
    ``x``, ``weight`` and ``sim`` (no saved columns). Outputs in the input dtype. ``dx`` and ``dsim`` both
    asked, for diagonal ``M``, come from one kernel (``dx+dsim``); ``fuse_dsim=False`` runs the separate ``dM``
    kernel instead (the same values up to rounding; for benchmarks comparing the two, ``benchmarks/gpu_check.py``)."""
    with _on_device(x):
        return _backward(grad_out, x, weight, sim, stride, padding, dilation, groups, need_dx, need_dw, need_dsim,
                         fuse_dsim)


# --------------------------------------------------------------------------------------------
# the light predictor's forward
# --------------------------------------------------------------------------------------------
_NORM_NONE, _NORM_RUNNING, _NORM_BATCH, _NORM_GROUP = 0, 1, 2, 3  # nsl._light_math.NORM_CODES


def _light_check(x, dw_weight, pw_weight, out_weight, out_bias, norm_tensors, stride, padding, dilation, norm,
                 groups0, groups1):
    """Check the light launcher's arguments; ``(kh, kw, hidden, outc)``."""
    names = ("x", "dw_weight", "pw_weight", "out_weight", "out_bias")
    tensors = [t for t in (x, dw_weight, pw_weight, out_weight, out_bias) if t is not None]
    _check(tensors, [nm for nm, t in zip(names, (x, dw_weight, pw_weight, out_weight, out_bias)) if t is not None])
    for name, t in norm_tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device != x.device:
            got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"nsl._triton.light_forward: {name} must be a floating-point tensor on {x.device}, "
                            f"got {got}")
    if x.dim() != 4 or dw_weight.dim() != 4 or pw_weight.dim() != 4 or out_weight.dim() != 4:
        raise ValueError(f"nsl._triton.light_forward: x, dw_weight, pw_weight, out_weight must be 4-d, got "
                         f"{[list(t.shape) for t in (x, dw_weight, pw_weight, out_weight)]}")
    c = x.shape[1]
    _, _, kh, kw = dw_weight.shape
    hidden, outc = pw_weight.shape[0], out_weight.shape[0]
    p = kh * kw
    if (tuple(dw_weight.shape[:2]) != (c, 1) or tuple(pw_weight.shape[1:]) != (c, 1, 1)
            or tuple(out_weight.shape[1:]) != (hidden, 1, 1) or outc not in (p, p * p)
            or (out_bias is not None and tuple(out_bias.shape) != (outc,))):
        raise ValueError(f"nsl._triton.light_forward: inconsistent shapes x {list(x.shape)}, dw_weight "
                         f"{list(dw_weight.shape)}, pw_weight {list(pw_weight.shape)}, out_weight "
                         f"{list(out_weight.shape)}, out_bias {None if out_bias is None else list(out_bias.shape)} "
                         f"(expected dw_weight [C, 1, kh, kw], pw_weight [hidden, C, 1, 1], out_weight "
                         f"[P or P * P, hidden, 1, 1], out_bias [P or P * P], P = kh * kw)")
    if norm not in (_NORM_NONE, _NORM_RUNNING, _NORM_BATCH, _NORM_GROUP):
        raise ValueError(f"nsl._triton.light_forward: norm must be 0, 1, 2 or 3 (none, running, batch, group), "
                         f"got {norm}")
    if norm == _NORM_RUNNING and any(norm_tensors[k] is None for k in ("mean0", "var0", "mean1", "var1")):
        raise ValueError("nsl._triton.light_forward: norm 1 (running) needs mean0, var0, mean1 and var1")
    if norm == _NORM_GROUP and (groups0 < 1 or c % groups0 or groups1 < 1 or hidden % groups1):
        raise ValueError(f"nsl._triton.light_forward: groups0 {groups0} must divide C = {c} and groups1 "
                         f"{groups1} hidden = {hidden}")
    return kh, kw, hidden, outc


def _combine(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` of the sets with per-set ``count``, ``mean`` and ``m2`` (sum of
    squared deviations from the set's mean), by Chan's formula in float32:
    ``mean = sum(count mean) / sum(count)``, ``var = (sum(m2) + sum(count (mean_set - mean)^2)) / sum(count)``."""
    count = count.expand_as(mean)
    total = count.sum(dims, keepdim=True)
    mu = (count * mean).sum(dims, keepdim=True) / total
    var = (m2.sum(dims, keepdim=True) + (count * (mean - mu) ** 2).sum(dims, keepdim=True)) / total
    return mu, var


def _light_stats(partial_mean, partial_m2, count, norm, groups):
    """``(mean, var)`` per channel ``[C]`` (batch) or per (sample, group) ``[N, groups]`` (group) from the per-tile
    statistics ``[N, TILES, C]`` (``count [TILES]`` locations per tile)."""
    n, tiles, c = partial_mean.shape
    if norm == _NORM_BATCH:
        mu, var = _combine(count.view(1, tiles, 1), partial_mean, partial_m2, (0, 1))
        return mu.view(c), var.view(c)
    shape = (n, tiles, groups, c // groups)
    mu, var = _combine(count.view(1, tiles, 1, 1), partial_mean.view(shape), partial_m2.view(shape), (1, 3))
    return mu.view(n, groups), var.view(n, groups)


def _affine(norm, n, channels, groups, eps, weight, bias, mean, var, device):
    """``(mean, scale, shift, nstride)``: norm ``(a - mean) * scale + shift`` as float32 vectors ``[1, channels]``
    (``nstride = 0``) or ``[N, channels]`` (group, ``nstride = channels``); ``scale = weight / sqrt(var + eps)``,
    ``shift = bias`` (weight 1, bias 0 where None); no norm: ``0, 1, 0``."""
    f32 = {"dtype": torch.float32, "device": device}
    if norm == _NORM_NONE:
        return torch.zeros(1, channels, **f32), torch.ones(1, channels, **f32), torch.zeros(1, channels, **f32), 0
    if norm == _NORM_GROUP:
        mean = mean.float().repeat_interleave(channels // groups, dim=1)
        var = var.float().repeat_interleave(channels // groups, dim=1)
    else:
        mean, var = mean.float().view(1, channels), var.float().view(1, channels)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float().view(1, channels)
    shift = torch.zeros(1, channels, **f32) if bias is None else bias.float().view(1, channels)
    rows = scale.shape[0]
    shift = shift.expand(rows, channels)
    mean = mean.expand(rows, channels)
    return mean.contiguous(), scale.contiguous(), shift.contiguous(), (channels if rows > 1 else 0)


def _light_forward(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1,
                   var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity):
    norm, groups0, groups1 = int(norm), int(groups0), int(groups1)
    norm_tensors = {"weight0": weight0, "bias0": bias0, "mean0": mean0, "var0": var0, "weight1": weight1,
                    "bias1": bias1, "mean1": mean1, "var1": var1}
    kh, kw, hidden, outc = _light_check(x, dw_weight, pw_weight, out_weight, out_bias, norm_tensors, stride,
                                        padding, dilation, norm, groups0, groups1)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    n, c, h, w = x.shape
    p = kh * kw
    ho, wo = output_size((h, w), (kh, kw), stride, padding, dilation)
    stats_dtype = {"dtype": torch.float32, "device": x.device}
    sim = torch.empty(n, outc, ho, wo, dtype=x.dtype, device=x.device)
    empty = torch.empty(0, **stats_dtype)
    stats = [empty, empty, empty, empty]
    if norm == _NORM_BATCH:
        stats = [torch.full((c,), float("nan"), **stats_dtype)] * 2 + [torch.full((hidden,), float("nan"),
                                                                                  **stats_dtype)] * 2
    elif norm == _NORM_GROUP:
        stats = [torch.full((n, groups0), float("nan"), **stats_dtype)] * 2 + [torch.full((n, groups1), float("nan"),
                                                                                         **stats_dtype)] * 2
    if n * ho * wo == 0:  # nothing to compute (batch statistics of nothing: NaN, as torch.var_mean gives)
        return (sim, *(s.clone() for s in stats))
    cfg = LIGHT_CONFIG
    x = x.contiguous()
    dw = dw_weight.reshape(c, p).contiguous()
    pw = pw_weight.reshape(hidden, c).contiguous()
    ow = out_weight.reshape(outc, hidden).contiguous()
    bias = torch.zeros(outc, dtype=x.dtype, device=x.device) if out_bias is None else out_bias.contiguous()
    interpret, dot_f32, precision = _mode(x)
    id_step = (1 if outc == p else p + 1) if identity else 0
    geometry = (c, h, w, ho, wo, kw, p, hidden, outc, stride[0], stride[1], padding[0], padding[1], dilation[0],
                dilation[1])
    kernel = jit_kernel("light_fwd", interpret)
    launch = {"DOT_F32": dot_f32, "PRECISION": precision, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}

    def run(stage, blocks, norm0, norm1, out, m2):
        constexprs = cfg.constexprs(stage)
        tiles = _cdiv(ho * wo, constexprs["BLOCK_M"])
        kernel[(n * tiles, blocks)](x, dw, pw, ow, bias, *norm0[:3], *norm1[:3], out, m2, *geometry, norm0[3],
                                   norm1[3], id_step, tiles, STAGE=stage, **constexprs, **launch)

    if norm in (_NORM_BATCH, _NORM_GROUP):
        tiles, block = _cdiv(ho * wo, cfg.block_m_stats), cfg.block_m_stats
        count = torch.clamp(ho * wo - block * torch.arange(tiles, **stats_dtype), max=block)
        part_mean, part_m2 = torch.empty(n, tiles, c, **stats_dtype), torch.empty(n, tiles, c, **stats_dtype)
        dummy = _affine(_NORM_NONE, n, hidden, 1, 0.0, None, None, None, None, x.device)
        run(0, _cdiv(c, cfg.block_c), dummy, dummy, part_mean, part_m2)
        m0, v0 = _light_stats(part_mean, part_m2, count, norm, groups0)
        norm0 = _affine(norm, n, c, groups0, eps0, weight0, bias0, m0, v0, x.device)
        part_mean, part_m2 = torch.empty(n, tiles, hidden, **stats_dtype), torch.empty(n, tiles, hidden, **stats_dtype)
        run(1, _cdiv(hidden, cfg.block_h), norm0, dummy, part_mean, part_m2)
        m1, v1 = _light_stats(part_mean, part_m2, count, norm, groups1)
        norm1 = _affine(norm, n, hidden, groups1, eps1, weight1, bias1, m1, v1, x.device)
        stats = [m0, v0, m1, v1]
    else:
        norm0 = _affine(norm, n, c, 1, eps0, weight0, bias0, mean0, var0, x.device)
        norm1 = _affine(norm, n, hidden, 1, eps1, weight1, bias1, mean1, var1, x.device)
    run(2, _cdiv(outc, cfg.block_o), norm0, norm1, sim, torch.empty(0, **stats_dtype))
    return (sim, *stats)


def light_forward(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1, bias1, mean1,
                  var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity):
    """The light predictor's forward ``(sim, mean0, var0, mean1, var1)`` by the Triton kernel
    (:mod:`nsl._triton.light`), the arguments and results of ``torch.ops.nsl.light_predictor``
    (:mod:`nsl._light_ops`)::

        sim = tanh(out(ReLU(N1(pw(ReLU(N0(dw(x))))))) + out_bias)  (+ I with ``identity``)

    ``x [N, C, H, W]``, ``dw_weight [C, 1, kh, kw]``, ``pw_weight [hidden, C, 1, 1]``, ``out_weight
    [P or P * P, hidden, 1, 1]``, ``out_bias [P or P * P]`` or None, one dtype (float32, bfloat16, float16) on one
    device (CPU only under ``TRITON_INTERPRET=1``); the norms' ``weight*/bias*/mean*/var*`` (``[C]``,
    ``[hidden]``, any floating dtype, None where absent) on that device; ``norm`` a code of
    ``nsl._light_ops.NORM_CODES``. ``sim [N, P or P * P, H_out, W_out]`` in ``x``'s dtype (float32
    accumulation); the batch statistics used (biased variance) float32 ``[C]``/``[hidden]`` (batch),
    ``[N, groups]`` (group), empty otherwise (NaN for batch statistics of an empty batch, as ``torch.var_mean``).
    Statistics: per-tile means and squared deviations combined by Chan's formula (deterministic; two extra
    launches, recomputing the depthwise conv). Not autograd-aware.
    """
    with _on_device(x):
        return _light_forward(x, dw_weight, pw_weight, out_weight, out_bias, weight0, bias0, mean0, var0, weight1,
                              bias1, mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1,
                              identity)


# --------------------------------------------------------------------------------------------
# the light predictor's backward
# --------------------------------------------------------------------------------------------
def _light_backward(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1,
                    mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x,
                    need_params):
    import torch.nn.functional as F

    from .. import _light_math

    norm, groups0, groups1 = int(norm), int(groups0), int(groups1)
    norm_tensors = {"weight0": weight0, "bias0": bias0, "mean0": mean0, "var0": var0, "weight1": weight1,
                    "bias1": bias1, "mean1": mean1, "var1": var1}
    kh, kw, hidden, outc = _light_check(x, dw_weight, pw_weight, out_weight, None, norm_tensors, stride, padding,
                                        dilation, norm, groups0, groups1)
    if norm != _NORM_NONE and any(norm_tensors[k] is None for k in ("mean0", "var0", "mean1", "var1")):
        raise ValueError("nsl._triton.light_backward: norms 1-3 need mean0, var0, mean1 and var1 (the statistics "
                         "the forward used)")
    stride, padding, dilation = _pairs(stride, padding, dilation)
    n, c, h, w = x.shape
    p = kh * kw
    ho, wo = output_size((h, w), (kh, kw), stride, padding, dilation)
    for name, t in (("grad_sim", grad_sim), ("sim", sim)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, outc, ho, wo) or t.device != x.device:
            got = f"{list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"nsl._triton.light_backward: {name} must be [{n}, {outc}, {ho}, {wo}] on {x.device}, "
                             f"got {got}")
    f32 = {"dtype": torch.float32, "device": x.device}
    cfg = LIGHT_CONFIG
    block = cfg.block_m_stats
    tiles = _cdiv(ho * wo, block)
    interpret, dot_f32, precision = _mode(x)
    xc = x.contiguous()
    dw = dw_weight.reshape(c, p).contiguous()
    pw = pw_weight.reshape(hidden, c).contiguous()
    ow = out_weight.reshape(outc, hidden).contiguous()
    norm0 = _affine(norm, n, c, groups0, eps0, weight0, bias0, mean0, var0, x.device)
    geometry = (c, h, w, ho, wo, kw, p, hidden, outc, stride[0], stride[1], padding[0], padding[1], dilation[0],
                dilation[1])
    launch = {"DOT_F32": dot_f32, "PRECISION": precision, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    # 1. a1 = pw(ReLU(N0(dw(x)))) [N, hidden, L] (forward kernel, stage 3)
    a1 = torch.empty(n, hidden, ho, wo, **f32)
    if a1.numel():
        dummy = _affine(_NORM_NONE, n, hidden, 1, 0.0, None, None, None, None, x.device)
        jit_kernel("light_fwd", interpret)[(n * tiles, _cdiv(hidden, cfg.block_h))](
            xc, dw, pw, ow, ow, *norm0[:3], *dummy[:3], a1, a1, *geometry, norm0[3], dummy[3], 0, tiles, STAGE=3,
            **cfg.constexprs(3), **launch)
    # 2. the hidden and output layers (hidden, P or P * P channels) in PyTorch ops, as light_backward_math
    y1, _, _ = _light_math._norm_forward(a1, norm, groups1, eps1, _float(weight1), _float(bias1), _float(mean1),
                                        _float(var1))
    r1 = F.relu(y1)
    g = sim.float()
    if identity:
        g = g - _light_math._identity(g, p)
    dz = grad_sim.float() * (1 - g * g)
    dy1 = F.conv2d(dz, ow.float().t().reshape(hidden, outc, 1, 1)) * (r1 > 0)
    da1, dw1, db1 = _light_math._norm_backward(dy1, a1, norm, groups1, eps1, _float(weight1), _float(mean1),
                                              _float(var1))
    da1 = da1.contiguous()
    # 3. the depthwise half (backward kernel): dy0's sums and d_pw, then da0 and d_dw
    gamma0 = torch.ones(c, **f32) if weight0 is None else weight0.float().contiguous()
    rstd0 = torch.ones(1, c, **f32) if norm == _NORM_NONE else torch.rsqrt(_variance(norm, c, groups0, var0) + eps0)
    rstd0 = rstd0.expand(norm0[0].shape).contiguous()
    s_dy, s_dyx = torch.zeros(n, tiles, c, **f32), torch.zeros(n, tiles, c, **f32)
    dpw, ddw = torch.zeros(hidden, c, **f32), torch.zeros(c, p, **f32)
    da0 = torch.zeros(n, c, ho, wo, **f32)
    zeros = torch.zeros(norm0[0].shape, **f32)
    bwd = jit_kernel("light_bwd", interpret)
    bwd_dims = (c, h, w, ho, wo, kw, p, hidden, stride[0], stride[1], padding[0], padding[1], dilation[0],
                dilation[1], norm0[3], tiles)
    grid = (n * tiles, _cdiv(c, cfg.block_c))
    blocks = _light_bwd_constexprs()
    if da0.numel():
        bwd[grid](xc, dw, pw, da1, *norm0[:3], rstd0, gamma0, zeros, zeros, s_dy, s_dyx, dpw, da0, ddw, *bwd_dims,
                  STAGE=0, **blocks, **launch)
    sum_dy, sum_dyx = s_dy.sum(1), s_dyx.sum(1)  # [N, C]
    if norm == _NORM_BATCH:
        count = n * ho * wo
        e1 = (gamma0 * sum_dy.sum(0) / count).view(1, c)
        e2 = (gamma0 * sum_dyx.sum(0) / count).view(1, c)
    elif norm == _NORM_GROUP:
        per = c // groups0
        e1 = (gamma0 * sum_dy).view(n, groups0, per).sum(2) / (per * ho * wo)
        e2 = (gamma0 * sum_dyx).view(n, groups0, per).sum(2) / (per * ho * wo)
        e1, e2 = e1.repeat_interleave(per, dim=1), e2.repeat_interleave(per, dim=1)
    else:
        e1 = e2 = zeros
    if da0.numel():
        bwd[grid](xc, dw, pw, da1, *norm0[:3], rstd0, gamma0, e1.contiguous(), e2.contiguous(), s_dy, s_dyx, dpw,
                  da0, ddw, *bwd_dims, STAGE=1, **blocks, **launch)
    dx = None
    if need_x:
        dx = torch.nn.grad.conv2d_input(x.shape, dw_weight.float(), da0, stride, padding, dilation, c).to(x.dtype)
    if not need_params:
        return dx, None, None, None, None, None, None, None, None
    dt = x.dtype
    d_out = torch.einsum("nphw,nohw->po", dz, r1).reshape(out_weight.shape).to(dt)
    dw0 = db0 = None
    if norm != _NORM_NONE:
        dw0, db0 = sum_dyx.sum(0).to(dt), sum_dy.sum(0).to(dt)
        dw1, db1 = dw1.to(dt), db1.to(dt)
    return (dx, ddw.reshape(dw_weight.shape).to(dt), dpw.reshape(pw_weight.shape).to(dt), d_out,
            dz.sum((0, 2, 3)).to(dt), dw0, db0, dw1, db1)


def _float(t):
    return None if t is None else t.float()


def _variance(norm, c, groups, var):
    """``var`` per (sample or 1, channel) ``[N or 1, C]`` float32 (group: repeated over each group's channels)."""
    if norm == _NORM_GROUP:
        return var.float().repeat_interleave(c // groups, dim=1)
    return var.float().view(1, c)


def light_backward(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0, weight1, bias1,
                   mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0, eps1, identity, need_x,
                   need_params):
    """The 9 gradients ``(dx, d_dw, d_pw, d_out, d_out_bias, d_weight0, d_bias0, d_weight1, d_bias1)`` of
    :func:`light_forward` for ``grad_sim = dL/dsim`` (the arguments and results of
    ``torch.ops.nsl.light_predictor_backward``; None where not computed: ``dx`` without ``need_x``, the rest
    without ``need_params``, the norms' without a norm). ``mean*/var*``: the statistics the forward used (running,
    or its batch statistics). With ``a0 = dw(x)``, ``a1 = pw(ReLU(N0(a0)))``, ``dz = grad_sim (1 - g^2)``::

        dy1 = (out^T dz) [r1 > 0],   da1 = N1'(dy1),   dy0 = (pw^T da1) [r0 > 0],   da0 = N0'(dy0)
        dx = dw^T da0 (transposed depthwise conv),  d_dw[c, p] = sum da0[c] x_p[c],  d_pw = sum da1 r0^T,
        d_out = sum dz r1^T,  d_out_bias = sum dz

    The depthwise half (``C`` channels: ``a0``, ``r0``, ``dy0``, ``da0``, ``d_dw``, ``d_pw``) runs in Triton
    (``light_fwd`` stage 3 writes ``a1`` float32 ``[N, hidden, L]``; ``light_bwd`` stages 0 and 1 recompute
    ``a0`` per tile, never writing it, and write ``da0`` float32 ``[N, C, L]``; ``d_dw``/``d_pw`` are float32
    atomic sums, not bitwise reproducible). The hidden and output layers' maps (``hidden``, ``P or P * P``
    channels) and ``dx`` (``torch.nn.grad.conv2d_input`` on ``da0``) run in PyTorch ops, in float32. Outputs in
    ``x``'s dtype. Shapes and dtypes as :func:`light_forward`. Not autograd-aware.
    """
    with _on_device(x):
        return _light_backward(grad_sim, sim, x, dw_weight, pw_weight, out_weight, weight0, bias0, mean0, var0,
                               weight1, bias1, mean1, var1, stride, padding, dilation, norm, groups0, groups1, eps0,
                               eps1, identity, need_x, need_params)
