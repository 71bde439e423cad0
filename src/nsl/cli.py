"""The ``nsl`` command line: ``demo``, ``train``, ``eval``, ``download``, ``export``, ``report``, ``viz``, ``doctor``
and ``fewshot train|eval``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import fields

from ._cli_utils import (
    TRAIN_FLAGS,
    TRAIN_LENGTH_FLAGS,
    Terminated,
    add_field_flags,
    given_fields,
    message_of,
    one_line,
    positive_int,
    run_training,
    terminate_by_exception,
    with_download,
)
from ._cli_utils import error as _cli_error

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import FULL, DemoConfig, run_demo
    from .train.loop import EXIT_PREEMPTED, Preempted

    names = {f.name for f in fields(DemoConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.full:
        given = {**FULL, **given}
    cfg = DemoConfig(**given)
    try:
        run_demo(cfg)
    except (Preempted, Terminated) as e:  # a signal while training (Preempted) or between runs (Terminated)
        name = e.signal_name
        if cfg.out is None:  # the runs were in a temporary folder, removed on the way out: nothing to resume
            return _error("demo", f"stopped by {name}; its runs were in a temporary folder, now removed (keep them "
                                  "with --out DIR to continue an interrupted demo)", 128 + signal.Signals[name])
        return _error("demo", f"stopped by {name}; the runs in {cfg.out} are kept: the same nsl demo command with "
                              f"--out {cfg.out} continues them", EXIT_PREEMPTED)
    return 0


# -- nsl train / nsl eval ------------------------------------------------------------------------
def _error(command: str, message: str, code: int = 2) -> int:
    return _cli_error(command, message, code)


# -- nsl download ------------------------------------------------------------------------------
def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _download_list() -> None:
    from .data.download import NO_FILES, PROVIDERS, SOURCES

    print("datasets `nsl download NAME DIR` fetches (official archives, checksums verified):")
    for name, src in SOURCES.items():
        size = f"~{src.size_mb} MB" if src.size_mb else ""
        print(f"  {name:<16} {src.title:<52} {size:>8}  -> DIR/{src.target}/")
    made = sorted(k for k in PROVIDERS if k not in SOURCES)
    for k in made:
        print(f"  {k:<16} made from {PROVIDERS[k][0]} (`nsl download {k} DIR` fetches {PROVIDERS[k][0]})")
    print(f"no download needed: {', '.join(NO_FILES)} (bundled with scikit-learn); not downloadable: imagefolder, "
          "mini-imagenet (place their files yourself)")


def _download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.download import PROVIDERS, SOURCES, download, find_downloaded, resolve_name
    from .data.errors import DatasetError

    if args.list or args.name is None:
        _download_list()
        return 0
    try:
        key = resolve_name(args.name)
    except ValueError as e:
        return _error("download", str(e))
    if args.dir is None:
        return _error("download", f"expected DIR, the folder to download {args.name} into "
                                  f"(e.g. nsl download {args.name} data)")
    root = Path(args.dir).expanduser()
    if root.exists() and not root.is_dir():
        return _error("download", f"DIR {root} is a file; expected a folder to download into")
    src = SOURCES[key]
    title = src.title or key
    asked = args.name.lower().replace("_", "-")
    if asked in PROVIDERS and asked not in SOURCES:
        print(f"{args.name} is made from {key}: fetching {key}")
    found = None if args.force else find_downloaded(asked if asked in PROVIDERS else key, root)
    if found is not None:
        print(f"{title} is already in {found}: nothing downloaded (--force downloads it again)")
        return 0
    size = f", about {src.size_mb} MB" if src.size_mb else ""
    print(f"downloading {title}{size} into {root}")
    try:
        dest = download(key, root, force=args.force, progress=args.progress, timeout=args.timeout)
    except (DatasetError, ValueError) as e:
        return _error("download", str(e))
    except OSError as e:
        return _error("download", f"cannot write into DIR {root}: {e.strerror or e}")
    except KeyboardInterrupt:
        return _error("download", f"interrupted; nothing was kept in {root}", 130)
    print(f"{title}: checksums verified, extracted to {dest}")
    return 0


# -- nsl export ----------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    import json

    from .export import INSTALL_ONNX, ExportError, export_onnx
    from .train import CheckpointError

    try:
        res = export_onnx(args.checkpoint, args.out, fold=args.fold, opset=args.opset, input_size=args.input_size,
                          batch=args.batch, check=args.check, atol=args.atol, rtol=args.rtol)
    except (CheckpointError, ExportError, ValueError) as e:
        return _error("export", str(e))
    except OSError as e:
        return _error("export", f"cannot write --out {args.out}: {e.strerror or e}")
    if args.json:
        print(json.dumps(res))
        return 0
    n, *chw = res["input_shape"]
    folded = f" ({res['folded_static_layers']} static NSL layer(s) folded)" if args.fold else ""
    ops = f", operators: {', '.join(res['onnx_ops'])}" if res["onnx_ops"] is not None else ""
    print(f"exported the {res['what']}{folded} to {res['out']}: input [N, {', '.join(map(str, chw))}] (N dynamic) "
          f"-> output [N, {', '.join(map(str, res['output_shape'][1:]))}], opset {res['opset']}{ops}")
    if res["checked"]:
        print(f"onnxruntime check: max |onnx - torch| = {res['max_abs_diff']:.2e} (tolerance {res['tolerance']:.2e}) "
              f"on a random batch of {n}")
    elif args.check:
        print(f"onnxruntime is not installed: the exported graph was not checked ({INSTALL_ONNX})")
    return 0


def _add_download_export_parsers(sub) -> None:
    d = sub.add_parser("download", help="download a dataset into a folder (checksummed; --list lists them)",
                       description="Download a dataset's official files into DIR, verify their published "
                                   "checksums and extract them atomically (a temporary folder in DIR, then a "
                                   "rename). A dataset already in DIR is not downloaded again. Without NAME (or "
                                   "with --list): list the datasets.")
    d.add_argument("name", nargs="?", metavar="NAME", help="dataset (see --list)")
    d.add_argument("dir", nargs="?", metavar="DIR", help="data folder (created if needed), later --data-dir")
    d.add_argument("--list", action="store_true", help="list the datasets that can be downloaded")
    d.add_argument("--force", action="store_true", help="download again even if the dataset is present")
    d.add_argument("--timeout", type=_positive_seconds, default=60.0, help="network timeout in seconds (default 60)")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    d.set_defaults(func=_download)

    x = sub.add_parser("export", help="export a trained model to ONNX (checked with onnxruntime)",
                       description="Export the model of a checkpoint to ONNX with torch.onnx. A checkpoint of nsl "
                                   "train exports the classifier (input [N, C, H, W] normalised as in training, "
                                   "output logits); a checkpoint of nsl fewshot train exports its embedding "
                                   "backbone (output embeddings [N, D]; the few-shot head is not exported). "
                                   "--fold first folds static NSL layers into plain convolutions; dynamic NSL "
                                   "layers export through their reference formula (standard ONNX operators). "
                                   "The file is written atomically; when onnxruntime is installed the graph is "
                                   "checked against PyTorch on a random input first.")
    x.add_argument("--checkpoint", required=True, help="checkpoint file (RUN_DIR/checkpoints/best.pt or last.pt)")
    x.add_argument("--out", required=True, help="the .onnx file to write (its folder must exist)")
    x.add_argument("--fold", action="store_true", help="fold static NSL layers into plain convolutions first")
    x.add_argument("--opset", type=positive_int, help="ONNX opset version (default: torch.onnx's)")
    x.add_argument("--input-size", dest="input_size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="image size of the example input (default: the training size)")
    x.add_argument("--batch", type=positive_int, default=2, help="batch of the check input (default 2; the "
                   "exported batch dimension is dynamic)")
    x.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")
    x.add_argument("--atol", type=float, default=1e-4, help="check tolerance: atol + rtol * max|output| (1e-4)")
    x.add_argument("--rtol", type=float, default=1e-4, help="(default 1e-4)")
    x.add_argument("--json", action="store_true", help="print the result as JSON")
    x.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, apply_overrides, make_config
    from .train import train as run_train

    given = given_fields(args, (*TRAIN_FLAGS, *TRAIN_LENGTH_FLAGS))
    if args.epochs is not None and args.iters is None:
        given["iters"] = None  # --epochs replaces the protocol's iteration count
    # an earlier --stop-at does not carry over to the continuation
    return run_training("train", args, given, TrainConfig, lambda: make_config(args.protocol, **given),
                        apply_overrides, with_download(run_train) if args.download else run_train,
                        on_resume={"stop_at": 0}, check_data_dir=not args.download)


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .data import DatasetError
    from .train import CheckpointError, ConfigError, evaluate_checkpoint

    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        return _error("eval", f"--data-dir {args.data_dir} is not a directory")
    try:
        res = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, fold=args.fold, device=args.device,
                                  batch_size=args.batch_size)
    except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
        return _error("eval", message_of(e))
    if args.json:
        print(json.dumps(res))
        return 0 if not args.fold or res["fold_matches"] else 1
    line = (f"{res['model']}/{res['layer']} on {res['dataset']} (step {res['step']}): test accuracy "
            f"{100 * res['test_acc']:.2f}% over {res['test_samples']} images, loss {res['test_loss']:.4f}")
    if args.fold:
        line += (f"\nfolded {res['folded_static_layers']} static NSL layer(s): accuracy {100 * res['test_acc']:.2f}% "
                 f"(unfolded {100 * res['unfolded_acc']:.2f}%), max |logit difference| "
                 f"{res['max_abs_logit_diff']:.2e}" + ("" if res["fold_matches"] else "  WARNING: accuracies differ"))
    print(line)
    return 0 if not args.fold or res["fold_matches"] else 1


def _add_train_parser(sub) -> None:
    from .train import PROTOCOLS, TrainConfig

    p = sub.add_parser("train", help="train a model (CNN-9, ResNets) with any NSL layer kind",
                       description="Train a model with the paper's or a fast protocol. Writes RUN_DIR/config.json, "
                                   "RUN_DIR/metrics.jsonl and RUN_DIR/checkpoints/{last,best}.pt. Any config field "
                                   "can be set with --set key=value (see nsl.train.TrainConfig).")
    add_field_flags(p, TrainConfig, TRAIN_FLAGS[:4])
    p.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="config defaults (default paper)")
    add_field_flags(p, TrainConfig, TRAIN_FLAGS[4:])
    add_field_flags(p.add_mutually_exclusive_group(), TrainConfig, TRAIN_LENGTH_FLAGS)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt "
                   "(fresh if none yet; SIGTERM/SIGUSR1 save it and exit 75)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-dir first if it is "
                   "not there (as nsl download NAME DIR)")
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="test accuracy of a training checkpoint (optionally folded)",
                       description="Evaluate RUN_DIR/checkpoints/{best,last}.pt on the test set of its dataset.")
    e.add_argument("--checkpoint", required=True, help="checkpoint file written by nsl train")
    e.add_argument("--data-dir", dest="data_dir", help="dataset folder (default: the one recorded in the run)")
    e.add_argument("--fold", action="store_true", help="fold static NSL layers into plain convolutions first")
    e.add_argument("--device", default="cpu")
    e.add_argument("--batch-size", dest="batch_size", type=positive_int)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsl", description="Neural similarity learning for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train conv, static and dynamic NSL CNNs on scikit-learn's digits (offline; "
                          "a first result in about a minute)",
                          description="Train CNN-9 (width 8) with conv, static-full and dynamic-diagonal layers on "
                                      "scikit-learn's digits with nsl.train (protocol demo), print each variant's "
                                      "test accuracy as soon as it is trained, then check nsl.convert and nsl.fold "
                                      "on the trained models. By default one seed of 3 epochs per variant (under a "
                                      "minute on 2 CPU cores); --full: 3 seeds of 12 epochs with 95% confidence "
                                      "intervals (a few minutes).")
    demo.add_argument("--full", action="store_true", help="the comparison over 3 seeds of 12 epochs with 95%% "
                      "confidence intervals")
    demo.add_argument("--epochs", type=positive_int, help="training epochs per run (default 3; --full: 12)")
    demo.add_argument("--seeds", type=positive_int, help="seeds per variant (default 1; --full: 3)")
    demo.add_argument("--batch-size", dest="batch_size", type=positive_int, default=64)
    demo.add_argument("--out", help="keep the runs in this folder (OUT/<kind>-s<seed>, nsl train run directories)")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    demo.set_defaults(func=_demo)
    _add_train_parser(sub)
    _add_download_export_parsers(sub)
    from .fewshot.cli import add_parser as _add_fewshot_parser

    _add_fewshot_parser(sub)
    from . import doctor, report, viz

    report.add_parser(sub)
    viz.add_parser(sub)
    doctor.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``nsl ARGV``: parse, run the command, return its exit code.

    Commands turn the errors they expect into one ``nsl COMMAND: error: ...`` line. Anything else is caught
    here as a last resort, so that no input prints a traceback: one line naming the exception, exit 1
    (``NSL_TRACEBACK=1`` re-raises it, for bug reports)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    command = " ".join(c for c in (args.command, getattr(args, "fewshot_command", None)) if c)
    # a SIGTERM/SIGHUP/SIGUSR1 stops a command through its `finally` blocks (no temporary file is left); the
    # training commands handle SIGTERM/SIGUSR1 themselves (a checkpoint, exit 75) and keep the default otherwise
    training = command in ("train", "fewshot train")
    try:
        with contextlib.nullcontext() if training else terminate_by_exception():
            return args.func(args)
    except KeyboardInterrupt:
        return _cli_error(command, "interrupted", 130)
    except Terminated as e:
        return _cli_error(command, f"stopped by {e.signal_name}", 128 + e.signum)
    except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("NSL_TRACEBACK") == "1":
            raise
        hint = f"unexpected {type(e).__name__}; set NSL_TRACEBACK=1 to see where"
        return _cli_error(command, f"{one_line(message_of(e))} ({hint})", 1)


if __name__ == "__main__":
    sys.exit(main())
