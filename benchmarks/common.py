"""Shared measurement helpers for the benchmark scripts (time, saved-for-backward bytes, peak RSS)."""

from __future__ import annotations

import gc
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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_option(parser) -> None:
    """``--clock wall|cpu`` (default wall): the clock that :func:`time_cases` reads, through :data:`CLOCKS`."""
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (all threads; on a loaded machine it leaves out "
                             "the time spent waiting for a core)")


def time_cases(runs: dict[str, Callable[[], None]], repeat: int = 5, warmup: int = 2,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Min over ``repeat`` rounds of each run's time (s) by ``clock`` (default: wall time), after ``warmup``
    calls of each.

    The rounds interleave the runs, so a burst of load from elsewhere slows all of them alike and
    no case pays for being measured first. ``clock=time.process_time`` counts the process's CPU time (all
    threads), which leaves out the time it waits for a core on a loaded machine.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = clock()
            run()
            best[name] = min(best[name], clock() - t0)
    return best


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct CPU storages autograd saves for backward while ``fn()`` runs.

    ``fn`` is a forward (or a forward + backward: packing happens in the forward only).
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_child(run: Callable[[], None]) -> None:
    """In a fresh process: print the peak-RSS increase (bytes) of one call of ``run``.

    A first call warms up (thread pools, JIT code, extension loading are not counted). On Linux
    the high-water mark is reset (``/proc/self/clear_refs``) and the result is ``VmHWM`` minus the
    resident size before the call; elsewhere the ``ru_maxrss`` increase (which can under-report).
    """
    run()
    gc.collect()
    before = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        reset = True
    except OSError:
        reset = False
    if before is not None and reset:
        run()
        print((_proc_status_kib("VmHWM") - before) * 1024)
        return
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * (1 if sys.platform == "darwin" else 1024))


def rss_delta(args: list[str]) -> int | None:
    """Run ``python args...`` (a script in its ``rss_child`` mode) and return the bytes it prints.

    The child runs with a fixed glibc mmap threshold so that freed large blocks go back to the OS
    instead of being reused unseen.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, env=env)
    try:
        return int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


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


def layer_kinds_with_conv(parser, text: str) -> list[str]:
    """``--layers`` (comma-separated layer kinds) as a list starting with the ``conv`` baseline; an unknown
    kind is a one-line ``parser.error``."""
    from nsl.layers import LAYER_KINDS

    kinds = ["conv"] + [k for k in text.split(",") if k and k != "conv"]
    for k in kinds:
        if k not in LAYER_KINDS:
            parser.error(f"--layers: unknown layer kind {k!r}; expected some of {', '.join(LAYER_KINDS)}")
    return kinds
