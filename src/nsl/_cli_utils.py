"""Argument types and the training front end shared by the command-line modules."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
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


def _integer(text: str) -> int:
    """argparse type of integer fields (the range is the field's domain, checked with the config)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    """argparse type of number fields."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


_ARG_TYPES = {"int": _integer, "float": _number, "str": str}


@dataclass(frozen=True)
class FieldFlag:
    """A command-line flag that sets the configuration field ``field``.

    The flag is ``--field-name`` unless ``name`` says otherwise; its type is the field's domain kind
    (:mod:`nsl.train.domains`), whose range and choices are checked when the config is built, so a flag
    and ``--set`` refuse a value with the same message. A boolean field's flag sets ``const`` (``True``:
    ``--rotations``; ``False``: ``--no-progress``). ``help`` defaults to the domain's description."""

    field: str
    help: str = ""
    name: str = ""
    const: bool = True

    @property
    def flag(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")


#: ``nsl train``'s flags (every other TrainConfig field: ``--set FIELD=VALUE``)
TRAIN_FLAGS = (
    FieldFlag("dataset", "cifar10, cifar100, mnist, fashion-mnist, digits, imagefolder"),
    FieldFlag("data_dir", "folder holding the dataset's files"),
    FieldFlag("model", "the model (default cnn9): {choices}"),
    FieldFlag("layer", "the layer kind (default conv): {choices}"),
    FieldFlag("out", "run directory"),
    FieldFlag("batch_size"),
    FieldFlag("seed"),
    FieldFlag("device"),
    FieldFlag("train_subset", "train on N images of a fixed seeded subset", name="--subset"),
    FieldFlag("test_subset", "evaluate on the first N test images"),
    FieldFlag("lr"),
    FieldFlag("warmup_iters", "linear lr warm-up (not in the paper)"),
    FieldFlag("bn_momentum", "BN running-stat momentum (paper 0.001)"),
    FieldFlag("bn_recalibrate", "recompute BN statistics on N training batches before each evaluation (not in the "
                                "paper)"),
    FieldFlag("amp"),
    FieldFlag("channels_last", "channels-last memory format"),
    FieldFlag("eval_every", "steps between test evaluations (0: at the end)"),
    FieldFlag("stop_at", "stop after N steps as if interrupted"),
    FieldFlag("progress", "hide the progress bar", name="--no-progress", const=False),
)
#: ``nsl train``'s run-length flags, one or the other
TRAIN_LENGTH_FLAGS = (FieldFlag("iters", "optimizer steps"), FieldFlag("epochs", "epochs (converted to steps)"))

#: ``nsl fewshot train``'s flags (every other FewShotConfig field: ``--set FIELD=VALUE``)
FEWSHOT_TRAIN_FLAGS = (
    FieldFlag("dataset", "the few-shot dataset (default cifar-fs): {choices}"),
    FieldFlag("data_dir", "folder holding the dataset's files"),
    FieldFlag("backbone", "the backbone (default conv4): {choices}"),
    FieldFlag("layer", "the layer kind (default conv): {choices}"),
    FieldFlag("head", "the episode head (default protonet): {choices}"),
    FieldFlag("ways", "classes per validation episode (default 5)"),
    FieldFlag("shots", "support images per class (default 1)"),
    FieldFlag("queries", "query images per class (default 15)"),
    FieldFlag("train_ways", "classes per training episode (default: --ways)"),
    FieldFlag("train_shots", "default: --shots"),
    FieldFlag("episodes", "training episodes (default 20000)"),
    FieldFlag("lr", "Adam learning rate (default 1e-3)"),
    FieldFlag("lr_step", "halve the lr every N episodes (2000)"),
    FieldFlag("val_every", "episodes between validations (default 500)"),
    FieldFlag("val_episodes", "val episodes (default 200)"),
    FieldFlag("seed"),
    FieldFlag("device"),
    FieldFlag("out", "run directory"),
    FieldFlag("rotations", "Omniglot: rotated characters as classes"),
    FieldFlag("progress", "hide the progress bar", name="--no-progress", const=False),
)


def add_field_flags(parser, config_cls, flags) -> None:
    """Add ``flags`` (:class:`FieldFlag`) of ``config_cls``'s fields to ``parser`` (a parser or a group): each
    stores into ``args.FIELD`` (None when not given), typed by the field's domain."""
    for f in flags:
        domain = config_cls.DOMAINS[f.field]
        text = (f.help or domain.describe()).replace("%", "%%")
        if "{choices}" in text:
            text = text.format(choices=", ".join(map(str, domain._choices())))
        if domain.kind == "bool":
            parser.add_argument(f.flag, dest=f.field, action="store_const", const=f.const, help=text)
        else:
            parser.add_argument(f.flag, dest=f.field, type=_ARG_TYPES.get(domain.kind, str), help=text,
                                metavar=f.flag[2:].upper().replace("-", "_"))


def given_fields(args: argparse.Namespace, flags) -> dict:
    """The fields whose flags were given: ``{field: value}``."""
    return {f.field: getattr(args, f.field) for f in flags if getattr(args, f.field) is not None}


#: The command-line flag of each configuration field (or training argument) that has one, derived from the
#: commands' flag tables; an error that names a field (:class:`nsl.train.ConfigError` ``fields``) names it by
#: this flag on the command line, and a field without a flag by ``--set FIELD=...``.
FIELD_FLAGS = {f.field: f.flag for f in (*TRAIN_FLAGS, *TRAIN_LENGTH_FLAGS, *FEWSHOT_TRAIN_FLAGS)} | {
    "resume": "--resume", "protocol": "--protocol", "checkpoint": "--checkpoint"}


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


#: Signals that ask a command to stop (a scheduler, ``kill``, a closed terminal); training commands handle
#: SIGTERM and SIGUSR1 themselves while they train (a checkpoint, then exit 75).
TERMINATION_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGUSR1") if hasattr(signal, n))


class Terminated(BaseException):
    """A termination signal arrived while a command ran (:func:`terminate_by_exception`).

    A ``BaseException`` like ``KeyboardInterrupt``: the library's ``except Exception`` blocks do not swallow it,
    and every ``finally`` on the way out runs (temporary files are removed, locks released)."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def terminate_by_exception():
    """While the block runs (in the main thread), :data:`TERMINATION_SIGNALS` raise :class:`Terminated`
    instead of killing the process on the spot, which would leave temporary files behind (``nsl export``'s
    ``.NAME.tmpPID``, a half-extracted download); handlers installed inside the block (the training loop's)
    take precedence while they are installed. The previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (a DataLoader worker) dies of the signal as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    saved = {s: signal.signal(s, handler) for s in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def read_config_json(path: Path) -> dict:
    """The JSON object in a run's ``config.json``; :class:`~nsl.train.ConfigError` naming the file when it is
    unreadable, not JSON or not an object."""
    from .train import ConfigError
    from .train.rundir import NotARegularFile, read_regular_text

    try:
        d = json.loads(read_regular_text(path))
    except NotARegularFile as e:
        raise ConfigError(str(e)) from None
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
    written first; under ``torchrun`` every rank exits 75 and only rank 0 prints the line), 2 for bad
    settings, run directories or data.
    Prints the summary as JSON with ``--json``.
    """
    from .data.errors import DatasetError
    from .train import CheckpointError, ConfigError, TrainingDiverged
    from .train.loop import EXIT_PREEMPTED, Preempted
    from .train.run import dist_env

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
        if dist_env()[0] != 0:  # every torchrun rank stops at the same step; rank 0 says so, once
            return EXIT_PREEMPTED
        return error(command, f"{e} (nsl {command} --out {args.out} --resume)", EXIT_PREEMPTED)
    except KeyboardInterrupt:
        return error(command, f"interrupted; continue from the last checkpoint with: nsl {command} --out {args.out} "
                              "--resume", 130)
    except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
        return error(command, message_of(e))
    if args.json:
        print(json.dumps(summary))
    return 0


# -- --download of nsl train / nsl fewshot train -------------------------------------------------------------------
def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _fetch_dataset(dataset: str, data_dir: str | None, progress: bool) -> None:
    """``--download``: fetch ``dataset`` into ``data_dir`` unless it is there (``nsl.data.download.ensure_dataset``)."""
    from .data.download import NO_FILES, ensure_dataset
    from .data.errors import DatasetError

    if str(dataset).lower().replace("_", "-") in NO_FILES:
        return
    if data_dir is None:
        raise ValueError(f"--download needs --data-dir DIR, the folder to download {dataset} into")
    try:
        ensure_dataset(dataset, data_dir, progress=progress, echo=_stderr)
    except DatasetError:
        raise
    except ValueError as e:
        raise ValueError(f"--download: {e}") from None
    except OSError as e:
        raise DatasetError(f"--download: cannot write into --data-dir {data_dir}: {e.strerror or e}") from None


def with_download(train):
    """``train(cfg, resume)`` that first downloads ``cfg.dataset`` into ``cfg.data_dir`` when it is not
    there (``--download`` of ``nsl train`` and ``nsl fewshot train``)."""
    def run(cfg, resume: bool = False, **kw):
        _fetch_dataset(cfg.dataset, cfg.data_dir, bool(getattr(cfg, "progress", True)))
        return train(cfg, resume=resume, **kw)

    return run
