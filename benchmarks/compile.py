"""A whole dynamic layer eager vs ``torch.compile`` on CPU (issue 9's measurement), forward + backward.

One :class:`nsl.DynamicNSConv2d` (sphere predictor, authors' init, diagonal ``M`` unless
``--similarity full``) at the given shape, against ``nn.Conv2d`` of the same shape:

* ``conv``: ``nn.Conv2d`` (the baseline of the ratios);
* ``eager``: the layer as is (``auto`` backend: the registered op on the C++ kernel);
* ``aot_eager`` / ``inductor``: ``torch.compile(layer, backend=..., fullgraph=True)``; the
  compiled graph calls ``torch.ops.nsl.dynamic_ns_conv2d`` (counted and printed).

Times are the min over ``--repeat`` interleaved rounds after warm-up (compilation happens during the
warm-up and is reported separately). Writes JSON to ``--out``.

    python benchmarks/compile.py [--batch 64] [--channels 32] [--size 32] [--repeat 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, print_table, time_cases, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import nsl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--similarity", choices=["diagonal", "full"], default="diagonal")
    parser.add_argument("--modes", default="eager,aot_eager,inductor", help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, c, hw = args.batch, args.channels, args.size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=gen, requires_grad=True)
    gout = torch.randn(n, c, hw, hw, generator=gen)
    torch.manual_seed(0)
    conv = nn.Conv2d(c, c, 3, padding=1)
    layer = nsl.DynamicNSConv2d(c, c, 3, padding=1, similarity=args.similarity, predictor_init="authors")

    op_calls: dict[str, int] = {}

    def counting(backend: str):
        """A compile backend that counts the registered op in the Dynamo graph, then hands on."""
        from torch._dynamo import lookup_backend

        def compiler(gm, inputs):
            op_calls[backend] = sum(1 for nd in gm.graph.nodes if "nsl.dynamic_ns_conv2d" in str(nd.target))
            return lookup_backend(backend)(gm, inputs)

        return compiler

    modules = {"conv": conv}
    for mode in args.modes.split(","):
        if mode == "eager":
            modules[mode] = layer
        elif mode in ("aot_eager", "inductor"):
            modules[mode] = torch.compile(layer, backend=counting(mode), fullgraph=True)
        else:
            parser.error(f"unknown mode {mode!r}; expected eager, aot_eager or inductor")

    compile_s = {}
    runs = {}
    for name, module in modules.items():
        def run(module=module):
            module(x).backward(gout)

        t0 = time.perf_counter()
        run()  # the first call compiles
        compile_s[name] = time.perf_counter() - t0
        runs[name] = run
    times = time_cases(runs, args.repeat)
    rows = [{"mode": name, "ms": 1e3 * t, "x_conv": t / times["conv"],
             "x_eager": t / times["eager"] if "eager" in times else None,
             "first_call_s": compile_s[name], "op_in_graph": op_calls.get(name)} for name, t in times.items()]
    print_table(rows, [("mode", "mode", ""), ("ms", "fwd+bwd ms", ".1f"), ("x_conv", "x conv", ".2f"),
                       ("x_eager", "x eager", ".2f"), ("first_call_s", "first call s", ".1f"),
                       ("op_in_graph", "op calls in graph", "d")])
    write_json(args.out, {"environment": environment(), "shape": [n, c, c, hw], "similarity": args.similarity,
                          "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
