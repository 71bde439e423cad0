"""Whole-network cost of each layer kind: CNN-9 training step and inference, eager and compiled, vs conv.

For each layer kind (``--layers``) it builds CNN-9 (``nsl.models.build_model('cnn9', kind,
width=--width)``, seed 0) and times, in one run:

* ``train``: one training step at batch ``--train-batch``: forward, cross-entropy, backward,
  SGD with momentum (train mode);
* ``infer-bN``: a forward pass in eval mode under ``torch.no_grad()`` at each batch N of
  ``--infer-batches``;

each ``eager`` and, with ``--compile on``, ``compiled`` (``torch.compile(model)``, inductor). All kinds
and modes of one phase are timed together by :func:`common.time_cases` (min over ``--repeat``
interleaved rounds after warm-up; ``--clock cpu`` times the process's CPU time, which leaves out the waits for a
core on a loaded machine), so ``x_conv`` (time over the conv model's, same phase and mode) is
a ratio from the same run. ``--variant NAME=KIND[,KEY=VALUE...]`` (repeatable) adds a named model: CNN-9 of
layer kind ``KIND`` with training-config options (the ``nsl train --set`` names, e.g.
``sphere64-half=dynamic-diagonal,predictor_stride=2``), built as ``nsl train`` builds it. The first call
(where compilation happens) is excluded from the timing and reported as ``first_call_s``. MACs per image
are :func:`nsl.report.count_macs`, with ``macs_x_conv`` beside the time ratio, and ``params`` the model's
parameters. Inputs are random (the cost does not depend on the data).
Writes JSON to ``--out``.

    python benchmarks/network.py [--layers conv,static-full,dynamic-diagonal,dynamic-diagonal-light]
        [--width 16] [--train-batch 128] [--infer-batches 1,128] [--repeat 3] [--threads 2] [--clock wall|cpu]
        [--compile on|off] [--variant NAME=KIND[,KEY=VALUE...]]...
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CLOCKS,
    ROOT,
    add_clock_option,
    environment,
    layer_kinds_with_conv,
    print_table,
    time_cases,
    write_json,
)

sys.path.insert(0, str(ROOT / "src"))
from nsl.models import build_model, count_parameters  # noqa: E402
from nsl.report import count_macs  # noqa: E402
from nsl.train import build_model_for  # noqa: E402
from nsl.train.config import ConfigError, apply_overrides, make_config  # noqa: E402

DEFAULT_LAYERS = "conv,static-full,dynamic-diagonal,dynamic-diagonal-light"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def variant_model(parser, spec: str, width: int, size: int) -> tuple[str, torch.nn.Module]:
    """``NAME=KIND[,KEY=VALUE...]`` as ``(NAME, CNN-9 of kind KIND with the config options KEY=VALUE)``, built by
    :func:`nsl.train.build_model_for` from a ``fast``-protocol config; a bad spec is a one-line ``parser.error``."""
    name, _, rest = spec.partition("=")
    kind, *sets = rest.split(",")
    if not name or not kind:
        parser.error(f"--variant: expected NAME=KIND[,KEY=VALUE...], got {spec!r}")
    try:
        cfg = apply_overrides(make_config("fast", layer=kind, width=width), sets)
    except ConfigError as e:
        parser.error(f"--variant {name}: {e}")
    return name, build_model_for(cfg, dict(num_classes=10, in_channels=3, image_size=size))


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A closure doing one SGD step (lr 0.01, momentum 0.9) of ``model`` (possibly compiled) on ``(x, y)``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def infer(model: torch.nn.Module, x: torch.Tensor):
    """A closure doing one forward pass of ``model`` (eval mode) under ``torch.no_grad()``."""
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def measure_phase(runs: dict[tuple[str, str], object], repeat: int,
                  clock=time.perf_counter) -> dict[tuple[str, str], tuple[float, float]]:
    """Call each run once (timed as the first call, compilation included), then time all together.

    Returns ``{(kind, mode): (min seconds, first-call seconds)}``.
    """
    first = {}
    for key, run in runs.items():
        t0 = time.perf_counter()
        run()
        first[key] = time.perf_counter() - t0
    times = time_cases({f"{k}/{m}": r for (k, m), r in runs.items()}, repeat, warmup=1, clock=clock)
    return {key: (times[f"{key[0]}/{key[1]}"], first[key]) for key in runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated layer kinds (conv is added)")
    parser.add_argument("--width", type=int, default=16, help="CNN-9 width (channels of stage 1)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--infer-batches", default="1,128", help="comma-separated batch sizes for inference")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_clock_option(parser)
    parser.add_argument("--compile", choices=["on", "off"], default="on", help="also time torch.compile (inductor)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[,KEY=VALUE...]",
                        help="also time CNN-9 of layer kind KIND with these training-config options (nsl train "
                             "--set names), under NAME, e.g. sphere64-half=dynamic-diagonal,predictor_stride=2")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "network.json")
    args = parser.parse_args(argv)
    kinds = layer_kinds_with_conv(parser, args.layers)
    try:
        infer_batches = _ints(args.infer_batches)
    except ValueError:
        parser.error(f"--infer-batches: expected comma-separated integers, got {args.infer_batches!r}")
    torch.set_num_threads(args.threads)
    modes = ["eager"] + (["compiled"] if args.compile == "on" else [])
    if args.compile == "on":
        # every compiled model shares CNN-9's forward code, and dynamo keeps at most recompile_limit (8) graphs per
        # code object before it runs the rest eagerly: room for all kinds x phases, alive together for the timing
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   4 * (len(kinds) + len(args.variant)) * (1 + len(infer_batches)))
    gen = torch.Generator().manual_seed(0)
    shape = (3, args.size, args.size)

    models, macs = {}, {}
    for k in kinds:
        torch.manual_seed(0)
        models[k] = build_model("cnn9", k, num_classes=10, width=args.width)
        macs[k] = count_macs(models[k], shape)
    for spec in args.variant:
        torch.manual_seed(0)
        name, model = variant_model(parser, spec, args.width, args.size)
        if name in models:
            parser.error(f"--variant: the name {name!r} is taken (a layer kind or an earlier variant)")
        models[name], macs[name] = model, count_macs(model, shape)
        kinds.append(name)

    def variant(k: str, mode: str, train: bool) -> torch.nn.Module:
        m = copy.deepcopy(models[k]).train(train)
        return torch.compile(m, dynamic=False) if mode == "compiled" else m

    phases = {"train": None, **{f"infer-b{b}": b for b in infer_batches}}
    rows = []
    for phase, batch in phases.items():
        runs = {}
        for k in kinds:
            for mode in modes:
                if batch is None:
                    x = torch.randn(args.train_batch, *shape, generator=gen)
                    y = torch.randint(0, 10, (args.train_batch,), generator=gen)
                    runs[(k, mode)] = train_step(variant(k, mode, True), x, y)
                else:
                    runs[(k, mode)] = infer(variant(k, mode, False), torch.randn(batch, *shape, generator=gen))
        result = measure_phase(runs, args.repeat, CLOCKS[args.clock])
        for (k, mode), (t, first) in result.items():
            rows.append({"phase": phase, "batch": args.train_batch if batch is None else batch, "kind": k,
                         "mode": mode, "ms": 1e3 * t, "x_conv": t / result[("conv", mode)][0],
                         "x_eager": t / result[(k, "eager")][0], "macs": macs[k],
                         "macs_x_conv": macs[k] / macs["conv"], "params": count_parameters(models[k]),
                         "first_call_s": first})
        print(f"[{phase} done]", flush=True)
    print_table(rows, [("phase", "phase", ""), ("kind", "layer kind", ""), ("mode", "mode", ""),
                       ("ms", "ms", ".1f"), ("x_conv", "x conv", ".2f"), ("x_eager", "x eager", ".2f"),
                       ("macs", "MACs/image", ",d"), ("macs_x_conv", "MACs x conv", ".2f"),
                       ("first_call_s", "first call s", ".1f")])
    write_json(args.out, {"environment": environment(), "model": "cnn9", "width": args.width, "size": args.size,
                          "repeat": args.repeat, "clock": args.clock, "modes": modes, "rows": rows,
                          "variants": dict(spec.partition("=")[::2] for spec in args.variant)})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
