"""The one training loop, :func:`fit`, and the :class:`Task` interface it trains.

A task (:class:`~nsl.train.classification.ClassificationTask`, :class:`~nsl.fewshot.train.FewShotTask`)
supplies the data (batches or episodes), the model, the optimizer and its lr schedule, the loss and
its training metrics, and its evaluation. :func:`fit` owns the rest: the run directory
(:class:`~nsl.train.run.RunDir`), seeding, device, DDP, AMP, ``torch.compile``, the steps, the lr
schedule's application, gradient clipping, the divergence stop, the progress bar, metrics records,
the evaluation cadence, best/last atomic checkpoints and bit-exact resume.

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
    ``checkpoints/last.pt`` was written; ``--resume`` continues bit-exactly. The CLI exits :data:`EXIT_PREEMPTED`."""


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

CHECKPOINT_VERSION = 1


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

    def load_checkpoint(self, path: Path) -> dict:
        """Read (format-checked) the checkpoint at ``path``."""
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
        return _fit(task, cfg, resume, echo, run, process, flag)
    finally:
        flag.restore()
        run.close()
        if own_group:
            dist.destroy_process_group()


def _fit(task: Task, cfg, resume: bool, echo, run: RunDir, process: Process, flag: _SignalFlag) -> dict:
    main, world_size = process.main, process.world_size
    say = echo if main else (lambda *a, **k: None)
    unit = task.unit

    ckpt = run.open(cfg, resume, task.structural, load=task.load_checkpoint, lock=main)
    if ckpt is not None and ckpt.get("world_size", 1) != world_size:
        raise ConfigError(f"the run was saved with {ckpt.get('world_size', 1)} processes; resume with the same "
                          f"number (now {world_size})")
    if resume and ckpt is None:
        say(f"nothing to resume in {run} (no checkpoint was written yet); starting fresh")
    task.setup(process, ckpt)
    total = task.total
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = task.build_model()
    params = sum(p.numel() for p in model.parameters())
    opt = task.optimizer(model)
    task.attach(model, opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    autocast, scaler = autocast_and_scaler(cfg.amp, process.device)
    step, best_acc, best_step = 0, -1.0, -1
    if ckpt is not None:
        load_model_state(model, ckpt["model"], run.last)
        opt.load_state_dict(ckpt["optimizer"])
        if "loader" in ckpt:
            states = ckpt["loader"]
            task.load_loader_state(states[process.rank] if isinstance(states, list) else states)
        set_rng_state(ckpt["rng"])
        task.load_state_dict(ckpt)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step, best_acc, best_step = int(ckpt[unit]), float(ckpt["best_acc"]), int(ckpt[task.best_key])
        if step >= total:
            say(f"the run in {run} is already complete ({step} of {total} {unit}s)")
    net = model
    if process.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
    if cfg.compile != "none":  # the uncompiled ``model`` is what checkpoints save and evaluations run
        net = torch.compile(net, backend=cfg.compile_backend, mode=None if cfg.compile == "default" else cfg.compile)
    if main:
        run.start(cfg, ckpt, step, unit)

    def last_good() -> str:
        kept_step = run.last_step(unit)
        return f"{run.last} ({unit} {kept_step})" if kept_step is not None else "none (no checkpoint was written yet)"

    def save(which: str) -> None:
        loader_state = task.loader_state()
        if process.distributed and loader_state is not None:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, loader_state)
            loader_state = gathered
        bad = nonfinite_tensors(list(model.named_parameters()) + list(model.named_buffers()))
        if bad:  # a loss can stay finite while weights or BN statistics overflow: never save that state
            raise TrainingDiverged(
                f"{len(bad)} parameter or buffer tensor(s) became NaN or inf by {unit} {step} (first {bad[0]}); "
                f"stopped without saving. Last good checkpoint: {last_good()}. Try {task.divergence_hint}.")
        if not main:
            return
        state = {"format": task.checkpoint_format, "version": CHECKPOINT_VERSION, unit: step, task.total_key: total,
                 "config": cfg.to_dict(), "meta": task.meta, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), **task.state_dict(step)}
        if loader_state is not None:
            state["loader"] = loader_state
        state.update({"rng": rng_state(), "best_acc": best_acc, task.best_key: best_step, "world_size": world_size,
                      "params": params, "window": window.state_dict(), "ema_loss": ema_loss,
                      "collapse_watch": collapse.state_dict()})
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        run.save(state, which)

    def log(record: dict) -> None:
        if main:
            run.log(record)

    say(f"run {run}: {task.describe(params)}, device {process.device}"
        + (f", resuming at {unit} {step}" if ckpt else ""))
    from tqdm import tqdm

    bar = tqdm(total=total, initial=min(step, total), disable=not (cfg.progress and main), unit=task.bar_unit,
               dynamic_ncols=True, desc=task.name)
    stream = task.batches(step)
    net.train()
    window = _Window()
    ema_loss = None
    if ckpt is not None and "window" in ckpt:  # the logging window the checkpoint was taken in
        window.load_state_dict(ckpt["window"])
        ema_loss = ckpt.get("ema_loss")
    collapse = _CollapseWatch(task.chance_loss)
    if ckpt is not None and "collapse_watch" in ckpt:
        collapse.load_state_dict(ckpt["collapse_watch"])
    pending: list[tuple[int, float, torch.Tensor, dict]] = []  # steps not yet synchronised with the host
    t_start, train_time, trained, last_eval = time.perf_counter(), 0.0, 0, None
    t_mark = t_start  # start of the training time not yet counted
    stopped = False

    def flush() -> None:
        """Bring the pending steps' losses and metrics to the host (the only synchronisation of a window),
        stop if a loss is not finite, and add them to the window."""
        nonlocal ema_loss, train_time, t_mark
        if not pending:
            return
        losses = torch.stack([lv for _, _, lv, _ in pending]).tolist()
        names = sorted({k for *_, st in pending for k in st})
        values = {k: torch.stack([torch.as_tensor(st[k][0], dtype=torch.float64) for *_, st in pending if k in st])
                  .tolist() for k in names}
        for (k, f, _, _), lv in zip(pending, losses):
            if not math.isfinite(lv):
                raise TrainingDiverged(
                    f"loss became {lv} at {unit} {k + 1} (lr {base_lrs[0] * f:g}); stopped. Last good checkpoint: "
                    f"{last_good()}. Try {task.divergence_hint}.")
        counts = {k: [st[k][1] for *_, st in pending if k in st] for k in names}
        for lv in losses:
            window.loss += lv
            ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
        for k in names:
            acc = window.stats.setdefault(k, [0.0, 0])
            for v, n in zip(values[k], counts[k]):
                acc[0] += v
                acc[1] += n
        window.steps += len(pending)
        pending.clear()
        now = time.perf_counter()
        window.train_time += now - t_mark
        train_time += now - t_mark
        t_mark = now

    try:
        while step < total:
            if cfg.stop_at and step >= cfg.stop_at:
                stopped = True
                break
            batch = next(stream)
            task.before_step(step)
            f = task.lr_factor(step)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            loss, stats, items = task.loss(net, batch, autocast)
            loss_value = loss.detach().clone()
            if process.distributed:
                dist.all_reduce(loss_value)
                loss_value /= world_size
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            task.after_step(step)
            pending.append((step, f, loss_value, {k: (v.detach() if torch.is_tensor(v) else v, n)
                                                  for k, (v, n) in stats.items()}))
            step += 1
            trained += items * world_size
            window.items += items
            bar.update(1)
            log_now = bool(cfg.log_every and (step % cfg.log_every == 0 or step == total))
            eval_now = step == total or bool(task.eval_every and step % task.eval_every == 0)
            save_now = eval_now or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
                or (cfg.stop_at and step == cfg.stop_at)
            preempt = flag.hit
            if process.distributed:  # every rank stops at the same step, so the checkpoint is consistent
                hit = torch.tensor([preempt], dtype=torch.int64, device=process.device)
                dist.all_reduce(hit, op=dist.ReduceOp.MAX)
                preempt = int(hit.item())
            preempt = preempt if step < total else 0  # the last step finishes the run as usual
            if not (log_now or save_now or preempt):
                continue
            flush()  # the divergence check comes before any record or checkpoint of this step
            if main and cfg.progress:
                acc = window.stats.get("acc")
                bar.set_postfix(loss=f"{ema_loss:.3f}", **({"acc": f"{acc[0] / max(1, acc[1]):.3f}"} if acc else {}),
                                rate=f"{trained / max(train_time, 1e-9):.1f}/s", refresh=False)
            if log_now:
                record = window.record(unit, step, base_lrs[0] * f, task.throughput_key, world_size,
                                       round(time.perf_counter() - t_start, 3), task.record_extras())
                log(record)
                window = _Window()
                collapsed = collapse.update(step, record["loss"])
                if collapsed is not None:
                    (bar.write if main and cfg.progress else say)(
                        f"warning: the training loss has stayed at {record['loss']:.4f}, the loss of a prediction "
                        f"that ignores its input ({task.chance_loss:.4f}), since {unit} {collapsed[1]}, after "
                        f"reaching {collapsed[0]:.4f}: the run looks collapsed and rarely recovers. Checkpoints up to "
                        f"{unit} {collapsed[1] - cfg.log_every} predate it; try {task.divergence_hint}.")
            if eval_now:
                last_eval = task.evaluate(model, autocast)
                log({"kind": task.eval_kind, unit: step, **last_eval, "time": round(time.perf_counter() - t_start, 3),
                     **task.record_extras()})
                if main and cfg.progress:
                    bar.write(f"{unit} {step}: {task.eval_message(last_eval)}")
                if last_eval[task.score_key] > best_acc:
                    best_acc, best_step = last_eval[task.score_key], step
                    save("best")
            if save_now or preempt:
                save("last")
            if preempt:
                if process.distributed:  # no rank exits (torchrun then stops the others) before last.pt is written
                    dist.barrier()
                raise Preempted(f"stopped by {signal.Signals(preempt).name} at {unit} {step} of {total}; checkpoint "
                                f"{run.last} written; continue with --resume")
            t_mark = time.perf_counter()  # evaluations and checkpoint writes are not training time
        flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    if stopped or (cfg.stop_at and step == cfg.stop_at and step < total):
        stopped = True
        say(f"stopped at {unit} {step} of {total} (stop_at); continue with --resume")
    if last_eval is None and not stopped and ckpt is not None and step >= total:
        last_eval = task.evaluate(model, autocast)
    summary = {"run_dir": str(run), unit: step, task.total_key: total, "params": params, "seconds": round(seconds, 3),
               "train_seconds": round(train_time, 3), task.throughput_key: trained / max(train_time, 1e-9),
               "best_acc": best_acc, task.best_key: best_step, "stopped": stopped, **task.summary(last_eval)}
    if not stopped and last_eval is not None:
        say(f"done: {unit} {step}, {task.eval_message(last_eval)} (best {100 * best_acc:.2f}% at {unit} {best_step}), "
            f"{summary[task.throughput_key]:.{task.rate_digits}f} {task.items}/s")
    return summary
