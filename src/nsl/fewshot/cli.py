"""``nsl fewshot train`` and ``nsl fewshot eval``; :func:`add_parser` registers them on ``nsl``'s subparsers."""

from __future__ import annotations

import argparse
import json

from .._cli_utils import (
    FEWSHOT_TRAIN_FLAGS,
    add_field_flags,
    given_fields,
    message_of,
    positive_int,
    run_training,
    with_download,
)
from .._cli_utils import error as _cli_error

__all__ = ["add_parser"]

def _error(command: str, message: str, code: int = 2) -> int:
    return _cli_error(f"fewshot {command}", message, code)


def _train(args: argparse.Namespace) -> int:
    from .train import FewShotConfig, apply_fewshot_overrides, train_fewshot

    given = given_fields(args, FEWSHOT_TRAIN_FLAGS)
    return run_training("fewshot train", args, given, FewShotConfig,
                        lambda: FewShotConfig.from_dict({**FewShotConfig().to_dict(), **given}),
                        apply_fewshot_overrides, with_download(train_fewshot) if args.download else train_fewshot,
                        check_data_dir=False)


def _line(res: dict) -> str:
    return (f"{res['backbone']}/{res['layer']} + {res['head']} ({res['checkpoint']}, episode {res['episode']}) on "
            f"{res['dataset']} {res['split']}: {res['ways']}-way {res['shots']}-shot accuracy "
            f"{100 * res['mean']:.2f} +- {100 * res['ci95']:.2f} % (95% CI, {res['episodes']} episodes, seed "
            f"{res['seed']})")


def _eval(args: argparse.Namespace) -> int:
    from ..data.errors import DatasetError
    from ..train import CheckpointError, ConfigError
    from ..train.run import resolve_device
    from .train import compare_results, evaluate_fewshot_checkpoint, load_fewshot_checkpoint, load_fewshot_split

    try:
        device = resolve_device(args.device)
        kw = dict(n_way=args.ways, k_shot=args.shots, n_query=args.queries, n_episodes=args.episodes,
                  seed=args.seed, split=args.split, device=device, progress=args.progress)
        ckpt = load_fewshot_checkpoint(args.checkpoint)
        cfg = ckpt["config"]
        data_dir = args.data_dir if args.data_dir is not None else cfg.get("data_dir")
        dataset = load_fewshot_split(cfg["dataset"], data_dir, args.split).to(device)
        del ckpt
        res = evaluate_fewshot_checkpoint(args.checkpoint, dataset=dataset, **kw)
        other = paired = None
        if args.compare:
            other_cfg = load_fewshot_checkpoint(args.compare)["config"]
            if other_cfg["dataset"] != cfg["dataset"]:
                raise ValueError(f"cannot compare on the same episodes: {args.checkpoint} was trained on "
                                 f"{cfg['dataset']}, {args.compare} on {other_cfg['dataset']}")
            other = evaluate_fewshot_checkpoint(args.compare, dataset=dataset, **kw)
            paired = compare_results(res, other)
    except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
        return _error("eval", message_of(e))
    if args.json:
        out = res if other is None else {"a": res, "b": other, "paired": paired}
        print(json.dumps(out))
        return 0
    print(_line(res))
    if other is not None:
        print(_line(other))
        print(f"paired difference (first - second) over the same {paired['episodes']} episodes: "
              f"{100 * paired['mean_diff']:+.2f} +- {100 * paired['ci95']:.2f} % (95% CI); first better in "
              f"{paired['wins']}, worse in {paired['losses']}, tied in {paired['ties']} episodes")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``fewshot`` command group (``train``, ``eval``) to ``nsl``'s subparsers ``sub``."""
    from .train import FewShotConfig

    fs = sub.add_parser("fewshot", help="few-shot learning: episodic training (ProtoNet, NSL) and evaluation",
                        description="Episodic few-shot training and evaluation with confidence intervals.")
    fsub = fs.add_subparsers(dest="fewshot_command", metavar="COMMAND")
    fs.set_defaults(func=lambda args: (fs.print_help(), 2)[1])

    p = fsub.add_parser("train", help="episodic training with validation-based model selection",
                        description="Train a few-shot classifier on episodes. Writes RUN_DIR/config.json, "
                                    "RUN_DIR/metrics.jsonl and RUN_DIR/checkpoints/{last,best}.pt (best = highest "
                                    "accuracy on fixed val episodes). Any config field can be set with --set "
                                    "key=value (see nsl.fewshot.FewShotConfig).")
    add_field_flags(p, FewShotConfig, FEWSHOT_TRAIN_FLAGS)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt "
                   "(a larger --episodes extends it; fresh if none yet; SIGTERM/SIGUSR1 save it and exit 75)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-dir first if it is "
                   "not there (CIFAR-FS and FC100: CIFAR-100; as nsl download NAME DIR)")
    p.set_defaults(func=_train)

    e = fsub.add_parser("eval", help="mean accuracy and 95%% CI over fixed-seed episodes",
                        description="Evaluate a few-shot checkpoint on fixed-seed episodes: mean accuracy +- "
                                    "1.96 * std / sqrt(episodes). The same --seed gives the same episodes, so "
                                    "models are compared on identical episodes (--compare).")
    e.add_argument("--checkpoint", required=True, help="checkpoint written by nsl fewshot train")
    e.add_argument("--ways", type=positive_int, help="default: the run's --ways")
    e.add_argument("--shots", type=positive_int, help="default: the run's --shots")
    e.add_argument("--queries", type=positive_int, help="default: the run's --queries")
    e.add_argument("--episodes", type=positive_int, default=600, help="episodes (default 600)")
    e.add_argument("--seed", type=int, default=0, help="episode seed (default 0)")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--data-dir", dest="data_dir", help="dataset folder (default: the one recorded in the run)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--compare", metavar="CKPT2", help="also evaluate CKPT2 on the same episodes and print the "
                   "paired difference with its 95%% CI")
    e.add_argument("--json", action="store_true", help="print the result as JSON, per-episode accuracies included")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    e.set_defaults(func=_eval)
    return fs
