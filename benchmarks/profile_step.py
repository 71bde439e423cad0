"""Where a CNN-9 training step's time goes, per layer kind, from ``torch.profiler``.

For each layer kind (``--layers``) and named variant (``--variant NAME=KIND[,KEY=VALUE...]``, as in
``benchmarks/network.py``) it builds CNN-9 (width ``--width``, seed 0, train mode) and profiles one training
step at batch ``--batch`` (forward, cross-entropy, backward, SGD with momentum) per round, ``--repeat`` rounds
interleaving the kinds after a warm-up step each. The step is split into (milliseconds of the calling thread's
wall time, intra-op threads included):

* ``convs_norms``: the model's own convolutions and batch norms (``aten::conv2d``, ``aten::batch_norm`` and the
  other norms outside dynamic layers, forward, and their autograd nodes, backward);
* ``predictor_fwd`` / ``predictor_bwd``: a dynamic layer's forward time besides its modulated convolution
  (the predictor ``g(x)``, ``M = I + g``, the layer's Python; a stage's shared prediction), and the autograd
  nodes its ops created, backward;
* ``modconv_fwd`` / ``modconv_bwd``: the modulated convolution, ``nsl::dynamic_ns_conv2d`` and its backward node;
* ``rest``: the step's time minus the above (loss, activations, pooling, the optimizer, gradient accumulation,
  static NSL weight reparametrisations, profiler gaps).

Forward ops are attributed by where they run (inside a dynamic layer's forward, marked with
``record_function`` by module hooks, or outside); a backward node (``autograd::engine::evaluate_function``)
by the sequence number of the forward op that created it. The round with the smallest step time is reported;
``x_conv`` columns are ratios to the conv model's step time of the same run. Writes JSON to ``--out`` and prints
a markdown table.

    python benchmarks/profile_step.py [--layers conv,static-full,dynamic-diagonal,dynamic-diagonal-light,dynamic-full]
        [--width 16] [--batch 128] [--size 32] [--repeat 3] [--threads 2] [--variant NAME=KIND[,KEY=VALUE...]]...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, layer_kinds_with_conv, write_json  # noqa: E402
from network import train_step, variant_model  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from nsl.layers import DynamicNSConv2d  # noqa: E402
from nsl.layers.dynamic_filter import DynamicFilterConv2d  # noqa: E402
from nsl.layers.predictor_grid import SharedPrediction  # noqa: E402
from nsl.models import build_model  # noqa: E402

DEFAULT_LAYERS = "conv,static-full,dynamic-diagonal,dynamic-diagonal-light,dynamic-full"
PARTS = ("convs_norms", "predictor_fwd", "predictor_bwd", "modconv_fwd", "modconv_bwd", "rest")
STEP = "nsl::profile_step"
LAYER = "nsl::dynamic_layer"
MODCONV = "nsl::dynamic_ns_conv2d"
#: forward ops (outside dynamic layers) counted as the model's convolutions and norms
CONV_NORM_OPS = ("aten::conv2d", "aten::convolution", "aten::batch_norm", "aten::group_norm", "aten::layer_norm",
                 "aten::instance_norm")


def mark_dynamic_layers(model: torch.nn.Module) -> None:
    """Make every dynamic layer's forward (and a stage's shared prediction) a ``record_function`` range named
    :data:`LAYER`, by forward pre/post hooks."""

    def enter(module, args):
        module._profile_range = record_function(LAYER)
        module._profile_range.__enter__()

    def leave(module, args, output):
        module._profile_range.__exit__(None, None, None)

    shared = [m.predictor for m in model.modules() if isinstance(m, SharedPrediction)]
    for m in [m for m in model.modules() if isinstance(m, (DynamicNSConv2d, DynamicFilterConv2d))] + shared:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)


def _children(event) -> list:
    return list(event.cpu_children)


def split_step(events) -> dict[str, float]:
    """The step's parts (:data:`PARTS`, plus ``total``) in milliseconds from one profiled step's events."""
    step = next(e for e in events if e.name == STEP)
    parts = dict.fromkeys(PARTS, 0.0)
    seq_part: dict[int, str] = {}  # sequence number of a forward op -> the part its backward node belongs to

    def forward_op(e, part: str, count: bool = True) -> None:
        if count:
            parts[part] += e.cpu_time_total / 1e3
        stack = [e]
        while stack:  # every op below e created its autograd nodes for the same part
            x = stack.pop()
            if x.sequence_nr >= 0:
                seq_part.setdefault(x.sequence_nr, part)
            stack.extend(_children(x))

    backward = []
    for e in _children(step):
        if e.name.startswith("autograd::engine::evaluate_function"):
            backward.append(e)
        elif e.name == LAYER:  # the modulated convolution; the rest of the layer's time is its predictor's
            layer_ms = e.cpu_time_total / 1e3
            for op in _children(e):
                if op.name == MODCONV:
                    forward_op(op, "modconv_fwd")
                    layer_ms -= op.cpu_time_total / 1e3
                else:
                    forward_op(op, "predictor_fwd", count=False)
            parts["predictor_fwd"] += layer_ms
        elif e.name in CONV_NORM_OPS:
            forward_op(e, "convs_norms")
        else:
            forward_op(e, "rest")
    for e in backward:
        part = seq_part.get(e.sequence_nr, "rest")
        part = {"modconv_fwd": "modconv_bwd", "predictor_fwd": "predictor_bwd"}.get(part, part)
        parts[part] += e.cpu_time_total / 1e3
    total = step.cpu_time_total / 1e3
    parts["rest"] += total - sum(parts.values())  # what no op covers (hooks, Python between ops)
    parts["total"] = total
    return parts


def profile_once(run) -> dict[str, float]:
    """Profile one call of ``run`` (a training step) and split it (:func:`split_step`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP):
            run()
    return split_step(prof.events())


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table: milliseconds per part, and the step's ratio to conv's."""
    head = ["kind", "step ms", "x conv", "convs+norms", "predictor fwd", "predictor bwd", "modulated conv fwd",
            "modulated conv bwd", "rest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["kind"], f"{r['total']:.1f}", f"{r['x_conv']:.2f}"] + [
            f"{r[p]:.1f} ({r[p + '_x_conv']:.2f})" for p in PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated layer kinds (conv is added)")
    parser.add_argument("--width", type=int, default=16, help="CNN-9 width (channels of stage 1)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[,KEY=VALUE...]",
                        help="also profile CNN-9 of layer kind KIND with these training-config options (nsl train "
                             "--set names), under NAME, e.g. light-s2=dynamic-diagonal-light,predictor_stride=2")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile_step.json")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--repeat, --batch and --threads must be positive")
    kinds = layer_kinds_with_conv(parser, args.layers)
    torch.set_num_threads(args.threads)
    models = {}
    for k in kinds:
        torch.manual_seed(0)
        models[k] = build_model("cnn9", k, num_classes=10, width=args.width, image_size=args.size)
    for spec in args.variant:
        torch.manual_seed(0)
        name, model = variant_model(parser, spec, args.width, args.size)
        if name in models:
            parser.error(f"--variant: the name {name!r} is taken (a layer kind or an earlier variant)")
        models[name] = model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    runs = {}
    for name, model in models.items():
        mark_dynamic_layers(model.train())
        runs[name] = train_step(model, x, y)
        runs[name]()  # warm-up (kernel loading, allocator)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeat):
        for name, run in runs.items():
            parts = profile_once(run)
            if name not in best or parts["total"] < best[name]["total"]:
                best[name] = parts
    conv = best["conv"]["total"]
    rows = []
    for name, parts in best.items():
        row = {"kind": name, **parts, "x_conv": parts["total"] / conv}
        row.update({f"{p}_x_conv": parts[p] / conv for p in PARTS})
        rows.append(row)
    table = markdown(rows)
    print(table)
    print("\n(ms per part, in brackets its share of the conv model's step time)")
    write_json(args.out, {"environment": environment(), "model": "cnn9", "width": args.width, "size": args.size,
                          "batch": args.batch, "repeat": args.repeat, "parts": list(PARTS), "rows": rows,
                          "markdown": table, "variants": dict(spec.partition("=")[::2] for spec in args.variant)})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
