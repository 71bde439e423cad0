"""The one training loop, :func:`fit`, and the :class:`Task` interface it trains.

A task (:class:`~nsl.train.classification.ClassificationTask`, :class:`~nsl.fewshot.train.FewShotTask`)
supplies the data (batches or episodes), the model, the optimizer and its lr schedule, the loss and
its training metrics, and its evaluation. :func:`fit` owns the rest: the run directory
(:class:`~nsl.train.run.RunDir`), seeding, device, DDP, AMP, ``torch.compile``, the steps, the lr
schedule's application, gradient clipping, the divergence stop, the progress bar, metrics records,
the evaluation cadence, best/last atomic checkpoints and bit-exact resume. The loop itself is
``_Training.run``, which reads as the sequence of its named parts: ``open``, ``build``, ``restore``,
``wrap``, then per step ``train_step``, ``due``, ``preempt_signal``, ``flush``, ``log``, ``evaluate``,
``save``, and ``finish``.

One step ``s`` (0-based) of ``total``: ``batch = next(batches)``; ``lr_g = base_lr_g * task.lr_factor(s)``;
``loss, stats, items = task.loss(net, batch, autocast)``; backward (scaled under fp16),
``clip_grad_norm_(grad_clip)``, optimizer step. The losses and metrics stay on the device until the
next step that logs, evaluates or saves: there they come to the host in one synchronisation and the
divergence check runs (stop if a loss is not finite, naming the first such step), before any
record or checkpoint of that step is written, so no checkpoint holds a diverged state. A loss that stays
finite but returns to ``task.chance_loss`` (input-independent logits) for two logged windows, after having
been well below it, prints one warning that the run has collapsed (:class:`_CollapseWatch`).
Every ``log_every`` steps a ``{"kind": "train"}`` record holds the window's mean loss, the window
means of ``stats`` and the throughput (``items`` per second of training time); every
``task.eval_every`` steps and at the end an evaluation record (``task.eval_kind``) and, when
``task.score_key`` improved, ``best.pt``.

Data parallel: launched by ``torchrun`` (``WORLD_SIZE > 1``) the loop initialises
``torch.distributed`` (nccl on CUDA, gloo on CPU), wraps the model in ``DistributedDataParallel``,
averages the logged loss over ranks and gathers the per-rank loader states into the checkpoint;
only rank 0 writes files. The task shards its data by ``Process.rank``.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError
from .run import (
    CHECKPOINT_VERSION,
    CheckpointError,
    Process,
    RunDir,
    autocast_and_scaler,
    dist_env,
    load_model_state,
    nonfinite_tensors,
    resolve_device,
    rng_state,
    set_rng_state,
)

__all__ = ["fit", "Task", "TrainingDiverged", "Preempted", "EXIT_PREEMPTED", "PREEMPT_SIGNALS"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the exit code of a training command stopped by SIGTERM/SIGUSR1 after saving
PREEMPT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class Preempted(Exception):
    """Training was stopped by a preemption signal (:data:`PREEMPT_SIGNALS`): the current step finished and
    ``checkpoints/last.pt`` was written; ``--resume`` continues bit-exactly. The CLI exits :data:`EXIT_PREEMPTED`.
    ``signal_name``: the signal's name (``"SIGTERM"``)."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name


class _SignalFlag:
    """Sets :attr:`hit` (the signal number) on a preemption signal while installed (main thread only); restores
    the previous handlers on :meth:`restore`."""

    def __init__(self):
        self.hit, self.saved = 0, {}
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self.saved[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.hit = signum

    def restore(self) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)
        self.saved = {}



class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Task:
    """What :func:`fit` trains. Subclasses set the class attributes and implement the methods.

    Names (records, checkpoints, messages): ``unit`` (the step counter's key: ``step``, ``episode``),
    ``total_key`` (the run length's checkpoint key: ``iters``, ``episodes``), ``best_key``,
    ``eval_kind`` (the evaluation records' ``kind``), ``score_key`` (the evaluation result that selects
    ``best.pt``, higher is better), ``items`` (what ``loss`` counts: the throughput is ``<items>_per_s``,
    printed with ``rate_digits`` decimals), ``bar_unit``, ``name`` (the progress bar's), ``checkpoint_format``,
    ``structural`` (config fields a resumed run must keep), ``divergence_hint``.

    Lifecycle: ``setup(process, ckpt)`` (data; sets ``total`` and ``meta``), then, after seeding,
    ``build_model()``, ``optimizer(model)``, ``attach(model, optimizer)``; each step ``before_step``,
    ``loss``, ``after_step``; ``evaluate`` at the cadence ``eval_every``.
    """

    unit = "step"
    total_key = "iters"
    best_key = "best_step"
    eval_kind = "eval"
    score_key = "test_acc"
    items = "images"
    rate_digits = 0
    bar_unit = "it"
    name = ""
    checkpoint_format = "nsl-train"
    structural: tuple[str, ...] = ()
    divergence_hint = "a lower lr or grad_clip"
    supports_distributed = True
    #: the training loss of a prediction that ignores its input (uniform over ``C`` classes: ``ln C``, whatever
    #: the smoothing or mixing of the targets); ``None`` turns the collapse warning off
    chance_loss: float | None = None

    total: int
    meta: dict
    eval_every: int = 0

    @property
    def throughput_key(self) -> str:
        return f"{self.items}_per_s"

    def load_checkpoint(self, path: Path, resume: bool = False) -> dict:
        """Read the checkpoint at ``path``, its format and fields checked (:func:`nsl.train.run.check_checkpoint`
        with this task's counters; ``resume``: also what :meth:`_Training.restore` reads)."""
        raise NotImplementedError

    def setup(self, process: Process, ckpt: dict | None) -> None:
        """Load the data for ``process``; set ``self.total`` (steps) and ``self.meta`` (saved in checkpoints)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The freshly initialised model on ``process.device`` (the torch RNG is seeded with ``cfg.seed``)."""
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once the model and optimizer exist (before a checkpoint is restored)."""

    def lr_factor(self, step: int) -> float:
        """Multiplier of every parameter group's base lr at step ``step`` (0-based)."""
        raise NotImplementedError

    def batches(self, step: int) -> Iterator:
        """An endless stream of training batches, starting at step ``step``."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Called before the forward pass of ``step``."""

    def loss(self, net: nn.Module, batch, autocast) -> tuple[torch.Tensor, dict, int]:
        """``(loss, stats, items)`` of one step: the scalar loss to minimise, the training metrics
        ``{name: (sum, count)}`` averaged over the logging window as ``sum / count`` (``sum`` a number or a
        detached 0-dim tensor, left on the device: :func:`fit` synchronises only when it logs, evaluates or
        saves), and the number of items trained (images, episodes; a Python int) for the throughput.
        ``autocast()`` wraps the forward pass."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimizer step of ``step``."""

    def evaluate(self, model: nn.Module, autocast) -> dict:
        """The evaluation record's fields; ``result[score_key]`` selects ``best.pt``."""
        raise NotImplementedError

    def record_extras(self) -> dict:
        """Fields added to every metrics record (e.g. the kernel-shape active fraction)."""
        return {}

    def loader_state(self):
        """The training data stream's position (saved as ``"loader"``), or ``None`` when the step defines it."""
        return None

    def load_loader_state(self, state) -> None:
        pass

    def state_dict(self, step: int) -> dict:
        """Extra checkpoint entries of the task, saved after ``step`` steps."""
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore :meth:`state_dict`'s entries from checkpoint ``ckpt``."""

    def describe(self, params: int) -> str:
        """The start message after ``run RUN_DIR: ``."""
        raise NotImplementedError

    def eval_message(self, result: dict) -> str:
        """One line about evaluation ``result`` (progress bar, final message)."""
        raise NotImplementedError

    def summary(self, result: dict | None) -> dict:
        """The task's fields of the run summary, from the last evaluation ``result``."""
        return dict(result or {})


class _Window:
    """Sums over the steps since the last train record (host-side, filled at synchronisation points).

    Checkpoints hold it (:meth:`state_dict`), so that a resumed run writes the same train records as an
    uninterrupted one (the throughput and times aside)."""

    def __init__(self):
        self.loss, self.steps, self.items, self.stats, self.train_time = 0.0, 0, 0, {}, 0.0

    def state_dict(self) -> dict:
        return {"loss": self.loss, "steps": self.steps, "items": self.items, "train_time": self.train_time,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.steps, self.items = float(state["loss"]), int(state["steps"]), int(state["items"])
        self.train_time = float(state["train_time"])
        self.stats = {k: [float(v[0]), int(v[1])] for k, v in state["stats"].items()}

    def record(self, unit: str, step: int, lr: float, throughput_key: str, world_size: int, time: float,
               extras: dict) -> dict:
        means = {k: s / max(1, n) for k, (s, n) in self.stats.items()}
        record = {"kind": "train", unit: step, "loss": self.loss / max(1, self.steps)}
        if "acc" in means:
            record["acc"] = means.pop("acc")
        record.update({"lr": lr, throughput_key: self.items * world_size / max(self.train_time, 1e-9), "time": time,
                       **means, **extras})
        return record


class _CollapseWatch:
    """Warns once when training has collapsed: a loss that stays finite, so the divergence stop never fires,
    but sits at the task's ``chance_loss`` (the logits no longer depend on the input) after having been well
    below it. Fed the mean loss of each logged window; a window counts when it is within ``tol`` (relative) of
    ``chance``, once some earlier window was below ``below * chance``; ``windows`` in a row make the warning.
    Checkpoints hold its state (:meth:`state_dict`), so a resumed run warns where an uninterrupted one does."""

    windows, tol, below = 2, 0.005, 0.9

    def __init__(self, chance: float | None):
        self.chance, self.best, self.run, self.first, self.warned = chance, math.inf, 0, None, False

    def state_dict(self) -> dict:
        return {"best": self.best, "run": self.run, "first": self.first, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.run, self.warned = float(state["best"]), int(state["run"]), bool(state["warned"])
        self.first = None if state["first"] is None else int(state["first"])

    def update(self, step: int, loss: float) -> tuple[float, int] | None:
        """Add the window ending at ``step``; ``(best loss, first collapsed step)`` when it is time to warn."""
        if self.chance is None or self.warned:
            return None
        if self.best < self.below * self.chance and abs(loss - self.chance) <= self.tol * self.chance:
            self.run += 1
            self.first = step if self.run == 1 else self.first
        else:
            self.run, self.first = 0, None
        self.best = min(self.best, loss)
        if self.run >= self.windows:
            self.warned = True
            return self.best, self.first
        return None


def fit(task: Task, cfg, resume: bool = False, echo=print) -> dict:
    """Train ``task`` with settings ``cfg`` into the run directory ``cfg.out``; return the run summary.

    Args:
        task: what to train (:class:`Task`).
        cfg: its configuration (a :class:`~nsl.train.config.ConfigBase`: ``out``, ``seed``, ``device``,
            ``progress``, ``log_every``, ``checkpoint_every``, ``grad_clip``, ``amp``, ``stop_at``, ``compile``,
            ``compile_backend`` are read here).
        resume: continue the run in ``cfg.out`` from ``checkpoints/last.pt`` (the fields in
            ``task.structural`` must match the saved ones).
        echo: where messages go (rank 0 only).

    Returns:
        ``{run_dir, <unit>, <total_key>, params, seconds, train_seconds, <throughput_key>, best_acc,
        <best_key>, stopped, ...task.summary()}``; the throughput counts training time only
        (``train_seconds``: the steps, without evaluations and checkpoint writes).

    Raises:
        TrainingDiverged: the loss became NaN/inf (last.pt keeps the last good state).
        ConfigError, CheckpointError, DatasetError: bad settings, run directory or data.
    """
    if not cfg.out:
        raise ConfigError("set the run directory ({out} RUN_DIR)", "out")
    cfg.validate()
    run = RunDir(cfg.out)
    rank, world_size, local_rank = dist_env()
    if world_size > 1 and not task.supports_distributed:
        raise ConfigError(f"{type(task).__name__} runs in one process; got WORLD_SIZE={world_size}")
    process = Process(rank, world_size, local_rank, resolve_device(cfg.device, local_rank))
    own_group = False
    if process.distributed and not dist.is_initialized():
        if process.device.type == "cuda":
            torch.cuda.set_device(process.device)
        dist.init_process_group("nccl" if process.device.type == "cuda" else "gloo")
        own_group = True
    flag = _SignalFlag()
    try:
        result = _Training(task, cfg, echo, run, process, flag).run(resume)
        if own_group:  # every rank is done with the group before any tears it down (gloo aborted a rank in CI)
            dist.barrier()
        return result
    finally:
        flag.restore()
        run.close()
        if own_group:
            dist.destroy_process_group()


class _Training:
    """One run of :func:`fit`: its state (step, best score, logging window, pending losses, clocks) and the
    named parts of the loop, called in order by :meth:`run`."""

    def __init__(self, task: Task, cfg, echo, run: RunDir, process: Process, flag: _SignalFlag):
        self.task, self.cfg, self.run_dir, self.process, self.flag = task, cfg, run, process, flag
        self.main, self.world_size, self.unit = process.main, process.world_size, task.unit
        self.say = echo if process.main else (lambda *a, **k: None)
        self.step, self.best_acc, self.best_step = 0, -1.0, -1
        self.window, self.ema_loss, self.collapse = _Window(), None, _CollapseWatch(task.chance_loss)
        self.pending: list[tuple[int, float, torch.Tensor, dict]] = []  # steps not yet synchronised with the host
        self.train_time, self.trained, self.last_eval = 0.0, 0, None

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, resume: bool) -> dict:
        """Open the run directory, build (and restore), train to ``task.total``, return the run summary."""
        task, cfg, unit = self.task, self.cfg, self.unit
        ckpt = self.open(resume)
        self.build()
        if ckpt is not None:
            self.restore(ckpt)
        self.wrap()
        if self.main:
            self.run_dir.start(cfg, ckpt, self.step, unit)
        self.say(f"run {self.run_dir}: {task.describe(self.params)}, device {self.process.device}"
                 + (f", resuming at {unit} {self.step}" if ckpt else ""))
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=min(self.step, self.total), disable=not (cfg.progress and self.main),
                        unit=task.bar_unit, dynamic_ncols=True, desc=task.name)
        stream = task.batches(self.step)
        self.net.train()
        self.t_start = self.t_mark = time.perf_counter()  # t_mark: start of the training time not yet counted
        stopped = False
        try:
            while self.step < self.total:
                if cfg.stop_at and self.step >= cfg.stop_at:
                    stopped = True
                    break
                self.train_step(next(stream))
                log_now, eval_now, save_now = self.due()
                preempt = self.preempt_signal()
                if not (log_now or save_now or preempt):
                    continue
                self.flush()  # the divergence check comes before any record or checkpoint of this step
                self.show_progress()
                if log_now:
                    self.log()
                if eval_now:
                    self.evaluate()
                if save_now or preempt:
                    self.save("last")
                if preempt:
                    if self.process.distributed:  # no rank exits (torchrun then stops the others) before last.pt
                        dist.barrier()
                    name = signal.Signals(preempt).name
                    raise Preempted(f"stopped by {name} at {unit} {self.step} of {self.total}; checkpoint "
                                    f"{self.run_dir.last} written; continue with --resume", name)
                self.t_mark = time.perf_counter()  # evaluations and checkpoint writes are not training time
            self.flush()
        finally:
            self.bar.close()
        return self.finish(stopped, ckpt)

    # -- before the first step ----------------------------------------------------------------------------
    def open(self, resume: bool) -> dict | None:
        """Open (and lock) the run directory; the checkpoint to resume from, or None."""
        ckpt = self.run_dir.open(self.cfg, resume, self.task.structural, load=self.task.load_checkpoint,
                                 lock=self.main)
        if ckpt is not None and ckpt["world_size"] != self.world_size:
            raise ConfigError(f"the run was saved with {ckpt['world_size']} processes; resume with the same "
                              f"number (now {self.world_size})")
        if resume and ckpt is None:
            self.say(f"nothing to resume in {self.run_dir} (no checkpoint was written yet); starting fresh")
        self.task.setup(self.process, ckpt)
        self.total = self.task.total
        return ckpt

    def build(self) -> None:
        """Seed, then build the model, its optimizer, and the autocast context and gradient scaler."""
        task = self.task
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self.model = task.build_model()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = task.optimizer(self.model)
        task.attach(self.model, self.opt)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.autocast, self.scaler = autocast_and_scaler(self.cfg.amp, self.process.device)

    def restore(self, ckpt: dict) -> None:
        """Continue from checkpoint ``ckpt``: weights, optimizer, data position, RNG, task, scaler, counters, and
        the logging window and collapse watch it was taken in."""
        task, unit = self.task, self.unit
        load_model_state(self.model, ckpt["model"], self.run_dir.last)
        self.restore_optimizer(ckpt["optimizer"])
        try:  # the entries were checked by type (check_checkpoint); what is inside them is checked here
            if "loader" in ckpt:
                states = ckpt["loader"]
                task.load_loader_state(states[self.process.rank] if isinstance(states, list) else states)
            set_rng_state(ckpt["rng"])
            task.load_state_dict(ckpt)
            if self.scaler is not None and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.window.load_state_dict(ckpt["window"])  # the logging window the checkpoint was taken in
            self.collapse.load_state_dict(ckpt["collapse_watch"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise CheckpointError(f"checkpoint {self.run_dir.last}: cannot restore the training state it holds "
                                  f"({type(e).__name__}: {text})") from None
        self.step, self.best_acc, self.best_step = ckpt[unit], float(ckpt["best_acc"]), ckpt[task.best_key]
        self.ema_loss = ckpt["ema_loss"]
        if self.step >= self.total:
            self.say(f"the run in {self.run_dir} is already complete ({self.step} of {self.total} {unit}s)")

    def restore_optimizer(self, state: dict) -> None:
        """Load the optimizer's state from the checkpoint (momentum buffers, Adam moments, step counts) and keep
        this run's hyperparameters: every entry of each parameter group but ``params`` (``weight_decay``,
        ``momentum``, ``nesterov``, ``betas``, ``lr``, ...) is the one the config built, so a resumed run does
        what its recorded config says (``torch.optim.Optimizer.load_state_dict`` would bring back the saved
        values). The groups must be the run's: the same names and sizes, in order (:class:`CheckpointError`
        otherwise, as for a state that does not load)."""
        path, opt = self.run_dir.last, self.opt
        groups = state.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state.get("state"), dict) \
                or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise CheckpointError(f"checkpoint {path}: 'optimizer' is not an optimizer state (no 'state' and "
                                  "'param_groups')")
        now = [(g.get("name"), len(g["params"])) for g in opt.param_groups]
        saved = [(g.get("name"), len(g["params"])) for g in groups]
        if now != saved:
            raise CheckpointError(f"checkpoint {path}: its optimizer's parameter groups (name, size) {saved} are not "
                                  f"this run's {now}; resume with the settings the run was started with")
        config = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            opt.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: its optimizer state does not load into this run's "
                                  f"{type(opt).__name__} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
                                  ) from None
        for group, hyper in zip(opt.param_groups, config):
            group.update(hyper)

    def wrap(self) -> None:
        """``self.net``: the model in DistributedDataParallel and/or ``torch.compile`` (the uncompiled
        ``self.model`` is what checkpoints save and evaluations run)."""
        cfg, process = self.cfg, self.process
        self.net = self.model
        if process.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
        if cfg.compile != "none":
            self.net = torch.compile(self.net, backend=cfg.compile_backend,
                                     mode=None if cfg.compile == "default" else cfg.compile)

    # -- each step ------------------------------------------------------------------------------------------
    def train_step(self, batch) -> None:
        """One optimizer step on ``batch`` at the scheduled lr; its loss and metrics stay on the device."""
        task, opt, scaler, step = self.task, self.opt, self.scaler, self.step
        task.before_step(step)
        f = self.lr_factor = task.lr_factor(step)
        for g, base in zip(opt.param_groups, self.base_lrs):
            g["lr"] = base * f
        loss, stats, items = task.loss(self.net, batch, self.autocast)
        loss_value = loss.detach().clone()
        if self.process.distributed:
            dist.all_reduce(loss_value)
            loss_value /= self.world_size
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        task.after_step(step)
        self.pending.append((step, f, loss_value, {k: (v.detach() if torch.is_tensor(v) else v, n)
                                                   for k, (v, n) in stats.items()}))
        self.step += 1
        self.trained += items * self.world_size
        self.window.items += items
        self.bar.update(1)

    def due(self) -> tuple[bool, bool, bool]:
        """``(log, evaluate, save)``: what the step just taken is due for."""
        cfg, step, total = self.cfg, self.step, self.total
        log_now = bool(cfg.log_every and (step % cfg.log_every == 0 or step == total))
        eval_now = step == total or bool(self.task.eval_every and step % self.task.eval_every == 0)
        save_now = eval_now or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
            or (cfg.stop_at and step == cfg.stop_at)
        return log_now, eval_now, bool(save_now)

    def preempt_signal(self) -> int:
        """The preemption signal received (0: none), agreed by all ranks so that every rank stops at the same
        step and the checkpoint is consistent; the last step finishes the run as usual."""
        preempt = self.flag.hit
        if self.process.distributed:
            hit = torch.tensor([preempt], dtype=torch.int64, device=self.process.device)
            dist.all_reduce(hit, op=dist.ReduceOp.MAX)
            preempt = int(hit.item())
        return preempt if self.step < self.total else 0

    def flush(self) -> None:
        """Bring the pending steps' losses and metrics to the host (the only synchronisation of a window),
        stop if a loss is not finite, and add them to the window."""
        pending, window = self.pending, self.window
        if not pending:
            return
        losses = torch.stack([lv for _, _, lv, _ in pending]).tolist()
        names = sorted({k for *_, st in pending for k in st})
        values = {k: torch.stack([torch.as_tensor(st[k][0], dtype=torch.float64) for *_, st in pending if k in st])
                  .tolist() for k in names}
        for (k, f, _, _), lv in zip(pending, losses):
            if not math.isfinite(lv):
                raise TrainingDiverged(
                    f"loss became {lv} at {self.unit} {k + 1} (lr {self.base_lrs[0] * f:g}); stopped. Last good "
                    f"checkpoint: {self.last_good()}. Try {self.task.divergence_hint}.")
        counts = {k: [st[k][1] for *_, st in pending if k in st] for k in names}
        for lv in losses:
            window.loss += lv
            self.ema_loss = lv if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * lv
        for k in names:
            acc = window.stats.setdefault(k, [0.0, 0])
            for v, n in zip(values[k], counts[k]):
                acc[0] += v
                acc[1] += n
        window.steps += len(pending)
        pending.clear()
        now = time.perf_counter()
        window.train_time += now - self.t_mark
        self.train_time += now - self.t_mark
        self.t_mark = now

    def show_progress(self) -> None:
        if self.main and self.cfg.progress:
            acc = self.window.stats.get("acc")
            self.bar.set_postfix(loss=f"{self.ema_loss:.3f}",
                                 **({"acc": f"{acc[0] / max(1, acc[1]):.3f}"} if acc else {}),
                                 rate=f"{self.trained / max(self.train_time, 1e-9):.1f}/s", refresh=False)

    def log(self) -> None:
        """Write the window's train record, start a new window, and warn once if the run has collapsed."""
        task, unit = self.task, self.unit
        record = self.window.record(unit, self.step, self.base_lrs[0] * self.lr_factor, task.throughput_key,
                                    self.world_size, round(time.perf_counter() - self.t_start, 3),
                                    task.record_extras())
        self.write(record)
        self.window = _Window()
        collapsed = self.collapse.update(self.step, record["loss"])
        if collapsed is not None:
            (self.bar.write if self.main and self.cfg.progress else self.say)(
                f"warning: the training loss has stayed at {record['loss']:.4f}, the loss of a prediction "
                f"that ignores its input ({task.chance_loss:.4f}), since {unit} {collapsed[1]}, after "
                f"reaching {collapsed[0]:.4f}: the run looks collapsed and rarely recovers. Checkpoints up to "
                f"{unit} {collapsed[1] - self.cfg.log_every} predate it; try {task.divergence_hint}.")

    def evaluate(self) -> None:
        """Evaluate, write the record, and save ``best.pt`` when the score improved."""
        task, unit, step = self.task, self.unit, self.step
        self.last_eval = result = task.evaluate(self.model, self.autocast)
        self.write({"kind": task.eval_kind, unit: step, **result,
                    "time": round(time.perf_counter() - self.t_start, 3), **task.record_extras()})
        if self.main and self.cfg.progress:
            self.bar.write(f"{unit} {step}: {task.eval_message(result)}")
        if result[task.score_key] > self.best_acc:
            self.best_acc, self.best_step = result[task.score_key], step
            self.save("best")

    def write(self, record: dict) -> None:
        if self.main:
            self.run_dir.log(record)

    def save(self, which: str) -> None:
        """Write checkpoint ``which`` (``'last'``, ``'best'``) from rank 0: everything :meth:`restore` reads.
        A state with a non-finite parameter or buffer is never saved (:class:`TrainingDiverged`)."""
        task, unit, model = self.task, self.unit, self.model
        loader_state = task.loader_state()
        if self.process.distributed and loader_state is not None:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, loader_state)
            loader_state = gathered
        bad = nonfinite_tensors(list(model.named_parameters()) + list(model.named_buffers()))
        if bad:  # a loss can stay finite while weights or BN statistics overflow: never save that state
            raise TrainingDiverged(
                f"{len(bad)} parameter or buffer tensor(s) became NaN or inf by {unit} {self.step} (first {bad[0]}); "
                f"stopped without saving. Last good checkpoint: {self.last_good()}. Try {task.divergence_hint}.")
        if not self.main:
            return
        state = {"format": task.checkpoint_format, "version": CHECKPOINT_VERSION, unit: self.step,
                 task.total_key: self.total, "config": self.cfg.to_dict(), "meta": task.meta,
                 "model": model.state_dict(), "optimizer": self.opt.state_dict(), **task.state_dict(self.step)}
        if loader_state is not None:
            state["loader"] = loader_state
        state.update({"rng": rng_state(), "best_acc": self.best_acc, task.best_key: self.best_step,
                      "world_size": self.world_size, "params": self.params, "window": self.window.state_dict(),
                      "ema_loss": self.ema_loss, "collapse_watch": self.collapse.state_dict()})
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        self.run_dir.save(state, which)

    def last_good(self) -> str:
        kept_step = self.run_dir.last_step(self.unit)
        return (f"{self.run_dir.last} ({self.unit} {kept_step})" if kept_step is not None
                else "none (no checkpoint was written yet)")

    # -- after the last step ------------------------------------------------------------------------------
    def finish(self, stopped: bool, ckpt: dict | None) -> dict:
        """The run summary (evaluating a resumed run that was already complete), and the closing message."""
        task, unit, cfg, step, total = self.task, self.unit, self.cfg, self.step, self.total
        seconds = time.perf_counter() - self.t_start
        if stopped or (cfg.stop_at and step == cfg.stop_at and step < total):
            stopped = True
            self.say(f"stopped at {unit} {step} of {total} (stop_at); continue with --resume")
        if self.last_eval is None and not stopped and ckpt is not None and step >= total:
            self.last_eval = task.evaluate(self.model, self.autocast)
        train_time = self.train_time
        summary = {"run_dir": str(self.run_dir), unit: step, task.total_key: total, "params": self.params,
                   "seconds": round(seconds, 3), "train_seconds": round(train_time, 3),
                   task.throughput_key: self.trained / max(train_time, 1e-9), "best_acc": self.best_acc,
                   task.best_key: self.best_step, "stopped": stopped, **task.summary(self.last_eval)}
        if not stopped and self.last_eval is not None:
            self.say(f"done: {unit} {step}, {task.eval_message(self.last_eval)} (best {100 * self.best_acc:.2f}% at "
                     f"{unit} {self.best_step}), {summary[task.throughput_key]:.{task.rate_digits}f} {task.items}/s")
        return summary
