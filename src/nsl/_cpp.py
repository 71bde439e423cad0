"""Loader of the fused CPU kernel of dynamic neural similarity convolution.

The C++ sources (``csrc/*.cpp``, split by job, overview in ``csrc/kernel.h``) register CPU kernels
for the operators that :mod:`nsl._ops` defines (``TORCH_LIBRARY_IMPL(nsl, CPU, m)``, as torchvision's
C++ operators do). They are JIT-compiled as a plain library with :func:`torch.utils.cpp_extension.load`
on first use, once per process (thread-safe), into the
cache of :mod:`nsl._build` (``$NSL_EXTENSIONS_DIR``, default ``~/.cache/nsl/extensions``, keyed on
the source's hash, torch/Python versions and flags; built in a temporary folder, published
atomically, verified by size and sha256 before it is loaded, guarded by a flock that dies with
its holder), and loaded with :func:`torch.ops.load_library` after that check; from then on the
dispatcher sends CPU tensors to the C++ kernels. Later processes reuse the build. When compiling
is impossible (no compiler, no ninja) or ``NSL_DISABLE_CPP=1`` is set, :func:`is_available` returns False and
:func:`unavailable_reason` says why (with one ``RuntimeWarning`` per process unless disabled on
purpose); importing this module never raises. :func:`build_status` reports the cache without building.

Shapes (``P = kh * kw``, positions row-major ``q = i * kw + j`` with offset ``(i, j)``)::

    x      [N, C_in, H, W]
    weight [C_out, C_in / groups, kh, kw]
    sim    [N, P, H_out, W_out]       diagonal: m
           [N, P, P, H_out, W_out]    full: M[n, p, q] links filter position p with input position q
    out    [N, C_out, H_out, W_out],  H_out = (H + 2 ph - dh (kh - 1) - 1) // sh + 1

With ``col[n, c, q](y) = x[n, c, y_h sh + dh i - ph, y_w sw + dw j - pw]`` (zero outside)::

    diagonal: out[n, o](y) = sum_{c in group(o), q} W[o, c, q] m[n, q](y) col[n, c, q](y)
    full:     out[n, o](y) = sum_{c, p} W[o, c, p] sum_q M[n, p, q](y) col[n, c, q](y)

``m = 1`` (``M = I``) gives exactly ``F.conv2d`` (no bias). Gradients (of any order) come from the
operators' autograd formulas in :mod:`nsl._ops`.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import _build
from ._geometry import pair

__all__ = ["dynamic_ns_conv2d", "is_available", "unavailable_reason", "build_status"]

_EXT_NAME = "nsl_dynamic_ns_conv"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "dynamic_ns_conv.cpp"

_lock = threading.Lock()
_library = None
_reason: str | None = None
_tried = False


def _spec() -> _build.KernelSpec:
    """The kernel's cache entry: this source, ``-O3`` (and OpenMP on Linux), under ``$NSL_EXTENSIONS_DIR``."""
    cflags, ldflags = ["-O3"], []
    if sys.platform.startswith("linux"):  # at::parallel_for needs OpenMP to run in parallel
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return _build.KernelSpec(_EXT_NAME, _SOURCE, tuple(cflags), tuple(ldflags), _build.cache_root())


def _say(line: str) -> None:
    """Print ``line`` to stderr on a line of its own: any tqdm progress bar is cleared first and redrawn after."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(line, file=sys.stderr, flush=True)


def _announce(tmp: Path) -> None:
    _say(f"nsl: compiling the CPU kernel into {tmp.parent} (once; {_build.BUILD_TIME})...")


def build_status() -> tuple[Path | None, str]:
    """``(cache folder, state)`` of the kernel without building or loading it.

    State: ``'built'``, ``'not built'``, ``'damaged: ...'`` (rebuilt on next use), or why it cannot be
    used at all (``NSL_DISABLE_CPP=1``, source missing; then the folder is None).
    """
    why = _not_buildable()
    return (None, why) if why else _build.status(_spec())


def _not_buildable() -> str | None:
    """Why the kernel is not to be built at all (``NSL_DISABLE_CPP=1``, source missing), else None."""
    if os.environ.get("NSL_DISABLE_CPP") == "1":
        return "disabled by NSL_DISABLE_CPP=1"
    if not _SOURCE.exists():
        return f"kernel source not found at {_SOURCE}"
    return None


def _compile():
    return _build.load_or_build(_spec(), announce=_announce)


def _one_line(text: str) -> str:
    """``text`` with its line breaks folded into spaces."""
    return " ".join(text.split())


def _first_complaint(message: str) -> str:
    """The most telling line of a build failure (the ninja log repeats whole command lines)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for marker in ("error:", "not found", "No such file", "Error"):
        for ln in lines:
            if marker in ln and len(ln) < 400:
                return ln
    return (lines[-1] if lines else "")[:300]


def _load():
    """Load the kernel library (registering its CPU kernels with the dispatcher) and return its path,
    or None when it is unavailable; compiles at most once per process."""
    global _library, _reason, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        try:
            _reason = _not_buildable()
            if _reason is None:
                _library = _compile()
        except Exception as e:  # noqa: BLE001 - any build failure just disables the kernel
            _library = None
            if isinstance(e, _build.BuildUnavailable):  # nothing was compiled: say why, not "compiling failed"
                _reason = str(e)
            elif isinstance(e, TimeoutError):
                _reason = f"waiting for the CPU kernel's build timed out: {e}"
            else:
                _reason = f"compiling the CPU kernel failed: {type(e).__name__}: {_first_complaint(str(e))}"
        _tried = True
        if _library is None and os.environ.get("NSL_DISABLE_CPP") != "1":
            _warn_fallback(_reason)
    return _library


def _warn_fallback(reason: str) -> None:
    """The one ``RuntimeWarning`` of a process whose CPU kernel is unavailable, printed as one line (no source
    line under it: it is issued for ``nsl``, not for a line of code) on a line of its own (a tqdm progress bar
    on the terminal is cleared first and redrawn after)."""
    from tqdm import tqdm

    message = (f"the fused CPU kernel is unavailable ({_one_line(reason)}); dynamic layers use the slower "
               "pure-PyTorch backend. `nsl doctor` shows why, `nsl doctor --build` retries the build "
               "(NSL_DISABLE_CPP=1 silences this).")
    with tqdm.external_write_mode(file=sys.stderr):
        warnings.warn_explicit(message, RuntimeWarning, filename="nsl", lineno=0, module="nsl._cpp")


def ensure_loaded() -> None:
    """Load the kernel now (compiling it on first use) unless this process has tried already.

    Called by :func:`nsl.functional.ns_conv2d` before its first CPU call of the operator: once the library is
    loaded the dispatcher sends CPU tensors straight to the C++ kernels. Without it the first call goes through
    the operator's Python default implementation, and PyTorch imports ``torch._dynamo`` to wrap that (about
    2 s of the first forward, for nothing when the C++ kernel is then used)."""
    if not _tried:
        _load()


def is_available() -> bool:
    """True when the CPU kernel is compiled (or compiles now) and usable."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (None when it is True)."""
    _load()
    return _reason


def _ext():
    """The kernel's tuning operators, ``torch.ops.nsl_cpu`` (``set_tile_bytes``, ``set_min_tile``,
    ``set_gemm_backend``, ``gemm_backends``; tests and benchmarks), once the kernel is loaded;
    ``RuntimeError`` saying why when it cannot be."""
    if _load() is None:
        raise RuntimeError(f"nsl CPU kernel unavailable: {_reason}")
    return torch.ops.nsl_cpu


def dynamic_ns_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    sim: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Dynamic neural similarity convolution with the fused CPU kernel (autograd-aware).

    ``x [N, C_in, H, W]``, ``weight [C_out, C_in/groups, kh, kw]``, ``sim`` either
    ``[N, P, H_out, W_out]`` (diagonal ``m``) or ``[N, P, P, H_out, W_out]`` (full ``M``), see the
    module docstring for the formulas. Returns ``[N, C_out, H_out, W_out]`` without bias.
    CPU float32/float64 only (``TypeError`` otherwise); inputs are made contiguous here.
    """
    tensors = (x, weight, sim)
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("dynamic_ns_conv2d expects tensors")
    if any(t.device.type != "cpu" for t in tensors):
        raise TypeError("dynamic_ns_conv2d (CPU kernel) expects CPU tensors")
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        raise TypeError(
            "dynamic_ns_conv2d (CPU kernel) expects float32 or float64 tensors of one dtype, got "
            f"{x.dtype}, {weight.dtype}, {sim.dtype}"
        )
    _ext()  # the CPU kernel is loaded (registered with the dispatcher), or RuntimeError saying why not
    return torch.ops.nsl.dynamic_ns_conv2d(x, weight, sim, pair(stride, "stride"), pair(padding, "padding"),
                                    pair(dilation, "dilation"), int(groups))
