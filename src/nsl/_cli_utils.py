"""Argument types and the training front end shared by the command-line modules."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message naming what was given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


#: The command-line flag of each configuration field (or training argument) that has one; an error
#: that names a field (:class:`nsl.train.ConfigError` ``fields``) names it by this flag on the command line,
#: and a field without a flag by ``--set FIELD=...``. Shared by ``nsl train``, ``nsl eval`` and ``nsl fewshot``.
FIELD_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "model": "--model", "layer": "--layer",
               "out": "--out", "resume": "--resume", "iters": "--iters", "epochs": "--epochs",
               "batch_size": "--batch-size", "seed": "--seed", "device": "--device", "train_subset": "--subset",
               "test_subset": "--test-subset", "lr": "--lr", "warmup_iters": "--warmup-iters",
               "bn_momentum": "--bn-momentum", "bn_recalibrate": "--bn-recalibrate", "amp": "--amp",
               "channels_last": "--channels-last", "eval_every": "--eval-every", "stop_at": "--stop-at",
               "progress": "--no-progress", "protocol": "--protocol", "backbone": "--backbone", "head": "--head",
               "ways": "--ways", "shots": "--shots", "queries": "--queries", "train_ways": "--train-ways",
               "train_shots": "--train-shots", "episodes": "--episodes", "lr_step": "--lr-step",
               "val_every": "--val-every", "val_episodes": "--val-episodes", "rotations": "--rotations",
               "checkpoint": "--checkpoint"}


def flag_of(field: str) -> str:
    """How the command line sets configuration field ``field``: its flag, else ``--set FIELD=...``."""
    return FIELD_FLAGS.get(field, f"--set {field}=...")


def message_of(e: Exception) -> str:
    """The one-line command-line message of a library error: fields named by their flags (:data:`FIELD_FLAGS`)."""
    render = getattr(e, "render", None)
    return render(flag_of) if callable(render) else str(e)


def one_line(message: str) -> str:
    """The telling line of a possibly multi-line error message.

    An error re-raised from a DataLoader worker carries the worker's whole traceback ("Caught X in
    DataLoader worker process 0. Original Traceback ...") with the original message on its last line:
    that line is kept, without its ``module.ExceptionName:`` prefix. Other multi-line messages keep their
    first line and say how many were dropped."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if not lines:
        return str(message)
    if len(lines) == 1:
        return lines[0]
    if any("Original Traceback" in ln for ln in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        if sep and re.fullmatch(r"[\w.]*(Error|Exception|Warning|Interrupt)\w*", head):
            last = rest
        return last
    return f"{lines[0]} (+{len(lines) - 1} more line(s))"


def error(command: str, message: str, code: int = 2) -> int:
    """Print ``nsl COMMAND: error: MESSAGE`` (one line: :func:`one_line`) to stderr and return the exit code."""
    print(f"nsl {command}: error: {one_line(message)}", file=sys.stderr)
    return code


def read_config_json(path: Path) -> dict:
    """The JSON object in a run's ``config.json``; :class:`~nsl.train.ConfigError` naming the file when it is
    unreadable, not JSON or not an object."""
    from .train import ConfigError

    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got a JSON {type(d).__name__}")
    return d


def run_training(command: str, args: argparse.Namespace, given: dict, config_cls, new_config: Callable[[], object],
                 apply_overrides: Callable, train: Callable, on_resume: dict | None = None,
                 check_data_dir: bool = True) -> int:
    """The command-line front end of a training command (``nsl train``, ``nsl fewshot train``).

    Builds the configuration (on ``--resume`` with a saved ``OUT/config.json``: the saved one, with
    ``stop_at`` reset, ``on_resume`` and then the flags given on the command line applied; otherwise
    ``new_config()``),
    applies ``--set`` overrides, checks that ``--data-dir`` is a directory (unless ``check_data_dir`` is
    false: the data layer then says what is missing), runs ``train(cfg, resume=...)`` and maps
    every expected failure to one ``nsl COMMAND: error: ...`` line (fields named by their flags:
    :func:`message_of`): exit 1 for a diverged run, 130
    for Ctrl-C (with the command that resumes), 75 (``EXIT_PREEMPTED``) for SIGTERM/SIGUSR1 (a checkpoint is
    written first), 2 for bad settings, run directories or data.
    Prints the summary as JSON with ``--json``.
    """
    from .data.errors import DatasetError
    from .train import CheckpointError, ConfigError, TrainingDiverged
    from .train.loop import EXIT_PREEMPTED, Preempted

    try:
        if args.out is None:
            raise ConfigError("--out RUN_DIR is required")
        saved = Path(args.out).expanduser() / "config.json"
        if args.resume and saved.exists():
            d = read_config_json(saved)
            if "stop_at" in d:  # an earlier --stop-at does not carry over to the continuation
                d["stop_at"] = 0
            d.update(on_resume or {})
            d.update(given)
            try:
                cfg = config_cls.from_dict(d)
            except ConfigError as e:
                if not any(k in given or k in (on_resume or {}) for k in e.fields):
                    raise ConfigError(f"{saved}: {e.render()}") from None  # the file's value, not a flag
                raise
        else:
            cfg = new_config()
        cfg = apply_overrides(cfg, args.set or [])
        if check_data_dir and cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
            raise ConfigError(f"--data-dir {cfg.data_dir} is not a directory")
        summary = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        return error(command, message_of(e), 1)
    except Preempted as e:
        return error(command, f"{e} (nsl {command} --out {args.out} --resume)", EXIT_PREEMPTED)
    except KeyboardInterrupt:
        return error(command, f"interrupted; continue from the last checkpoint with: nsl {command} --out {args.out} "
                              "--resume", 130)
    except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
        return error(command, message_of(e))
    if args.json:
        print(json.dumps(summary))
    return 0
