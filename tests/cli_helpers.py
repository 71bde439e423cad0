"""Helpers shared by the command-line tests: run ``nsl`` in-process, read a run's metrics, run ``nsl`` (or
``torchrun ... nsl``) in a real subprocess and stop it with a real signal once it is training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from nsl.cli import main

#: ``torchrun`` with 2 CPU (gloo) ranks running ``nsl``; append the command's arguments
TORCHRUN_NSL = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "nsl.cli"]


def run(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``nsl ARGV``, run in this process."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def records(run_dir, kind):
    """The ``metrics.jsonl`` records of ``run_dir`` whose ``kind`` is ``kind`` (``train``, ``eval``)."""
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def subprocess_env() -> dict:
    """The environment of the subprocess tests: one OpenMP thread, so every part of an interrupted and an
    uninterrupted run makes the same float reductions."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rank_pids(agent_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes of the ``torchrun`` agent ``agent_pid`` (Linux ``/proc``: its
    children, ranked by the ``RANK`` in their environment)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):  # not a process, or it ended meanwhile
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(entry.name)
    return ranks


def signal_when_training(cmd: list[str], run_dir: Path, sig: int, targets=lambda proc: [proc.pid],
                         after: int = 2, timeout: float = 240) -> tuple[int, str, str]:
    """Start ``cmd``, wait until ``run_dir/metrics.jsonl`` holds ``after`` lines (training has started), send
    the real signal ``sig`` to the pids ``targets(proc)`` (default: the process itself) and return
    ``(exit code, stdout, stderr)`` once it has ended. Fails, showing its stderr, when the process ends first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= after:
                break
            time.sleep(0.01)
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{cmd} ended or timed out before training began (exit {proc.returncode}):\n{err}")
        for pid in targets(proc):
            os.kill(pid, sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def run_to_end(cmd: list[str], timeout: float = 300) -> None:
    """Run ``cmd`` (a subprocess, :func:`subprocess_env`) and assert that it succeeds, showing its stderr."""
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    # under torchrun the ranks' own errors come first in stderr, torchrun's summary last: show both
    assert res.returncode == 0, res.stderr[:3000] + "\n...\n" + res.stderr[-1500:]


def assert_same_training(a: Path, b: Path, load, unit: str, throughput_key: str) -> None:
    """The runs in ``a`` and ``b`` ended at the same ``unit`` with bitwise equal weights and the same train
    records (times and throughputs aside); ``load`` reads a checkpoint."""
    ca, cb = (load(p / "checkpoints" / "last.pt") for p in (a, b))
    assert ca[unit] == cb[unit]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    drop = ("time", throughput_key)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in records(a, "train")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in records(b, "train")]
