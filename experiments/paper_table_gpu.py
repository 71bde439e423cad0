#!/usr/bin/env python
"""The paper's CIFAR-10 recognition table in one GPU call (issue 12, part 1).

Runs the authors' protocol (``--protocol paper``: CNN-9 at full width, SGD lr 0.1, batch 128, 42,500
iterations, lr x 0.1 at 20k / 30k / 37.5k, L2 5e-4, label smoothing 0.01, the authors' BN statistics)
for every layer kind of the table, two seeds each, then writes the table with
``nsl report RUNS --baseline layer=conv`` (per-seed paired differences, parameters, MACs, wall time).

    python experiments/paper_table_gpu.py DATA [--out runs/paper-gpu] [--jobs 14] [--max-minutes 10]

``DATA`` holds CIFAR-10 in a standard layout (``cifar-10-batches-py/`` or ``-bin/``). A small CNN on a big
GPU is bound by kernel launches, so the variants run concurrently on the one GPU as separate processes
(``--jobs``; one CPU thread each), with the data resident on the device (the engine's ``GPULoader``),
bfloat16 autocast and ``torch.compile`` (``--compile``, default ``reduce-overhead``: CUDA graphs) where the
installed ``nsl`` supports them. After a run's first few hundred iterations the script prints its
images/s and a projected finish time, and every ``--poll`` seconds a status table.

Every run resumes where it stopped: a run with ``checkpoints/last.pt`` continues with ``nsl train
--resume``, a finished run (``done.json``) is skipped, so a call cut off by ``--max-minutes`` (or killed)
is finished by a second call. Departures from the authors' code, as recorded in each run's
``config.json``: the ones passed with ``--set`` (none by default), ``amp`` and ``compile``.

``--tiny`` is the CPU smoke mode used by the tests: two kinds, one seed, a few iterations on a subset,
width 8, no autocast or compile. Nothing here has run on a GPU yet: no projected GPU time exists until it
has (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("conv", "static-diagonal", "static-full", "dynamic-diagonal", "dynamic-full",
         "dynamic-diagonal-cosine", "dynamic-filter")
TINY = dict(kinds=("conv", "static-full"), seeds=(0,), iters=6, subset=256, test_subset=200, width=8)


@dataclass
class Run:
    """One (layer kind, seed) run of the table and its process."""

    kind: str
    seed: int
    dir: Path
    proc: subprocess.Popen | None = None
    log: object = None
    started: float = 0.0
    announced: bool = False
    status: str = "pending"

    @property
    def name(self) -> str:
        return f"{self.kind}-s{self.seed}"

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()


def _records(run_dir: Path) -> list[dict]:
    """The parseable records of ``run_dir/metrics.jsonl`` (a torn last line is ignored)."""
    path = run_dir / "metrics.jsonl"
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def progress(run: Run) -> dict:
    """Step, iterations, images/s of the last logged window and projected seconds to finish.

    The projection is ``(iters - step) * batch_size / images_per_s`` from the newest train record of
    ``metrics.jsonl`` (the engine's training throughput, evaluations excluded)."""
    train = [r for r in _records(run.dir) if r.get("kind") == "train"]
    try:
        cfg = json.loads((run.dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        cfg = {}
    iters, batch = cfg.get("iters"), cfg.get("batch_size")
    info = {"step": train[-1]["step"] if train else 0, "iters": iters, "images_per_s": None, "eta_s": None}
    if train and train[-1].get("images_per_s"):
        info["images_per_s"] = ips = train[-1]["images_per_s"]
        if iters and batch:
            info["eta_s"] = max(0, iters - info["step"]) * batch / ips
    return info


def announce(run: Run, now: float) -> None:
    """Print ``run``'s throughput and projected finish once (after ``--announce-after`` iterations)."""
    p = progress(run)
    if run.announced or p["eta_s"] is None:
        return
    run.announced = True
    at = time.strftime("%H:%M:%S", time.localtime(now + p["eta_s"]))
    print(f"{run.name}: {p['images_per_s']:.0f} images/s at step {p['step']} of {p['iters']}; projected finish in "
          f"{_fmt_s(p['eta_s'])} (at {at})", flush=True)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train_command(run: Run, args: argparse.Namespace) -> list[str]:
    """The ``nsl train`` command line of ``run``: a resume when it has a checkpoint, else a new run."""
    base = [sys.executable, "-m", "nsl.cli", "train", "--out", str(run.dir), "--no-progress"]
    if (run.dir / "checkpoints" / "last.pt").exists():
        return base + ["--resume"]
    cmd = base + ["--dataset", "cifar10", "--data-dir", str(args.data), "--model", "cnn9", "--layer", run.kind,
                  "--protocol", "paper", "--seed", str(run.seed), "--device", args.device]
    sets = list(args.set or [])
    if args.amp != "none":
        cmd += ["--amp", args.amp]
    if args.compile != "none":
        sets.append(f"compile={args.compile}")
    if args.iters:
        cmd += ["--iters", str(args.iters)]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    if args.test_subset:
        cmd += ["--test-subset", str(args.test_subset)]
    if args.width:
        sets.append(f"width={args.width}")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def start(run: Run, args: argparse.Namespace, logs: Path) -> None:
    cmd = train_command(run, args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run.log = open(logs / f"{run.name}.log", "a")  # noqa: SIM115 - closed in finish()
    run.log.write(f"$ {' '.join(cmd)}\n")
    run.log.flush()
    run.proc = subprocess.Popen(cmd, stdout=run.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run.started = time.time()
    run.status = "resumed" if "--resume" in cmd else "running"


def finish(run: Run, logs: Path) -> None:
    """Record the exit of ``run``'s process: ``done.json`` on success, the last log line on failure."""
    code = run.proc.returncode
    run.log.close()
    run.proc = None
    if code == 0:
        announce(run, time.time())
        evals = [r for r in _records(run.dir) if r.get("kind") == "eval"]
        iters = progress(run)["iters"]
        if not evals or iters is None or evals[-1]["step"] != iters:  # stopped early (stop_at): resume later
            run.status = "stopped"
            return
        summary = {"kind": run.kind, "seed": run.seed, "step": evals[-1]["step"], "test_acc": evals[-1]["test_acc"]}
        tmp = run.dir / ".done.json.tmp"
        tmp.write_text(json.dumps(summary) + "\n")
        os.replace(tmp, run.dir / "done.json")
        run.status = "done"
        return
    tail = (logs / f"{run.name}.log").read_text().strip().splitlines()[-1:] or [""]
    run.status = f"failed (exit {code}): {tail[0][:160]}"


def stop_all(runs: list[Run]) -> None:
    """SIGINT every live run (the engine saves nothing on SIGINT: the last periodic checkpoint is kept)."""
    for r in runs:
        if r.proc is not None and r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGINT)
    deadline = time.time() + 30
    for r in runs:
        if r.proc is not None:
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()


def status_table(runs: list[Run]) -> str:
    lines = [f"{'run':<28} {'status':<10} {'step':>13} {'images/s':>9} {'finish in':>9}"]
    for r in runs:
        p = progress(r)
        step = f"{p['step']}/{p['iters'] or '?'}"
        ips = "-" if p["images_per_s"] is None else f"{p['images_per_s']:.0f}"
        lines.append(f"{r.name:<28} {r.status.split(' ')[0]:<10} {step:>13} {ips:>9} "
                     f"{_fmt_s(p['eta_s'] if r.proc else None):>9}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="folder holding CIFAR-10 (cifar-10-batches-py/ or cifar-10-batches-bin/)")
    p.add_argument("--out", type=Path, default=Path("runs/paper-gpu"), help="parent of the run folders")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="comma-separated layer kinds of nsl.layers.LAYER_KINDS (default: the table's 7)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--jobs", type=int, default=0, help="runs at a time (default: all of them at once)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16", "auto"])
    p.add_argument("--compile", default="reduce-overhead",
                   help="torch.compile mode of each model: none, default, reduce-overhead (CUDA graphs), max-autotune")
    p.add_argument("--iters", type=int, default=0, help="override the protocol's 42,500 iterations (0: keep)")
    p.add_argument("--subset", type=int, default=0, help="train on N images (0: all 50,000)")
    p.add_argument("--test-subset", dest="test_subset", type=int, default=0, help="test on N images (0: all)")
    p.add_argument("--width", type=int, default=0, help="CNN-9 first-stage width (0: the authors' 32)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for new runs")
    p.add_argument("--max-minutes", type=float, default=0, help="stop the runs after this long (resume later)")
    p.add_argument("--poll", type=float, default=30, help="seconds between status tables")
    p.add_argument("--announce-after", type=int, default=300,
                   help="print a run's images/s and projected finish once it passed this many iterations")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: 2 kinds, 1 seed, 6 iterations, subsets")
    args = p.parse_args(argv)
    if args.tiny:
        args.kinds, args.seeds = ",".join(TINY["kinds"]), ",".join(map(str, TINY["seeds"]))
        args.iters, args.subset, args.test_subset, args.width = TINY["iters"], TINY["subset"], TINY["test_subset"], \
            TINY["width"]
        args.device, args.amp, args.compile, args.poll, args.announce_after = "cpu", "none", "none", 5, 2
        args.set = ["log_every=2", *(args.set or [])]
    for name in ("jobs", "threads", "iters", "subset", "test_subset", "width"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    args.kinds = [k for k in args.kinds.split(",") if k]
    from nsl.layers import LAYER_KINDS

    bad = [k for k in args.kinds if k not in LAYER_KINDS]
    if bad:
        p.error(f"--kinds: unknown kind(s) {', '.join(bad)}; valid: {', '.join(LAYER_KINDS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.data.is_dir():
        p.error(f"data folder {args.data} is not a directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    runs = [Run(k, s, args.out / f"{k}-s{s}") for k in args.kinds for s in args.seeds]
    for r in runs:
        if r.done:
            r.status = "done"
    todo = [r for r in runs if not r.done]
    jobs = args.jobs or len(todo) or 1
    t0 = time.time()
    last_table = 0.0
    print(f"paper table: {len(runs)} runs ({len(runs) - len(todo)} done), {min(jobs, len(todo))} at a time, "
          f"device {args.device}, amp {args.amp}, compile {args.compile}; logs in {logs}", flush=True)
    try:
        while True:
            live = [r for r in runs if r.proc is not None]
            for r in live:
                if r.proc.poll() is not None:
                    finish(r, logs)
                    print(f"{r.name}: {r.status}", flush=True)
            pending = [r for r in todo if r.proc is None and r.status in ("pending",)]
            live = [r for r in runs if r.proc is not None]
            for r in pending[: max(0, jobs - len(live))]:
                start(r, args, logs)
            live = [r for r in runs if r.proc is not None]
            now = time.time()
            for r in live:
                if not r.announced and progress(r)["step"] >= args.announce_after:
                    announce(r, now)
            if not live and not [r for r in todo if r.status == "pending"]:
                break
            if args.max_minutes and now - t0 > 60 * args.max_minutes:
                print(f"--max-minutes {args.max_minutes:g} reached: stopping the runs; call again to resume",
                      flush=True)
                stop_all(runs)
                for r in runs:
                    if r.proc is not None:
                        finish(r, logs)
                print(status_table(runs), flush=True)
                return 3
            if now - last_table >= args.poll:
                print(status_table(runs), flush=True)
                last_table = now
            time.sleep(min(1.0, args.poll))
    except KeyboardInterrupt:
        stop_all(runs)
        print("interrupted; call again to resume", file=sys.stderr)
        return 130
    stopped = [r for r in runs if r.status == "stopped"]
    if stopped:
        print(f"{len(stopped)} run(s) stopped before their last iteration (stop_at); call again to resume them",
              flush=True)
        return 3
    failed = [r for r in runs if r.status.startswith("failed")]
    for r in failed:
        print(f"{r.name}: {r.status} (log: {logs / (r.name + '.log')})", file=sys.stderr)
    print(f"all runs finished in {_fmt_s(time.time() - t0)} ({len(failed)} failed)", flush=True)
    done = [str(r.dir) for r in runs if r.done]
    if not done:
        return 1
    report = subprocess.run([sys.executable, "-m", "nsl.cli", "report", *done, "--baseline", "layer=conv",
                             "--out", str(args.out / "report")])
    if report.returncode == 0:
        print(f"table: {args.out / 'report' / 'report.md'}")
    return 1 if failed or report.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
