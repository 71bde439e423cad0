"""`nsl demo` end to end on scikit-learn's digits (short: 1 epoch, 2 seeds)."""

from __future__ import annotations

import json

import nsl
from nsl.cli import main
from nsl.demo import VARIANTS, DemoConfig, run_demo


def test_demo_cli_prints_every_variant_and_keeps_runs(tmp_path, capsys):
    with nsl.functional.use_backend("unfold"):  # no C++ compile wait
        code = main(["demo", "--epochs", "1", "--seeds", "2", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    for kind in VARIANTS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(kind + " "))
        assert "% +- " in line and "s/run" in line and line.count(", ") >= 1
        for seed in (0, 1):  # every demo run is an ordinary `nsl train` run directory
            cfg = json.loads((tmp_path / f"{kind}-s{seed}" / "config.json").read_text())
            assert cfg["protocol"] == "demo" and cfg["layer"] == kind and cfg["seed"] == seed
    assert "static full M = I" in out and "NSConv2d layers left: 0;  max |folded - static| = 0.0e+00" in out


def test_demo_results_are_consistent(tmp_path):
    lines = []
    with nsl.functional.use_backend("unfold"):
        res = run_demo(DemoConfig(epochs=1, seeds=2, progress=False, out=str(tmp_path)), echo=lines.append)
    for kind in VARIANTS:
        r = res[kind]
        assert len(r["accuracies"]) == 2 and abs(r["mean"] - sum(r["accuracies"]) / 2) < 1e-12
        assert all(0.0 <= a <= 1.0 for a in r["accuracies"]) and r["ci95"] >= 0
    assert res["dynamic-diagonal"]["params"] > res["static-full"]["params"] > res["conv"]["params"]
    assert all(d < 1e-4 for d in res["convert"].values())  # convert keeps the function
    assert res["fold"]["max_abs_diff"] == 0.0 and res["fold"]["nsconv_left"] == 0
    assert res["fold"]["accuracy_static"] == res["fold"]["accuracy_folded"]
    # the runs are reused (resumed as complete) when the demo is run again into the same folder
    with nsl.functional.use_backend("unfold"):
        again = run_demo(DemoConfig(epochs=1, seeds=2, progress=False, out=str(tmp_path)), echo=lambda *a: None)
    assert again["conv"]["accuracies"] == res["conv"]["accuracies"]
