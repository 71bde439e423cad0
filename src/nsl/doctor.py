"""``nsl doctor``: versions, the dynamic backends each device can use, and the C++ kernel's cache.

Without ``--build`` nothing is compiled or loaded: the cache is inspected (:func:`nsl._cpp.build_status`).
``--build`` compiles the CPU kernel now (so a training run never pays the compile in its first step).
Whether built or not, it checks what a build needs: a usable cache folder (creatable and writable; a file in
its place is a problem), a C++ compiler and ninja (that of this interpreter's environment counts, activated
or not). Exit 0 when everything usable is usable; 1 when the CPU kernel cannot be built or used (no compiler,
no ninja, an unusable or damaged cache, a failed build) or a CUDA device cannot run the Triton kernels.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import warnings

import torch

__all__ = ["add_parser", "doctor"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def doctor(build: bool = False, out=None) -> int:
    """Print the report (see the module docstring) to ``out``; ``build``: compile the CPU kernel first.

    Returns the exit code (0 fine, 1 a problem named in the output). Never raises for a broken setup.
    """
    from . import _build, _cpp

    def say(line: str) -> None:
        print(line, file=out or sys.stdout, flush=True)

    ok = True
    say(f"python {sys.version.split()[0]} ({sys.executable})")
    ninja_at = _build.ninja_folder()
    say(f"torch {torch.__version__}, triton {_version('triton')}, numpy {_version('numpy')}, "
        f"ninja {_version('ninja')}" + (f" (in {ninja_at})" if ninja_at else ""))
    folder, state = _cpp.build_status()
    # what a build needs: a usable cache folder, a compiler and ninja (checked even when nothing is built)
    unusable = state.removeprefix("unusable: ") if state.startswith("unusable: ") else None
    toolchain = _build.toolchain_problem() if folder is not None else None
    if build and folder is not None:
        if state == "built":
            say("--build: nothing to do, the CPU kernel is already built")
        elif unusable or toolchain:
            why = f"the kernel cache cannot be used: {unusable}" if unusable else \
                f"the CPU kernel cannot be compiled here: {toolchain}"
            say(f"--build: skipped, nothing was compiled: {why}")
        else:
            say(f"--build: compiling the CPU kernel into {folder} ({_build.BUILD_TIME})...")
            start = time.monotonic()
            with warnings.catch_warnings():  # the reason is printed below; no second copy as a warning
                warnings.simplefilter("ignore")
                built = _cpp.is_available()
            if built:
                say(f"--build: compiled in {time.monotonic() - start:.0f} s")
            folder, state = _cpp.build_status()
            if not built:
                state = f"build failed: {_cpp.unavailable_reason()}"
                say(f"--build: failed: {_cpp.unavailable_reason()}")
    elif build:
        say(f"--build: skipped, nothing was compiled: {state}")
    if folder is None:
        say(f"CPU kernel cache: none ({state})")
        cpu, ok = f"pure PyTorch ({state})", state.startswith("disabled")  # disabling it on purpose is fine
    elif unusable:
        say(f"CPU kernel cache: {folder}: unusable: {unusable}")
        cpu, ok = "pure PyTorch: the kernel cache cannot be used (see above)", False
    else:
        hint = ""
        if state != "built" and toolchain:
            hint = " (and it cannot be compiled here: see below)"
        elif state == "not built":
            hint = " (compiled on first use, or now with `nsl doctor --build`)"
        elif state != "built":
            hint = " (`nsl doctor --build` rebuilds it)"
        say(f"CPU kernel cache: {folder}: {state}{hint}")
        if toolchain and state != "built":
            cpu, ok = f"pure PyTorch: the fused C++ kernel cannot be compiled: {toolchain}", False
        elif state in ("built", "not built"):
            cpu = "fused C++ kernel" + (" (not built yet)" if state == "not built" else "")
        else:
            cpu, ok = f"pure PyTorch until the C++ kernel is rebuilt ({state})", False
    say(f"CPU dynamic backend: {cpu}")
    if not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        say(f"CUDA dynamic backend: no CUDA device ({why})")
    else:
        from . import _ops

        for i in range(torch.cuda.device_count()):
            device = torch.device("cuda", i)
            reason = _ops.unavailable_reason("triton", device)
            name = torch.cuda.get_device_name(i)
            if reason is None:
                say(f"CUDA dynamic backend on {device} ({name}): Triton kernels")
            else:
                say(f"CUDA dynamic backend on {device} ({name}): pure PyTorch, Triton unusable: {reason}")
                ok = False
    say("all fine" if ok else "problems found (see above)")
    return 0 if ok else 1


def _cli(args: argparse.Namespace) -> int:
    return doctor(build=args.build)


def add_parser(sub) -> None:
    """Add ``nsl doctor`` to the subcommands ``sub`` of the ``nsl`` parser."""
    p = sub.add_parser("doctor", help="versions, available dynamic backends and the C++ kernel cache (--build: "
                       "compile the kernel now)",
                       description="Print the Python, torch, triton, numpy and ninja versions, which dynamic "
                                   "similarity backend each device uses (CPU: the fused C++ kernel or why not; "
                                   "CUDA: the Triton kernels or why not), and where the C++ kernel cache is and "
                                   "whether it is built (nothing is compiled). --build compiles the kernel now. "
                                   "Exit 0 when all is fine, 1 when a problem is shown.")
    p.add_argument("--build", action="store_true", help="compile the CPU kernel now if it is not built (says what "
                   "it did, or why it skipped the build)")
    p.set_defaults(func=_cli)
