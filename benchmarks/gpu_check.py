"""One command for the first GPU: the CUDA tests, then the dynamic-NSL layer benchmark, into one JSON file.

1. Tests: ``pytest tests/test_cuda.py tests/test_triton.py`` in a subprocess (every backend against
   the float64 reference on CUDA; the Triton kernels through the interpreter as well); the summary
   and exit code go into the JSON.
2. Benchmark at the README shapes (cifar-c32, cifar-c128, imagenet-c64, imagenet-c256; 3x3,
   padding 1), float32 and bfloat16: forward + backward time (min over ``--repeat`` interleaved
   rounds) and peak CUDA memory above the inputs of

   * ``conv``: ``F.conv2d`` (cuDNN), the baseline of every ratio;
   * ``triton-diag`` / ``triton-full``: ``ns_conv2d`` given ``M`` (diagonal / full) on the Triton kernels;
   * ``triton-diag-separate``: the same with ``dm`` from its own kernel instead of the ``dx`` kernel's shares
     (``nsl._triton.backward(..., fuse_dsim=False)``; full ``M`` always takes that kernel), to measure what the
     fusion gains;
   * ``unfold-diag``: the pure-PyTorch memory-lean backend;
   * ``deform_conv2d``: ``torchvision.ops.deform_conv2d`` with zero offsets and ``mask = m`` (the
     same diagonal computation), where torchvision imports.

   The issue's targets (bfloat16, diagonal): Triton <= 1.5x conv time, >= 5x faster than
   ``deform_conv2d``, peak memory <= 1.5x conv; printed pass/fail per shape, not asserted.

``--cpu-interpret`` runs the same code on CPU tensors through Triton's interpreter at tiny shapes
with one round (needs ``TRITON_INTERPRET=1``; tests/test_gpu_check.py uses it), so that the script
is known to work before a GPU is there. Nothing is asserted: the JSON and the table are the result.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--skip-tests] [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, print_table, time_cases, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from nsl import functional as NF  # noqa: E402

SHAPES = {  # name: (N, C_in, C_out, H = W), as in benchmarks/layers.py
    "cifar-c32": (64, 32, 32, 32),
    "cifar-c128": (64, 128, 128, 8),
    "imagenet-c64": (16, 64, 64, 56),
    "imagenet-c256": (8, 256, 256, 14),
}
TINY_SHAPES = {"tiny-c3": (1, 3, 4, 5)}  # --cpu-interpret: the interpreter costs seconds per call
IMPLS = ("conv", "triton-diag", "triton-full", "triton-diag-separate", "unfold-diag", "deform_conv2d")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGETS = {"time_x_conv": 1.5, "deform_speedup": 5.0, "peak_x_conv": 1.5}


class _TritonFn(torch.autograd.Function):
    """Direct autograd glue for nsl._triton (3x3, padding 1): the ``-separate`` rows (``fuse_dsim=False``), and every
    Triton row when functional has no 'triton' backend."""

    @staticmethod
    def forward(ctx, x, weight, sim, fuse_dsim):
        from nsl import _triton

        ctx.save_for_backward(x, weight, sim)
        ctx.fuse_dsim = fuse_dsim
        return _triton.forward(x, weight, sim, (1, 1), (1, 1), (1, 1), 1)

    @staticmethod
    def backward(ctx, grad):
        from nsl import _triton

        x, weight, sim = ctx.saved_tensors
        grads = _triton.backward(grad, x, weight, sim, (1, 1), (1, 1), (1, 1), 1, *ctx.needs_input_grad[:3],
                                 fuse_dsim=ctx.fuse_dsim)
        return (*grads, None)


def deform_unavailable() -> str | None:
    """Why ``torchvision.ops.deform_conv2d`` cannot be benchmarked here (None when it can)."""
    try:
        from torchvision.ops import deform_conv2d  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent, or built for another torch
        return f"torchvision.ops does not import: {type(e).__name__}: {e}"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    try:
        from nsl import _triton
    except Exception as e:  # noqa: BLE001
        return f"nsl._triton does not import: {e}"
    return _triton.unavailable_reason(device)


def make_run(impl: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
    """A closure doing one forward + backward of ``impl`` (gradients for x, w and M), synchronised."""
    n, c, o, hw = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5).to(device, dtype).requires_grad_(True)
    gout = torch.randn(n, o, hw, hw, generator=gen).to(device, dtype)
    full = "-full" in impl
    m_shape = (n, 9, 9, hw, hw) if full else (n, 9, hw, hw)
    m = (1 + 0.1 * torch.randn(m_shape, generator=gen)).to(device, dtype).requires_grad_(True)
    if impl == "conv":
        m.requires_grad_(False)

        def forward():
            return F.conv2d(x, w, padding=1)
    elif impl == "deform_conv2d":
        from torchvision.ops import deform_conv2d

        offset = torch.zeros(n, 18, hw, hw, device=device, dtype=dtype)

        def forward():
            return deform_conv2d(x, offset, w, padding=1, mask=m)
    elif impl.startswith("triton") and ("triton" not in NF.BACKENDS or impl.endswith("-separate")):
        def forward():
            return _TritonFn.apply(x, w, m, not impl.endswith("-separate"))
    else:
        backend = impl.split("-")[0]

        def forward():
            with NF.use_backend(backend):
                return NF.ns_conv2d(x, w, m, padding=1)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        for t in (x, w, m):
            t.grad = None
        forward().backward(gout)
        sync()

    inputs_bytes = sum(t.numel() * t.element_size() for t in (x, w, m, gout))
    return run, inputs_bytes


def peak_bytes(run, device: torch.device) -> int | None:
    """Peak CUDA memory allocated during one ``run()`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_allocated() - before


def run_tests(cpu: bool) -> dict:
    """pytest on the CUDA tests (and, on a GPU, the interpreter tests of the Triton kernels)."""
    files = ["tests/test_cuda.py"] if cpu else ["tests/test_cuda.py", "tests/test_triton.py"]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-rs"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"passed|failed|skipped|error", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50]
    # exit 5: nothing collected, i.e. every module skipped itself (no CUDA device)
    ok = res.returncode == 0 or (res.returncode == 5 and not failures and not counts.get("failed"))
    return {"command": " ".join(cmd[1:]), "returncode": res.returncode, "ok": ok, "summary": summary,
            "counts": counts, "failures": failures, "seconds": round(time.perf_counter() - t0, 1)}


def benchmark(shapes: dict, device: torch.device, repeat: int, warmup: int) -> tuple[list[dict], dict]:
    skipped = {}
    reason = triton_unavailable(device)
    if reason:
        skipped["triton"] = reason
    reason = deform_unavailable()
    if reason:
        skipped["deform_conv2d"] = reason
    impls = [i for i in IMPLS if not (i.startswith("triton") and "triton" in skipped) and i not in skipped]
    rows = []
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            cases = {}
            for impl in impls:
                try:  # e.g. a peer without this dtype, or out of memory: record it, measure the rest
                    cases[impl] = make_run(impl, shape, dtype, device)
                    if warmup:  # the first warm-up call, here so that a failure drops only this case
                        cases[impl][0]()
                except Exception as e:  # noqa: BLE001
                    if impl == "conv":
                        raise
                    cases.pop(impl, None)
                    skipped[f"{impl}/{shape_name}/{dtype_name}"] = f"{type(e).__name__}: {str(e)[:200]}"
            times = time_cases({impl: case[0] for impl, case in cases.items()}, repeat, max(0, warmup - 1))
            peaks = {impl: peak_bytes(case[0], device) for impl, case in cases.items()}
            for impl in cases:
                row = {"shape": shape_name, "dtype": dtype_name, "impl": impl, "ms": 1e3 * times[impl],
                       "x_conv": times[impl] / times["conv"]}
                if peaks[impl] is not None:
                    row["peak_mb"] = peaks[impl] / 2**20
                    row["peak_x_conv"] = peaks[impl] / max(peaks["conv"], 1)
                if "deform_conv2d" in times and impl != "deform_conv2d":
                    row["deform_speedup"] = times["deform_conv2d"] / times[impl]
                rows.append(row)
                print(f"  {shape_name:<14} {dtype_name:<9} {impl:<14} {row['ms']:9.3f} ms  x{row['x_conv']:6.2f}",
                      flush=True)
            del cases
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, skipped


def target_checks(rows: list[dict]) -> list[dict]:
    """The issue's GPU targets for the Triton diagonal kernel in bfloat16, one row per shape."""
    checks = []
    for r in rows:
        if r["impl"] != "triton-diag" or r["dtype"] != "bfloat16":
            continue
        check = {"shape": r["shape"], "time_x_conv": r["x_conv"], "time_ok": r["x_conv"] <= TARGETS["time_x_conv"]}
        if "deform_speedup" in r:
            check["deform_speedup"] = r["deform_speedup"]
            check["deform_ok"] = r["deform_speedup"] >= TARGETS["deform_speedup"]
        if "peak_x_conv" in r:
            check["peak_x_conv"] = r["peak_x_conv"]
            check["peak_ok"] = r["peak_x_conv"] <= TARGETS["peak_x_conv"]
        checks.append(check)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--cpu-interpret", action="store_true",
                        help="CPU tensors through Triton's interpreter, tiny shapes, one round (a dry run)")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds (default 10; 1 with --cpu-interpret)")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ", ".join(SHAPES))
    parser.add_argument("--fp32-precision", choices=("tf32", "ieee"), default="tf32",
                        help="float32 benchmark rows: TF32 allowed for matmuls and cuDNN alike (default, cuDNN's "
                             "own default) or IEEE everywhere; the tests always set their own")
    args = parser.parse_args(argv)
    if args.cpu_interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--cpu-interpret needs TRITON_INTERPRET=1 in the environment")
        device, shapes, repeat, warmup = torch.device("cpu"), TINY_SHAPES, args.repeat or 1, 0
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-interpret (with TRITON_INTERPRET=1) for a dry run on CPU")
        device, shapes, repeat, warmup = torch.device("cuda"), SHAPES, args.repeat or 10, 3
    if args.shapes:
        names = args.shapes.split(",")
        unknown = [s for s in names if s not in shapes]
        if unknown:
            parser.error(f"unknown shape(s) {unknown}; expected among {list(shapes)}")
        shapes = {k: shapes[k] for k in names}
    t0 = time.perf_counter()
    env = environment()
    if device.type == "cuda":
        env.update({"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                    "fp32_precision": args.fp32_precision})
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    payload = {"mode": "cpu-interpret" if args.cpu_interpret else "cuda", "environment": env, "targets": TARGETS}
    if not args.skip_tests:
        print("running the CUDA tests ...", flush=True)
        payload["tests"] = run_tests(args.cpu_interpret)
        tests = payload["tests"]
        print(f"  {tests['summary']} (exit {tests['returncode']}: {'ok' if tests['ok'] else 'FAILED'})", flush=True)
    print("benchmark (forward + backward) ...", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.fp32_precision == "tf32"
    rows, skipped = benchmark(shapes, device, repeat, warmup)
    payload.update({"shapes": {k: shapes[k] for k in shapes}, "rows": rows, "skipped": skipped,
                    "checks": target_checks(rows), "seconds": round(time.perf_counter() - t0, 1)})
    print()
    print_table(rows, [("shape", "shape", ""), ("dtype", "dtype", ""), ("impl", "implementation", ""),
                       ("ms", "fwd+bwd ms", ".3f"), ("x_conv", "x conv", ".2f"), ("peak_mb", "peak MiB", ".1f"),
                       ("peak_x_conv", "peak x conv", ".2f"), ("deform_speedup", "x faster than deform", ".1f")])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if payload["checks"]:
        print("\ntargets (bfloat16, triton-diag): time <= 1.5x conv, >= 5x faster than deform_conv2d, "
              "peak memory <= 1.5x conv")

        def verdict(c, key):
            return "" if key not in c else ("pass" if c[key] else "FAIL")

        print_table([{**c, "t": verdict(c, "time_ok"), "d": verdict(c, "deform_ok"), "p": verdict(c, "peak_ok")}
                     for c in payload["checks"]],
                    [("shape", "shape", ""), ("time_x_conv", "time x conv", ".2f"), ("t", "time", ""),
                     ("deform_speedup", "x faster than deform", ".1f"), ("d", "deform", ""),
                     ("peak_x_conv", "peak x conv", ".2f"), ("p", "memory", "")])
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({payload['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
