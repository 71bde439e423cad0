"""The run directory, its files and the process a run lives in: checkpoints, metrics, RNG, device, DDP, AMP.

Run directory layout (the same for every task of :func:`nsl.train.fit`)::

    RUN_DIR/config.json             the resolved configuration (every departure from a protocol is here)
    RUN_DIR/metrics.jsonl           one JSON object per logged training window ("kind": "train") or evaluation
    RUN_DIR/checkpoints/last.pt     latest state: model, optimizer, RNG (and loader) state, step counter
    RUN_DIR/checkpoints/best.pt     the same, at the best evaluation score so far

:class:`RunDir` is the one place that opens a run directory, writes ``config.json``, appends to
``metrics.jsonl`` and writes checkpoints. Checkpoints are written atomically (temporary file,
fsync, ``os.replace``: :func:`atomic_save`) and read with ``torch.load(weights_only=True)``
(:func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError
from .domains import ENGINE_DOMAINS
from .rundir import (
    NotARegularFile,
    RunLock,
    atomic_write_text,
    clean_stale_temps,
    describe_os_error,
    ensure_dir,
    open_regular,
    os_error_reason,
    read_jsonl,
    write_atomically,
)

__all__ = ["CheckpointError", "CHECKPOINT_VERSION", "READABLE_VERSIONS", "RunDir", "Process", "atomic_save",
           "check_checkpoint", "load_checkpoint", "load_model_state", "model_from_checkpoint", "nonfinite_tensors",
           "rng_state", "set_rng_state", "resolve_device", "dist_env", "autocast_and_scaler"]

#: The checkpoint format version that this nsl writes (the ``"version"`` entry) ...
CHECKPOINT_VERSION = 1
#: ... and the versions it reads (:func:`check_checkpoint`).
READABLE_VERSIONS = (1,)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not an nsl training checkpoint, or claims what it cannot be.

    ``wrong_format``: the file is a readable checkpoint of another format (so another reader may take it)."""

    def __init__(self, message: str, wrong_format: bool = False):
        super().__init__(message)
        self.wrong_format = wrong_format


# -- checkpoint files ------------------------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader never sees a half-written file; on any error the temporary file is removed and ``path``
    keeps its previous content."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(obj, f), binary=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (a full disk) as RuntimeError
        reason = os_error_reason(e) if isinstance(e, OSError) else _torch_write_error(e)
        kept = f"{path} keeps its previous content" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {reason} ({kept})") from None


def _torch_write_error(e: Exception) -> str:
    """The reason in torch.save's RuntimeError (its text carries C++ source locations and a stack)."""
    text = str(e)
    for hint, reason in (("file write failed", "the write failed (no space left on the device?)"),
                         ("No space left", "no space left on the device")):
        if hint in text:
            return reason
    return text.strip().splitlines()[-1][:200] if text.strip() else type(e).__name__


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v) -> str:
    """A short, one-line rendering of a checkpoint value for a message."""
    if torch.is_tensor(v):
        return f"a tensor of shape {list(v.shape)}"
    if isinstance(v, (dict, list, tuple)):
        return f"a {type(v).__name__} of {len(v)} entries"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_checkpoint(ckpt: dict, path, counters: tuple[str, str, str] = ("step", "iters", "best_step"),
                     resume: bool = False) -> dict:
    """The one check of what a checkpoint claims, for every reader (eval, export, viz, resume, few-shot).

    ``counters``: the names of its step counter, run length and best step (``step``, ``iters``, ``best_step``
    for ``nsl train``; ``episode``, ``episodes``, ``best_episode`` for ``nsl fewshot train``). Checked: the
    format version is one this nsl reads (:data:`READABLE_VERSIONS`), the step counter is an integer >= 0, and
    with ``resume`` every entry the training loop restores is there with its type (the run length >= 1 and not
    below the step, the best step in ``-1 .. step``, ``world_size`` >= 1, the optimizer, RNG, logging window and
    collapse-watch states dicts, ``best_acc`` and ``ema_loss`` numbers). Returns ``ckpt``; else
    :class:`CheckpointError`, one line naming the file and the field.
    """
    def refuse(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {field!r} {problem} (a damaged or edited file, or not one "
                               "written by nsl)")

    version = ckpt.get("version")
    if "version" not in ckpt:
        raise refuse("version", "is missing: the format version of the file is unknown")
    if not _int(version) or version not in READABLE_VERSIONS:
        newer = " (written by a newer nsl?)" if _int(version) and version > max(READABLE_VERSIONS) else ""
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(f"checkpoint {path}: format version {_shown(version)} is unknown to this nsl, which "
                              f"reads version {readable}{newer}")
    unit, total_key, best_key = counters
    fields = {unit: (lambda v: _int(v) and v >= 0, "an integer >= 0")}
    if resume:
        fields |= {total_key: (lambda v: _int(v) and v >= 1, "an integer >= 1"),
                   best_key: (lambda v: _int(v) and v >= -1, "an integer >= -1"),
                   "world_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
                   "best_acc": (_number, "a number"),
                   "ema_loss": (lambda v: v is None or _number(v), "a number or None"),
                   **{k: (lambda v: isinstance(v, dict), "a dict") for k in ("optimizer", "rng", "window",
                                                                             "collapse_watch")}}
    for field, (ok, expected) in fields.items():
        if field not in ckpt:
            raise refuse(field, f"is missing (expected {expected})")
        if not ok(ckpt[field]):
            raise refuse(field, f"is {_shown(ckpt[field])}, expected {expected}")
    if resume and ckpt[unit] > ckpt[total_key]:
        raise refuse(unit, f"is {ckpt[unit]}, past the run's length {total_key}={ckpt[total_key]}")
    if resume and ckpt[best_key] > ckpt[unit]:
        raise refuse(best_key, f"is {ckpt[best_key]}, after the checkpoint's {unit} {ckpt[unit]}")
    return ckpt


def load_checkpoint(path: str | Path, format: str = "nsl-train",
                    what: str = "an nsl training checkpoint (written by `nsl train`)",
                    counters: tuple[str, str, str] = ("step", "iters", "best_step"), resume: bool = False) -> dict:
    """Read an nsl checkpoint (``weights_only=True``) whose ``format`` field is ``format``, and check what it
    claims (:func:`check_checkpoint` with ``counters`` and ``resume``).

    Raises :class:`CheckpointError` naming the reason (not a regular file: a directory, a named pipe, a
    device, refused at once; missing, corrupt or truncated; not ``what``; a field it cannot hold).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file such as {path}/checkpoints/best.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open_regular(path) as f:  # a named pipe or device is refused here, never waited on
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except NotARegularFile as e:
        raise CheckpointError(f"checkpoint {e}") from None
    except OSError as e:
        raise CheckpointError(describe_os_error(e, path, "read checkpoint")) from None
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != format or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not {what}", wrong_format=True)
    missing = [k for k in ("config", "meta") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} is not {what}: it has no {' or '.join(missing)} entry (a checkpoint written "
                              "by an nsl training run holds both)")
    check_checkpoint(ckpt, path, counters, resume)
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), "
                              f"first {bad[0]}: the run diverged before it was saved; use an earlier checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict, path, config_cls, build):
    """``(model, cfg)`` of checkpoint ``ckpt`` read from ``path``: ``cfg = config_cls.from_dict(ckpt["config"])``,
    ``model = build(cfg, ckpt["meta"])`` with the weights loaded, in eval mode. :class:`CheckpointError`
    naming ``path`` when the saved config is invalid, the meta entry lacks what the model needs, or the
    weights do not fit the model (:func:`load_model_state`)."""
    try:
        cfg = config_cls.from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its saved config is invalid: {e.render()}") from None
    try:
        model = build(cfg, ckpt["meta"])
    except KeyError as e:
        raise CheckpointError(f"{path}: its meta entry lacks {e}") from None
    load_model_state(model, ckpt["model"], path)
    return model.eval(), cfg


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state)``, or :class:`CheckpointError` saying in one line why the checkpoint
    at ``path`` does not fit ``model`` (another layer kind, width or model: missing, unexpected or resized
    tensors), instead of PyTorch's multi-line report."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
               if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        parts = [f"{len(v)} {what} (first {v[0]})" for what, v in
                 (("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
                  ("tensor(s) of another shape, checkpoint vs model", resized)) if v]
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes ({'; '.join(parts)}): "
                              "it was written for another layer kind, width or model, or edited")
    model.load_state_dict(state)


def nonfinite_tensors(tensors) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, from a ``state_dict`` or ``named_*`` pairs."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    floats = [(k, t) for k, t in items if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex())]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all().to("cpu", non_blocking=True) for _, t in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]


# -- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The torch (CPU and CUDA) and Python random states, as checkpoint-safe tensors and lists."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the run directory -----------------------------------------------------------------------------
class RunDir:
    """A run directory: ``config.json``, ``metrics.jsonl`` and ``checkpoints/{last,best}.pt``.

    Every file of a run is opened, written or read through this class (only the main process
    writes): :meth:`open` takes the directory's lock and checks it for a new run or a resume,
    :meth:`start` writes the config and prepares the metrics file, :meth:`log` appends one metrics
    record, :meth:`save` writes a checkpoint atomically, :meth:`close` releases the lock.

    Rules: one writer at a time (an exclusive lock on ``RUN_DIR/.lock``, held from :meth:`open` to
    :meth:`close`, released by the OS if the process dies: :class:`~nsl.train.rundir.RunLock`);
    temporary files a killed writer left are removed once the lock is held; ``config.json`` and
    checkpoints are written atomically; a torn last line of ``metrics.jsonl`` (a crash mid-write) is
    dropped on resume.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.lock = RunLock(self.path)
        self.torn_record = False  # start() dropped a torn last line of metrics.jsonl

    def __str__(self) -> str:
        return str(self.path)

    def open(self, cfg, resume: bool, structural: tuple[str, ...], load=load_checkpoint, lock: bool = True
             ) -> dict | None:
        """The checkpoint to resume from (``None`` for a new run), after checking the run directory.

        With ``lock`` (the main process) the directory is created and locked first (``RunDirBusy`` when
        another process holds it; ``ConfigError`` naming ``out`` when it is a file or not writable), and stale
        temporary files are removed. With ``resume``: a missing ``last.pt`` starts fresh (None); else the saved
        config must equal ``cfg`` on every field in ``structural`` (``ConfigError`` listing the differences).
        Without: the directory must not hold a run already. ``load(path, resume=True)`` reads the checkpoint
        (format and fields checked: :func:`check_checkpoint`).
        """
        if lock:
            self.lock.acquire()
            try:
                clean_stale_temps(self.path)
                return self._check(cfg, resume, structural, load)
            except BaseException:
                self.close()
                raise
        return self._check(cfg, resume, structural, load)

    def _check(self, cfg, resume, structural, load) -> dict | None:
        if resume and not self.last.exists():  # a requeued job stopped before its first checkpoint
            return None
        if resume:
            ckpt = load(self.last, resume=True)
            try:
                saved = type(cfg).from_dict(ckpt["config"])
            except ConfigError as e:
                raise CheckpointError(f"{self.last}: its saved config is invalid: {e.render()}") from None
            diff = [k for k in structural if getattr(saved, k) != getattr(cfg, k)]
            if diff:
                raise ConfigError("cannot resume with different " + ", ".join(
                    f"{k} (run: {getattr(saved, k)!r}, now: {getattr(cfg, k)!r})" for k in diff))
            return ckpt
        if self.last.exists():
            raise ConfigError(f"{self.path} already holds a run ({self.last}); pass {{resume}} to continue it or "
                              "choose another {out}", "resume", "out")
        return None

    def close(self) -> None:
        """Release the directory's lock (nothing to do when it is not held)."""
        self.lock.release()

    def start(self, cfg, ckpt: dict | None, done: int, key: str) -> None:
        """Write ``config.json`` (atomically) and prepare ``metrics.jsonl``.

        A new run (``ckpt`` None) starts an empty metrics file; a resumed one keeps only the records with
        ``record[key] <= done`` (those written after the checkpoint are replayed by the continuation), and
        drops a torn last line left by a crash in the middle of a write (:attr:`torn_record`).
        """
        ensure_dir(self.path)
        atomic_write_text(self.config, cfg.to_json() + "\n")
        if ckpt is not None and self.metrics.exists():
            records, self.torn_record = read_jsonl(self.metrics)
            keep = [r for r in records if r.get(key, 0) <= done]
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))
        elif ckpt is None:
            atomic_write_text(self.metrics, "")

    def log(self, record: dict) -> None:
        """Append ``record`` as one JSON line to ``metrics.jsonl``."""
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(describe_os_error(e, self.metrics, "append to")) from None

    def save(self, state: dict, which: str = "last") -> None:
        """Write checkpoint ``state`` to ``checkpoints/{which}.pt`` (``last`` or ``best``) atomically."""
        atomic_save(state, self.last if which == "last" else self.best)

    def last_step(self, key: str) -> int | None:
        """``key`` (the step counter) of ``last.pt``, or ``None`` when there is no checkpoint yet."""
        try:
            with open_regular(self.last) as f:
                step = torch.load(f, map_location="cpu", weights_only=True)[key]
        except Exception:  # noqa: BLE001 - missing, unreadable or not ours: no step to name
            return None
        return int(step) if _int(step) else None


# -- the process: device, DDP, AMP ------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables (``0, 1, 0`` without)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``device``, a value of the ``device`` domain (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``,
    ``xpu:N``), as a ``torch.device``: ``auto`` is GPU ``local_rank`` where CUDA is available and the CPU
    elsewhere; ``cuda`` and ``xpu`` take device ``local_rank``. Raises ConfigError naming the field ``device``
    for a value outside the domain or an accelerator this machine does not have."""
    domain = ENGINE_DOMAINS["device"]
    if not domain.contains(device):
        raise ConfigError(f"{{device}} must be {domain.describe()}, got {device!r}", "device")
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    backends = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    backend = backends[kind]
    name = kind.upper()
    if backend is None or not backend.is_available():
        raise ConfigError(f"{{device}} {device} requested but {name} is not available", "device")
    if kind == "mps":
        return torch.device("mps")
    i = int(index) if index else local_rank
    count = backend.device_count()
    if i >= count:
        raise ConfigError(f"{{device}} {device} requested but this machine has {count} {name} device(s)"
                          f"{f' (local rank {local_rank})' if not index else ''}", "device")
    return torch.device(kind, i)


def autocast_and_scaler(amp: str, device: torch.device):
    """``(autocast, scaler)`` for the ``amp`` setting (``none``, ``bf16``, ``fp16``, ``auto``: bf16 on CUDA,
    none on the CPU): ``autocast()`` is a context manager for the forward pass, ``scaler`` a
    ``GradScaler`` for fp16 (else ``None``)."""
    mode = amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "none"
    if mode == "none":
        return nullcontext, None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA; use amp=bf16 or none on the CPU")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


@dataclass
class Process:
    """Where this process of a run stands: its ``rank`` of ``world_size`` (torchrun), its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only the main process (rank 0) writes files and messages."""
        return self.rank == 0
