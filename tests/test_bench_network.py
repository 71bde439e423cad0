"""benchmarks/network.py end to end on a tiny configuration (eager only), in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_network_benchmark_tiny(tmp_path):
    out = tmp_path / "network.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "network.py"), "--layers", "dynamic-diagonal",
                          "--width", "2", "--train-batch", "2", "--infer-batches", "1,2", "--repeat", "1",
                          "--threads", "1", "--compile", "off", "--clock", "cpu", "--out", str(out),
                          "--variant", "half=dynamic-diagonal-light,predictor_stride=2,predictor_width=4"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["modes"] == ["eager"] and data["clock"] == "cpu"
    assert data["variants"] == {"half": "dynamic-diagonal-light,predictor_stride=2,predictor_width=4"}
    keys = {(r["phase"], r["kind"], r["mode"]) for r in data["rows"]}
    assert keys == {(p, k, "eager") for p in ("train", "infer-b1", "infer-b2")
                    for k in ("conv", "dynamic-diagonal", "half")}
    for r in data["rows"]:
        assert r["params"] > 0 and r["ms"] > 0 and r["x_conv"] > 0 and r["first_call_s"] >= 0 and r["macs"] > 0
        if r["kind"] == "conv":
            assert r["x_conv"] == 1.0 and r["macs_x_conv"] == 1.0
        else:
            assert r["macs_x_conv"] > 1.0  # the predictor's and M's multiply-adds come on top of the conv's


def test_network_benchmark_rejects_unknown_kind(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "network.py"), "--layers", "nope",
                          "--out", str(tmp_path / "n.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert "--layers: unknown layer kind 'nope'" in res.stderr
    assert not (tmp_path / "n.json").exists()


@pytest.mark.slow  # two dynamo exports: about 30-80 s on 2 shared cores
def test_onnx_runtime_benchmark_tiny(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install nsl[test])")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install nsl[test])")
    out = tmp_path / "ort.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_runtime.py"), "--layers",
                          "dynamic-diagonal", "--width", "2", "--batches", "2", "--repeat", "1", "--threads", "1",
                          "--no-reference", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["runtime"]) for r in rows} == {(k, v) for k in ("conv", "dynamic-diagonal")
                                                          for v in ("ort", "eager")}
    for r in rows:
        assert r["ms"] > 0 and r["x_conv"] > 0 and r["x_eager"] > 0
        if r["runtime"] == "ort":
            assert r["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("spec,message", [
    ("half=dynamic-diagonal,predictor_stride=3", "--variant half: predictor_stride must be 0, 1 or 2"),
    pytest.param("nokind", "--variant: expected NAME=KIND[,KEY=VALUE...], got 'nokind'", marks=pytest.mark.slow),
    pytest.param("conv=dynamic-diagonal", "--variant: the name 'conv' is taken", marks=pytest.mark.slow),
])
def test_network_benchmark_rejects_bad_variant(tmp_path, spec, message):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "network.py"), "--layers", "conv",
                          "--variant", spec, "--out", str(tmp_path / "n.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "n.json").exists()
