"""`nsl demo` end to end on scikit-learn's digits (short: 1 epoch)."""

from __future__ import annotations

import json

import pytest

from nsl.cli import main
from nsl.demo import FULL, VARIANTS, DemoConfig, run_demo

pytestmark = pytest.mark.usefixtures("unfold_backend")  # no C++ compile wait


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_demo_cli_prints_every_variant_and_keeps_runs(tmp_path, capsys):
    code = main(["demo", "--epochs", "1", "--seeds", "2", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    for kind in VARIANTS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(kind + " "))
        assert "% +- " in line and "s/run" in line and line.count(", ") >= 1
        for seed in (0, 1):  # every demo run is an ordinary `nsl train` run directory
            cfg = json.loads((tmp_path / f"{kind}-s{seed}" / "config.json").read_text())
            assert cfg["protocol"] == "demo" and cfg["layer"] == kind and cfg["seed"] == seed and cfg["epochs"] == 1
    assert "static full M = I" in out and "NSConv2d layers left: 0;  max |folded - static| = 0.0e+00" in out
    assert "nsl demo --full" in out  # the full comparison is one flag away


def test_demo_default_is_one_seed_with_results_as_they_come(tmp_path):
    assert (DemoConfig().seeds, DemoConfig().epochs) == (1, 3) and FULL == {"epochs": 12, "seeds": 3}
    lines = []
    res = run_demo(DemoConfig(epochs=1, progress=False, out=str(tmp_path)), echo=lines.append)
    # each variant's line comes right after its run, in VARIANTS order, before the convert/fold checks
    rows = [i for i, ln in enumerate(lines) if ln.strip().split(" ")[0] in VARIANTS]
    assert [lines[i].split()[0] for i in rows] == list(VARIANTS)
    assert rows == list(range(rows[0], rows[0] + 3)) and rows[-1] < next(i for i, ln in enumerate(lines)
                                                                         if "nsl.convert" in ln)
    for kind in VARIANTS:
        r = res[kind]
        assert len(r["accuracies"]) == 1 and r["mean"] == r["accuracies"][0] and 0.0 <= r["mean"] <= 1.0
        assert f"{100 * r['mean']:6.2f}%" in lines[rows[VARIANTS.index(kind)]]
        assert (tmp_path / f"{kind}-s0" / "checkpoints" / "last.pt").is_file()
    assert res["dynamic-diagonal"]["params"] > res["static-full"]["params"] > res["conv"]["params"]
    assert all(d < 1e-4 for d in res["convert"].values())  # convert keeps the function
    assert res["fold"]["max_abs_diff"] == 0.0 and res["fold"]["nsconv_left"] == 0
    assert res["fold"]["accuracy_static"] == res["fold"]["accuracy_folded"]
    assert res["seconds"] > 0 and f"done in {res['seconds']:.0f} s." in [ln.strip() for ln in lines]
    # the runs are reused (resumed as complete) when the demo is run again into the same folder
    again = run_demo(DemoConfig(epochs=1, progress=False, out=str(tmp_path)), echo=lambda *a: None)
    assert again["conv"]["accuracies"] == res["conv"]["accuracies"]


def test_demo_full_flag_sets_the_full_comparison(monkeypatch):
    seen = []
    monkeypatch.setattr("nsl.demo.run_demo", lambda cfg: seen.append(cfg) or {})
    assert main(["demo", "--full", "--no-progress"]) == 0
    assert main(["demo", "--full", "--seeds", "2"]) == 0
    assert main(["demo"]) == 0
    assert [(c.epochs, c.seeds) for c in seen] == [(12, 3), (12, 2), (3, 1)]
