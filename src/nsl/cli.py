"""The ``nsl`` command line: ``nsl demo`` (more subcommands arrive with the training toolkit)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    names = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names})
    run_demo(cfg)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsl", description="Neural similarity learning for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="convert, train and fold a small CNN on scikit-learn's digits (offline)",
                          description="Build a small CNN, turn it into static and dynamic NSL models with "
                                      "nsl.convert, train all three on scikit-learn's digits over several "
                                      "seeds, and fold the static one back into a plain CNN.")
    demo.add_argument("--epochs", type=_positive_int, default=12, help="training epochs per run (default 12)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds per variant (default 3)")
    demo.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=64)
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    demo.set_defaults(func=_demo)
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
