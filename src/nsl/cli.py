"""The ``nsl`` command line: ``demo``, ``train``, ``eval``, ``report``, ``viz`` and ``fewshot train|eval``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ._cli_utils import error as _cli_error
from ._cli_utils import positive_int, run_training

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    names = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names})
    run_demo(cfg)
    return 0


# -- nsl train / nsl eval ------------------------------------------------------------------------
# explicit flags mapped to TrainConfig fields (None = not given on the command line)
_TRAIN_FLAGS = {"dataset": "dataset", "data_dir": "data_dir", "model": "model", "layer": "layer", "out": "out",
                "iters": "iters", "epochs": "epochs", "batch_size": "batch_size", "seed": "seed",
                "device": "device", "subset": "train_subset", "test_subset": "test_subset", "lr": "lr",
                "warmup_iters": "warmup_iters", "bn_momentum": "bn_momentum", "bn_recalibrate": "bn_recalibrate",
                "amp": "amp", "channels_last": "channels_last", "eval_every": "eval_every", "progress": "progress",
                "stop_at": "stop_at"}


def _error(command: str, message: str, code: int = 2) -> int:
    return _cli_error(command, message, code)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, apply_overrides, make_config
    from .train import train as run_train

    given = {field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.epochs is not None and args.iters is None:
        given["iters"] = None  # --epochs replaces the protocol's iteration count
    # an earlier --stop-at does not carry over to the continuation
    return run_training("train", args, given, TrainConfig, lambda: make_config(args.protocol, **given),
                        apply_overrides, run_train, on_resume={"stop_at": 0})


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
        return _error("eval", str(e))
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
    from .models import LAYER_KINDS, MODELS
    from .train import PROTOCOLS

    p = sub.add_parser("train", help="train a model (CNN-9, ResNets) with any NSL layer kind",
                       description="Train a model with the paper's or a fast protocol. Writes RUN_DIR/config.json, "
                                   "RUN_DIR/metrics.jsonl and RUN_DIR/checkpoints/{last,best}.pt. Any config field "
                                   "can be set with --set key=value (see nsl.train.TrainConfig).")
    p.add_argument("--dataset", help="cifar10, cifar100, mnist, fashion-mnist, digits, imagefolder")
    p.add_argument("--data-dir", dest="data_dir", help="folder holding the dataset's files")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)} (default cnn9)")
    p.add_argument("--layer", help=f"one of {', '.join(LAYER_KINDS)} (default conv)")
    p.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="config defaults (default paper)")
    p.add_argument("--out", help="run directory")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--iters", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="epochs (converted to steps)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument("--subset", type=positive_int, help="train on N images of a fixed seeded subset")
    p.add_argument("--test-subset", dest="test_subset", type=positive_int, help="evaluate on the first N test images")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-iters", dest="warmup_iters", type=int, help="linear lr warm-up (not in the paper)")
    p.add_argument("--bn-momentum", dest="bn_momentum", type=float, help="BN running-stat momentum (paper 0.001)")
    p.add_argument("--bn-recalibrate", dest="bn_recalibrate", type=int,
                   help="recompute BN statistics on N training batches before each evaluation (not in the paper)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"])
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const=True)
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between test evaluations (0: at the end)")
    p.add_argument("--stop-at", dest="stop_at", type=int, help="stop after N steps as if interrupted")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
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
    demo = sub.add_parser("demo", help="train conv, static and dynamic NSL CNNs on scikit-learn's digits (offline)",
                          description="Train CNN-9 (width 8) with conv, static-full and dynamic-diagonal layers on "
                                      "scikit-learn's digits over several seeds with nsl.train (protocol demo), "
                                      "print mean accuracies with 95% confidence intervals, then check nsl.convert "
                                      "and nsl.fold on the trained models.")
    demo.add_argument("--epochs", type=positive_int, default=12, help="training epochs per run (default 12)")
    demo.add_argument("--seeds", type=positive_int, default=3, help="seeds per variant (default 3)")
    demo.add_argument("--batch-size", dest="batch_size", type=positive_int, default=64)
    demo.add_argument("--out", help="keep the runs in this folder (OUT/<kind>-s<seed>, nsl train run directories)")
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    demo.set_defaults(func=_demo)
    _add_train_parser(sub)
    from .fewshot.cli import add_parser as _add_fewshot_parser

    _add_fewshot_parser(sub)
    from . import report, viz

    report.add_parser(sub)
    viz.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
