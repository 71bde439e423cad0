"""benchmarks/gpu_check.py in its CPU dry-run mode (Triton interpreter, tiny shapes), in a subprocess.

Checks that the one-command GPU check runs end to end before any GPU is there: the test step
(tests/test_cuda.py, skipped without CUDA), every benchmark row, the target checks and the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (CI installs triton==3.8.0)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_gpu_check_cpu_interpret(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-interpret",
                          "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-interpret"
    assert data["tests"]["ok"] and data["tests"]["counts"].get("skipped", 0) >= 1
    impls = {(r["dtype"], r["impl"]) for r in data["rows"]}
    for dtype in ("float32", "bfloat16"):
        for impl in ("conv", "triton-diag", "triton-full", "triton-diag-separate", "unfold-diag"):
            assert (dtype, impl) in impls
    for r in data["rows"]:
        assert r["ms"] > 0 and r["x_conv"] > 0
    assert [c["shape"] for c in data["checks"]] == list(data["shapes"])
    assert all(isinstance(c["time_ok"], bool) for c in data["checks"])
    if "deform_conv2d" not in data["skipped"]:
        assert ("float32", "deform_conv2d") in impls
    assert "targets (bfloat16, triton-diag)" in res.stdout
