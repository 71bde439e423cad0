"""Per-phase CPU time of the fused CPU kernel (forward and backward), from a profiling build.

Builds the kernel's sources (``src/nsl/csrc``) once more with ``-DNSL_PROFILE`` (``csrc/profile.h``: each
phase's CPU time, summed over threads) into ``--build-dir`` (default: a folder of the system temp dir named
after the sources' hash) and loads it instead of the normal build (``NSL_DISABLE_CPP=1`` for this process).
On x86-64 Linux it is built for this machine's CPU only (``-march=native -DNSL_SINGLE_ISA``: one version of
each loop instead of the normal build's three instruction-set clones, a third of the compile time); the
clone the normal build picks here is compiled for the same vector ISA. The light predictor's source
(``light_predictor.cpp``, its own operators, no phase marks) is left out of this build.
For each ``benchmarks/layers.py`` shape (or ``NxC_INxC_OUTxHW``) and layout (``diag``, ``full``) it runs the
operator's forward and its backward (dx, dweight, dsim) ``--repeat`` times, interleaved with
``nn.functional.conv2d``'s forward and forward + backward, and prints per call the CPU time
(``time.process_time``: time spent descheduled on a loaded machine does not count; min over the rounds),
the ratios to conv, and each phase's CPU time in the round with the smallest total. Writes JSON to ``--out``.

    python benchmarks/kernel_phases.py [--shapes cifar-c32,...] [--layouts diag,full] [--threads 1]
        [--repeat 5] [--build-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ["NSL_DISABLE_CPP"] = "1"  # this process loads the profiling build, not the normal one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, write_json  # noqa: E402
from layers import SHAPES  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import nsl._ops  # noqa: E402, F401  (defines the operators the profiling build registers kernels for)

CSRC = ROOT / "src" / "nsl" / "csrc"


def build(build_dir: Path | None) -> None:
    """Compile the kernel with ``-DNSL_PROFILE`` (cached by the sources' hash) and load it."""
    from torch.utils import cpp_extension

    files = sorted(p for p in CSRC.glob("*.cpp") if p.name != "light_predictor.cpp") + sorted(CSRC.glob("*.h"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:12]
    if build_dir is None:
        build_dir = Path(tempfile.gettempdir()) / f"nsl-profile-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    linux = sys.platform.startswith("linux")
    flags = ["-O3", "-DNSL_PROFILE"] + (["-fopenmp"] if linux else [])
    if linux and platform.machine() == "x86_64":
        flags += ["-march=native", "-DNSL_SINGLE_ISA"]
    cpp_extension.load(name="nsl_dynamic_ns_conv_profile", sources=[str(p) for p in files if p.suffix == ".cpp"],
                       extra_cflags=flags, extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                       build_directory=str(build_dir), is_python_module=False, verbose=False)


def shape_of(name: str) -> tuple[int, int, int, int]:
    """``(N, C_in, C_out, H = W)`` of a ``benchmarks/layers.py`` shape name, or of ``NxC_INxC_OUTxHW``
    (e.g. ``2x4x4x8``); ``ValueError`` for anything else."""
    if name in SHAPES:
        return SHAPES[name]
    parts = name.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)} or NxC_INxC_OUTxHW")
    return tuple(int(p) for p in parts)


def inputs(shape: str, layout: str):
    n, c, o, hw = shape_of(shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen)
    w = torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    sim_shape = (n, 9, hw, hw) if layout == "diag" else (n, 9, 9, hw, hw)
    sim = 1 + 0.1 * torch.randn(sim_shape, generator=gen)
    gout = torch.randn(n, o, hw, hw, generator=gen)
    return x, w, sim, gout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated benchmarks/layers.py shapes or NxC_INxC_OUTxHW")
    parser.add_argument("--layouts", default="diag,full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_phases.json")
    args = parser.parse_args(argv)
    for name in args.shapes.split(","):
        try:
            shape_of(name)
        except ValueError as e:
            parser.error(f"--shapes: {e}")
    torch.set_num_threads(args.threads)
    build(args.build_dir)
    ext = torch.ops.nsl_cpu
    names = list(ext.phase_names())
    geo = ([1, 1], [1, 1], [1, 1], 1)
    rows = []
    for shape in args.shapes.split(","):
        for layout in args.layouts.split(","):
            x, w, sim, gout = inputs(shape, layout)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

            def conv_fb(xr=xr, wr=wr, gout=gout):
                F.conv2d(xr, wr, padding=1).backward(gout)

            runs = {
                "conv.fwd": lambda x=x, w=w: F.conv2d(x, w, padding=1),
                "conv.fwd+bwd": conv_fb,
                "op.fwd": lambda x=x, w=w, sim=sim: torch.ops.nsl.dynamic_ns_conv2d(x, w, sim, *geo),
                "op.bwd": lambda x=x, w=w, sim=sim, gout=gout: torch.ops.nsl.dynamic_ns_conv2d_backward(
                    gout, x, w, sim, *geo, True, True, True),
            }
            for run in runs.values():
                run()
            best = dict.fromkeys(runs, float("inf"))
            phases = {}
            for _ in range(args.repeat):
                for key, run in runs.items():
                    ext.reset_phase_times()
                    t0 = time.process_time()
                    run()
                    dt = time.process_time() - t0
                    if dt < best[key]:
                        best[key] = dt
                        if key.startswith("op."):
                            phases[key] = [float(v) for v in ext.phase_times()]
            ms = {k: 1e3 * v for k, v in best.items()}
            row = {"shape": shape, "layout": layout, "ms": ms,
                   "fwd_x_conv": best["op.fwd"] / best["conv.fwd"],
                   "fwd_bwd_x_conv": (best["op.fwd"] + best["op.bwd"]) / best["conv.fwd+bwd"],
                   "phases_ms": {n: v for key in ("op.fwd", "op.bwd")
                                 for n, v in zip(names, phases[key], strict=True) if v > 0}}
            rows.append(row)
            print(f"{shape} {layout}: conv fwd {ms['conv.fwd']:.2f} ms, fwd+bwd {ms['conv.fwd+bwd']:.2f} ms | "
                  f"op fwd {ms['op.fwd']:.2f} ms ({row['fwd_x_conv']:.2f}x), bwd {ms['op.bwd']:.2f} ms, "
                  f"fwd+bwd {row['fwd_bwd_x_conv']:.2f}x conv", flush=True)
            print("    " + "  ".join(f"{n} {v:.2f}" for n, v in row["phases_ms"].items()), flush=True)
    write_json(args.out, {"environment": environment(), "repeat": args.repeat, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
