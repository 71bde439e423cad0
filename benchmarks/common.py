"""Shared measurement helpers for the benchmark scripts (time, saved-for-backward bytes, peak RSS)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_min(run: Callable[[], None], repeat: int = 5, warmup: int = 2) -> float:
    """Minimum wall time of ``run()`` in seconds over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps between ``forward()`` and its backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def peak_rss_mb(script: str, case: str, threads: int) -> float:
    """Peak resident-memory increase (MiB) of one forward + backward of ``case``, in a fresh process.

    ``script`` must accept ``--rss-child CASE`` and print the ``ru_maxrss`` delta in KiB.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, script, "--rss-child", case, "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / 1024


def rss_child(make_run: Callable[[], Callable[[], None]]) -> None:
    """In the child: build the case, measure one run's ``ru_maxrss`` increase (KiB), print it."""
    run = make_run()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)


def environment() -> dict:
    """Machine and library facts recorded with every result file."""
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned table; ``columns`` are ``(key, header, format)``."""
    cells = [[h for _, h, _ in columns]] + [
        [("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
