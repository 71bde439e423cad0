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

__all__ = ["CheckpointError", "RunDir", "Process", "atomic_save", "load_checkpoint", "rng_state", "set_rng_state",
           "resolve_device", "dist_env", "autocast_and_scaler"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not an nsl training checkpoint."""


# -- checkpoint files ------------------------------------------------------------------------------
def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader never sees a half-written file; on any error the temporary file is removed and ``path``
    keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, format: str = "nsl-train",
                    what: str = "an nsl training checkpoint (written by `nsl train`)") -> dict:
    """Read an nsl checkpoint (``weights_only=True``) whose ``format`` field is ``format``.

    Raises :class:`CheckpointError` naming the reason (a directory, missing, corrupt or truncated,
    or not ``what``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file such as {path}/checkpoints/best.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != format or "model" not in ckpt:
        raise CheckpointError(f"{path} is not {what}")
    return ckpt


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
    writes): :meth:`open` checks the directory for a new run or a resume, :meth:`start` writes the
    config and prepares the metrics file, :meth:`log` appends one metrics record,
    :meth:`save` writes a checkpoint atomically.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"

    def __str__(self) -> str:
        return str(self.path)

    def open(self, cfg, resume: bool, structural: tuple[str, ...], load=load_checkpoint) -> dict | None:
        """The checkpoint to resume from (``None`` for a new run), after checking the run directory.

        With ``resume``: ``last.pt`` must exist and the saved config must equal ``cfg`` on every field
        in ``structural`` (``ConfigError`` listing the differences). Without: the directory must not
        hold a run already. ``load`` reads the checkpoint (format-checked).
        """
        if resume:
            if not self.last.exists():
                raise CheckpointError(f"nothing to resume: {self.last} does not exist")
            ckpt = load(self.last)
            saved = type(cfg).from_dict(ckpt["config"])
            diff = [k for k in structural if getattr(saved, k) != getattr(cfg, k)]
            if diff:
                raise ConfigError("cannot resume with different " + ", ".join(
                    f"{k} (run: {getattr(saved, k)!r}, now: {getattr(cfg, k)!r})" for k in diff))
            return ckpt
        if self.last.exists():
            raise ConfigError(f"{self.path} already holds a run ({self.last}); pass {{resume}} to continue it or "
                              "choose another {out}", "resume", "out")
        return None

    def start(self, cfg, ckpt: dict | None, done: int, key: str) -> None:
        """Write ``config.json`` and prepare ``metrics.jsonl``.

        A new run (``ckpt`` None) starts an empty metrics file; a resumed one keeps only the records with
        ``record[key] <= done`` (those written after the checkpoint are replayed by the continuation).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(cfg.to_json() + "\n")
        if ckpt is not None and self.metrics.exists():
            keep = [ln for ln in self.metrics.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get(key, 0) <= done]
            self.metrics.write_text("".join(ln + "\n" for ln in keep))
        elif ckpt is None:
            self.metrics.write_text("")

    def log(self, record: dict) -> None:
        """Append ``record`` as one JSON line to ``metrics.jsonl``."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, state: dict, which: str = "last") -> None:
        """Write checkpoint ``state`` to ``checkpoints/{which}.pt`` (``last`` or ``best``) atomically."""
        atomic_save(state, self.last if which == "last" else self.best)

    def last_step(self, key: str) -> int | None:
        """``key`` (the step counter) of ``last.pt``, or ``None`` when there is no checkpoint yet."""
        if not self.last.exists():
            return None
        return int(torch.load(self.last, map_location="cpu", weights_only=True)[key])


# -- the process: device, DDP, AMP ------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables (``0, 1, 0`` without)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(cfg, local_rank: int = 0) -> torch.device:
    """``cfg.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a ``torch.device``; ``auto`` and ``cuda`` take
    GPU ``local_rank``. Raises ConfigError (naming the field ``device``) for CUDA without a GPU or an unknown name."""
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{{device}} {cfg.device} requested but CUDA is not available", "device")
        return torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    if cfg.device != "cpu":
        raise ConfigError(f"{{device}} must be cpu, cuda, cuda:N or auto, got {cfg.device!r}", "device")
    return torch.device("cpu")


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
