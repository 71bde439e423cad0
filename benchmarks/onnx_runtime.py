"""Exported CNN-9 models in ONNX Runtime vs the exported conv model and vs PyTorch eager, in one run.

For each layer kind (``--layers``) it builds CNN-9 (``nsl.models.build_model('cnn9', kind,
width=--width)``, seed 0, eval mode, predictors perturbed so ``M`` is not the identity), exports it
with ``torch.onnx.export(dynamo=True)`` and a dynamic batch as ``nsl export`` does (dynamic layers go
through :mod:`nsl._export_math`), and times at each batch of ``--batches``:

* ``ort``: the exported model in ONNX Runtime (CPU provider, ``--threads`` intra-op threads);
* ``ort-reference`` (dynamic kinds, unless ``--no-reference``): the model exported with the
  ``reference`` backend (the slices-and-einsum formula exports used before);
* ``eager``: the same PyTorch model under ``torch.no_grad()`` (``auto`` backend).

All rows of one batch size are timed together by :func:`common.time_cases` (min over ``--repeat``
interleaved rounds). ``x_conv``: time over the exported conv model's (``ort``, same batch);
``x_eager``: time over the same kind's PyTorch eager time. Each export is checked against PyTorch
(max abs difference reported). Writes JSON to ``--out``.

    python benchmarks/onnx_runtime.py [--layers conv,dynamic-diagonal,dynamic-diagonal-light] [--width 32]
        [--batches 1,32] [--repeat 5] [--threads 2] [--no-reference]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, layer_kinds_with_conv, print_table, time_cases, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import nsl  # noqa: E402
from nsl.layers import LAYER_KINDS  # noqa: E402
from nsl.models import build_model  # noqa: E402

DEFAULT_LAYERS = "conv,dynamic-diagonal,dynamic-diagonal-light"


def export(model: torch.nn.Module, path: Path, size: int, backend: str = "auto") -> None:
    """Export ``model`` (input ``[N, 3, size, size]``, N dynamic) to ``path`` with ``backend`` selected."""
    example = torch.randn(2, 3, size, size)
    with nsl.functional.use_backend(backend), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated layer kinds (conv is added)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-formula exports")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_runtime.json")
    args = parser.parse_args(argv)
    kinds = layer_kinds_with_conv(parser, args.layers)
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    torch.set_num_threads(args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    # ORT's idle threads spin after each run by default, taking the cores from the PyTorch case timed next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    size = 32
    models, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in kinds:
            torch.manual_seed(0)
            model = build_model("cnn9", k, num_classes=10, width=args.width).eval()
            with torch.no_grad():
                for m in model.modules():
                    if getattr(m, "predictor", None) is not None:
                        for p in m.predictor.parameters():
                            p.normal_(0, 0.05)
            models[k] = model
            variants = ["ort"] + (["ort-reference"] if LAYER_KINDS[k].dynamic and not args.no_reference else [])
            for v in variants:
                path = Path(tmp) / f"{k}-{v}.onnx"
                export(model, path, size, "reference" if v == "ort-reference" else "auto")
                sessions[(k, v)] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            print(f"[exported {k}]", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(1)
    for b in batches:
        x = torch.randn(b, 3, size, size, generator=gen)
        feed = {"input": x.numpy()}
        with torch.no_grad():
            want = {k: m(x) for k, m in models.items()}
        runs, diffs = {}, {}
        for (k, v), s in sessions.items():
            diffs[(k, v)] = float((torch.from_numpy(s.run(None, feed)[0]) - want[k]).abs().max())
            runs[(k, v)] = lambda s=s, feed=feed: s.run(None, feed)
        for k, m in models.items():
            def eager(m=m, x=x):
                with torch.no_grad():
                    m(x)

            runs[(k, "eager")] = eager
        times = time_cases({f"{k}/{v}": r for (k, v), r in runs.items()}, args.repeat)
        t = {key: times[f"{key[0]}/{key[1]}"] for key in runs}
        for (k, v), s in t.items():
            rows.append({"batch": b, "kind": k, "runtime": v, "ms": 1e3 * s, "x_conv": s / t[("conv", "ort")],
                         "x_eager": s / t[(k, "eager")], "max_abs_diff": diffs.get((k, v))})
    print_table(rows, [("batch", "batch", "d"), ("kind", "layer kind", ""), ("runtime", "runtime", ""),
                       ("ms", "ms", ".2f"), ("x_conv", "x ort conv", ".2f"), ("x_eager", "x eager", ".2f"),
                       ("max_abs_diff", "max |onnx - torch|", ".1e")])
    write_json(args.out, {"environment": environment(), "onnxruntime": ort.__version__, "model": "cnn9",
                          "width": args.width, "repeat": args.repeat, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
