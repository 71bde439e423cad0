"""Forward + backward cost of every NSL layer against nn.Conv2d, per typical layer shape.

For each shape (CIFAR- and ImageNet-like 3x3 layers) it measures, in one run:

* ``conv``: ``nn.Conv2d`` (the baseline of every ratio);
* ``static-{diagonal,full,lowrank}``: :class:`nsl.NSConv2d` (reparametrised weight + one conv);
* ``folded``: ``nsl.fold`` of a trained-looking static-full layer (an ``nn.Conv2d``);
* ``dyn-diag/<backend>`` and ``dyn-full/<backend>``: the modulated convolution alone, given
  ``M(y)`` (``nsl.functional.ns_conv2d`` with gradients for x, w and M), on each backend;
* ``pred-diag/<predictor>``, ``pred-full/sphere``: the similarity predictor alone;
* ``layer-diag/<predictor>``: a whole :class:`nsl.DynamicNSConv2d` (predictor + modulated conv);
* ``deform_conv2d``: ``torchvision.ops.deform_conv2d`` with zero offsets and ``mask = m`` (computes
  dynamic diagonal NSL), where torchvision is importable.

Columns: forward + backward time (min over ``--repeat`` interleaved rounds after warm-up; wall time, or CPU time
with ``--clock cpu``), its ratio to ``conv``, bytes
saved for backward, and the peak resident-memory increase of one forward + backward in a fresh
process (``--rss``; ratio to conv's). Writes JSON to ``--out``.

    python benchmarks/layers.py [--shapes cifar-c32,...] [--threads 2] [--clock wall|cpu] [--rss] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CLOCKS,
    ROOT,
    add_clock_option,
    environment,
    print_table,
    rss_child,
    rss_delta,
    saved_bytes,
    time_cases,
    write_json,
)

sys.path.insert(0, str(ROOT / "src"))
import nsl  # noqa: E402
from nsl import _ops  # noqa: E402
from nsl import functional as NF  # noqa: E402

SHAPES = {  # name: (N, C_in, C_out, H = W)
    "cifar-c32": (64, 32, 32, 32),
    "cifar-c128": (64, 128, 128, 8),
    "imagenet-c64": (16, 64, 64, 56),
    "imagenet-c256": (8, 256, 256, 14),
}


def _backends() -> list[str]:
    names = ["cpp"] if _ops.unavailable_reason("cpp") is None else []
    return names + ["unfold", "ztrick", "reference"]


def _deform_available() -> bool:
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # torchvision absent or not importable beside this torch
        return False
    return True


def implementations() -> list[str]:
    impls = ["conv", "static-diagonal", "static-full", "static-lowrank", "folded"]
    for kind in ("diag", "full"):
        impls += [f"dyn-{kind}/{b}" for b in _backends()]
    impls += ["pred-diag/sphere", "pred-diag/cosine", "pred-diag/light", "pred-full/sphere",
              "layer-diag/sphere", "layer-diag/light"]
    if _deform_available():
        impls.append("deform_conv2d")
    return impls


def make_run(shape: str, impl: str):
    """A closure doing one forward + backward of ``impl`` at ``shape``, and one doing only the forward."""
    n, c, o, hw = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen, requires_grad=True)
    gout = torch.randn(n, o, hw, hw, generator=gen)
    torch.manual_seed(0)
    if impl in ("conv", "folded") or impl.startswith(("static", "layer")):
        if impl == "conv":
            module = nn.Conv2d(c, o, 3, padding=1)
        elif impl == "folded":
            module = nsl.fold(nsl.NSConv2d(c, o, 3, padding=1, similarity="full"))
        elif impl.startswith("static"):
            module = nsl.NSConv2d(c, o, 3, padding=1, similarity=impl.split("-")[1])
        else:
            module = nsl.DynamicNSConv2d(c, o, 3, padding=1, similarity="diagonal",
                                         predictor=impl.split("/")[1], predictor_init="authors")

        def forward():
            return module(x)
    elif impl.startswith("pred"):
        kind, name = impl.split("/")
        sim = "diagonal" if kind == "pred-diag" else "full"
        layer = nsl.DynamicNSConv2d(c, o, 3, padding=1, similarity=sim, predictor=name, predictor_init="authors")
        predictor = layer.predictor
        gout = torch.randn(n, 9 if sim == "diagonal" else 81, hw, hw, generator=gen)

        def forward():
            return predictor(x)
    else:
        w = (torch.randn(o, c, 3, 3, generator=gen) / (9 * c) ** 0.5).requires_grad_(True)
        full = impl.startswith("dyn-full")
        shape_m = (n, 9, 9, hw, hw) if full else (n, 9, hw, hw)
        m = (1 + 0.1 * torch.randn(shape_m, generator=gen)).requires_grad_(True)
        if impl == "deform_conv2d":
            from torchvision.ops import deform_conv2d

            offset = torch.zeros(n, 18, hw, hw)

            def forward():
                return deform_conv2d(x, offset, w, padding=1, mask=m)
        else:
            backend = impl.split("/")[1]

            def forward():
                with NF.use_backend(backend):
                    return NF.ns_conv2d(x, w, m, padding=1)

    def run():
        forward().backward(gout)

    return run, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    parser.add_argument("--impls", default=None, help="comma-separated subset of the implementations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    add_clock_option(parser)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in fresh processes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layers.json")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        shape, impl = args.rss_child.split(":", 1)
        rss_child(make_run(shape, impl)[0])
        return
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; expected among {list(SHAPES)}")
    impls = implementations() if args.impls is None else args.impls.split(",")
    if "conv" not in impls:
        impls.insert(0, "conv")  # the baseline of every ratio
    rows = []
    for shape in shapes:
        cases = {impl: make_run(shape, impl) for impl in impls}
        times = time_cases({impl: case[0] for impl, case in cases.items()}, args.repeat, clock=CLOCKS[args.clock])
        base_rss = None
        for impl in impls:
            t = times[impl]
            row = {"shape": shape, "impl": impl, "ms": 1e3 * t, "x_conv": t / times["conv"],
                   "saved_mb": saved_bytes(cases[impl][1]) / 2**20}
            if args.rss:
                rss = rss_delta([__file__, "--rss-child", f"{shape}:{impl}", "--threads", str(args.threads)])
                row["peak_rss_mb"] = None if rss is None else rss / 2**20
                if impl == "conv":
                    base_rss = row["peak_rss_mb"]
                if base_rss and row["peak_rss_mb"] is not None:
                    row["rss_x_conv"] = row["peak_rss_mb"] / base_rss
            rows.append(row)
            print(f"  {shape:<14} {impl:<20} {row['ms']:9.2f} ms  x{row['x_conv']:6.2f}", flush=True)
        del cases
    print()
    columns = [("shape", "shape", ""), ("impl", "implementation", ""), ("ms", "fwd+bwd ms", ".2f"),
               ("x_conv", "x conv", ".2f"), ("saved_mb", "saved MiB", ".1f")]
    if args.rss:
        columns += [("peak_rss_mb", "peak RSS MiB", ".1f"), ("rss_x_conv", "RSS x conv", ".2f")]
    print_table(rows, columns)
    write_json(args.out, {"environment": environment(), "clock": args.clock, "shapes": {k: SHAPES[k] for k in shapes},
                          "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
