"""experiments/paper_table_gpu.py end to end on CPU in its tiny mode (real CIFAR-10 subsets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "paper_table_gpu.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_tiny_table_stops_resumes_and_reports(data_root, tmp_path):
    out = tmp_path / "paper"
    # first call: every run stops after 3 of its 6 iterations, as a call cut off by the time limit would
    first = _run([str(data_root), "--tiny", "--out", str(out), "--set", "stop_at=3"])
    assert first.returncode == 3, first.stdout + first.stderr
    assert "call again to resume" in first.stdout
    for kind in ("conv", "static-full"):
        run = out / f"{kind}-s0"
        assert (run / "checkpoints" / "last.pt").exists() and not (run / "done.json").exists()
    # second call: resumes both runs from their checkpoints, finishes them, writes the table
    second = _run([str(data_root), "--tiny", "--out", str(out)])
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("projected finish in") == 2
    for kind in ("conv", "static-full"):
        run = out / f"{kind}-s0"
        done = json.loads((run / "done.json").read_text())
        assert done["step"] == 6 and 0.0 <= done["test_acc"] <= 1.0
        assert "--resume" in (out / "logs" / f"{kind}-s0.log").read_text()
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(ln)["kind"] == "train"]
        assert steps == [2, 4, 6]
    report = (out / "report" / "report.md").read_text()
    assert "static-full-s0" in report and "conv-s0" in report and "Paired by seed" in report
    # third call: nothing left to do, the finished runs are skipped
    third = _run([str(data_root), "--tiny", "--out", str(out)])
    assert third.returncode == 0 and "2 runs (2 done)" in third.stdout


def test_bad_arguments_are_one_line(tmp_path):
    res = _run([str(tmp_path), "--kinds", "conv,bogus"])
    assert res.returncode == 2 and "unknown kind(s) bogus" in res.stderr and "Traceback" not in res.stderr
    res = _run([str(tmp_path / "missing")])
    assert res.returncode == 2 and "is not a directory" in res.stderr
