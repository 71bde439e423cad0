"""Run-directory rules (nsl.train.rundir): one writer, crash-safe lock, no half-written files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from nsl.train.config import ConfigError
from nsl.train.rundir import RunDirBusy, RunLock, atomic_write_text, clean_stale_temps, ensure_dir, read_jsonl

HOLDER = """
import sys, time
from nsl.train.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_between_processes_and_names_the_owner(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(RunDirBusy, match=rf"run directory .*run is in use by another process \(pid {proc.pid} on "):
            RunLock(run).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_released_by_a_crash_and_on_exit(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup code runs
    proc.wait()
    with RunLock(run) as lock:  # not stale: the OS dropped the dead process's lock
        assert lock.held
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == os.getpid()
    # released on leaving the block: another process can take it
    take = f"from nsl.train.rundir import RunLock; RunLock({str(run)!r}).acquire()"
    code = subprocess.run([sys.executable, "-c", take], timeout=60).returncode
    assert code == 0


def test_out_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^out .*file is a file, expected a folder"):
        ensure_dir(f)
    with pytest.raises(ConfigError, match=r"^cannot create out .*file/sub: a part of the path"):
        ensure_dir(f / "sub")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable|permission denied"):
            ensure_dir(ro / "run")


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.tmp12345", tmp_path / ".config.json.tmp999"]
    for p in stale:
        p.write_bytes(b"")
    keep = [tmp_path / "checkpoints" / "last.pt", tmp_path / "metrics.jsonl"]
    for p in keep:
        p.write_text("x")
    assert sorted(clean_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_atomic_write_keeps_the_old_content_on_error(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(ConfigError, match="cannot write .*config.json"):
        atomic_write_text(tmp_path / "missing" / "config.json", "new\n")
    assert target.read_text() == "old\n"
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == ([{"step": 1}, {"step": 2}], True)
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert read_jsonl(path) == ([{"step": 1}, {"step": 2}], False)
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2: not a JSON record"):
        read_jsonl(path)
    assert read_jsonl(tmp_path / "absent.jsonl") == ([], False)
