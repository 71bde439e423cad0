"""benchmarks/profile_step.py and benchmarks/kernel_phases.py end to end on tiny configurations, in subprocesses:
the structure of their tables and JSON (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["convs_norms", "predictor_fwd", "predictor_bwd", "modconv_fwd", "modconv_bwd", "rest"]


def test_profile_step_tiny(tmp_path):
    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--layers",
                          "dynamic-full", "--width", "2", "--batch", "2", "--size", "8", "--repeat",
                          "1", "--threads", "1", "--out", str(out), "--variant",
                          "shared=dynamic-diagonal-light,share_prediction=true,predictor_width=4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["parts"] == PARTS
    assert data["variants"] == {"shared": "dynamic-diagonal-light,share_prediction=true,predictor_width=4"}
    rows = {r["kind"]: r for r in data["rows"]}
    assert list(rows) == ["conv", "dynamic-full", "shared"]
    for kind, r in rows.items():
        assert abs(sum(r[p] for p in PARTS) - r["total"]) < 1e-6 * max(1.0, r["total"]), kind  # parts add up
        assert r["total"] > 0 and r["convs_norms"] > 0, kind  # every CNN-9 has its stem conv and batch norms
        for p in PARTS:
            assert r[f"{p}_x_conv"] == r[p] / rows["conv"]["total"], (kind, p)
    conv = rows["conv"]
    assert conv["x_conv"] == 1.0
    assert all(conv[p] == 0 for p in ("predictor_fwd", "predictor_bwd", "modconv_fwd", "modconv_bwd"))
    for kind in ("dynamic-full", "shared"):  # a predictor and the modulated conv, both ways
        assert all(rows[kind][p] > 0 for p in ("predictor_fwd", "predictor_bwd", "modconv_fwd", "modconv_bwd")), kind
    # the markdown table: a header, a rule and one line per kind, printed and stored
    lines = data["markdown"].splitlines()
    assert lines[0].startswith("| kind | step ms | x conv |") and lines[1].startswith("|---|")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == list(rows)
    assert data["markdown"] in res.stdout


@pytest.mark.slow  # compiles the kernel once more with -DNSL_PROFILE (one ISA): about a minute on 2 cores
def test_kernel_phases_tiny(tmp_path):
    pytest.importorskip("ninja", reason="ninja builds the profiling kernel")
    out = tmp_path / "phases.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_phases.py"), "--shapes", "2x3x4x6",
                          "--repeat", "1", "--build-dir", str(tmp_path / "build"), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["layout"]) for r in rows] == [("2x3x4x6", "diag"), ("2x3x4x6", "full")]
    for r in rows:
        assert set(r["ms"]) == {"conv.fwd", "conv.fwd+bwd", "op.fwd", "op.bwd"}
        phases = set(r["phases_ms"])
        assert {"fwd.build", "fwd.gemm", "bwd.gemm_H", "bwd.gemm_dW"} <= phases  # every call reached them
        assert ("fwd.mix" in phases) == (r["layout"] == "full") and ("bwd.dM" in phases) == (r["layout"] == "full")


def test_kernel_phases_rejects_a_bad_shape(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_phases.py"), "--shapes", "2x3x4",
                          "--out", str(tmp_path / "p.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "--shapes: unknown shape '2x3x4'" in res.stderr
    assert not (tmp_path / "p.json").exists()
