"""experiments/cost_frontier_table.py (the iso-cost frontier of issue 25): the paired differences, the position
against the conv width curve, the JSON record that rebuilds the table, and (slow) experiments/cost_frontier_cpu.sh
end to end on real tiny runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsl.stats import mean_ci

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "cost_frontier_table.py"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("cost_frontier_table", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


CF = _module()


def _variant(layer, accs, **options):
    return {"layer": layer, "options": options, "params": None, "macs": None, "machine": "m",
            "runs": {s: {"acc": a, "s_per_step": None} for s, a in enumerate(accs)}}


def _named(variants: dict) -> dict:
    """Variants of machine ``m`` keyed by their names (the table script's layout)."""
    return {n: {**v, "name": n} for n, v in variants.items()}


def _curve_variants():
    """conv at widths 12, 16, 24 (training time per run 100, 200, 400 s; batch-128 inference 30, 60, 120 ms)."""
    v = {"conv-w12": _variant("conv", [70.0, 71.0, 69.5], width=12),
         "conv": _variant("conv", [72.0, 72.5, 71.0, 72.2]),
         "conv-w24": _variant("conv", [74.0, 74.9, 73.0], width=24)}
    for (name, cost) in (("conv-w12", 100.0), ("conv", 200.0), ("conv-w24", 400.0)):
        v[name]["train_run_s"] = cost
        v[name]["infer-b128"] = {"ms": cost * 0.3, "x_conv": cost / 200}
    return _named(v)


def test_paired_difference_to_conv_of_the_same_width_and_epochs():
    v = _curve_variants()
    v["nsl"] = _variant("static-full", [72.5, 73.5, 71.2, 72.0, 80.0])  # seed 4 has no conv partner
    v["nsl-e20"] = _variant("static-full", [75.0, 75.5], epochs=20)  # no conv at 20 epochs: no baseline
    v["nsl-w24"] = _variant("static-full", [74.5, 74.0], width=24.0)
    v["nsl [other]"] = {**_variant("static-full", [90.0]), "name": "nsl", "machine": "other"}  # no conv there
    v = _named(v) | {"nsl [other]": v["nsl [other]"]}
    CF.paired(v)
    assert "baseline" not in v["nsl [other]"]
    assert v["nsl"]["baseline"] == "conv" and v["nsl-w24"]["baseline"] == "conv-w24"
    assert v["nsl"]["diffs"] == pytest.approx({0: 0.5, 1: 1.0, 2: 0.2, 3: -0.2})
    mean, ci = mean_ci([0.5, 1.0, 0.2, -0.2])
    assert v["nsl"]["diff_mean"] == pytest.approx(mean) and v["nsl"]["diff_ci95"] == pytest.approx(ci)
    assert v["nsl"]["excludes_zero"] is (abs(mean) > ci)
    assert v["nsl-w24"]["diffs"] == pytest.approx({0: 0.5, 1: -0.9})
    assert "baseline" not in v["nsl-e20"] and "diffs" not in v["nsl-e20"]
    assert v["nsl"]["mean"] == pytest.approx(sum([72.5, 73.5, 71.2, 72.0, 80.0]) / 5)


def test_position_against_the_curve_interpolates_in_log_cost():
    v = _curve_variants()
    cand = {**_variant("dynamic-diagonal", [73.0, 74.0, 72.0, 73.5]), "name": "cand"}
    cand["train_run_s"] = 200.0 * 2 ** 0.4  # 0.4 of the way from conv (200 s) to conv-w24 (400 s) in log cost
    cand["infer-b128"] = {"ms": 15.0, "x_conv": 0.25}  # cheaper than the narrowest conv
    CF.paired(v)
    points = CF.curve(v)
    assert [p["width"] for p in points] == [12, 16, 24]
    pos = CF.against_curve(cand, points, "train")
    assert (pos["lo"], pos["hi"], pos["where"]) == ("conv", "conv-w24", "between")
    assert pos["f"] == pytest.approx(0.4)  # each seed paired with conv, the nearer width
    steps = [74.0 - 72.0, 74.9 - 72.5, 73.0 - 71.0]  # seeds with both widths
    step, step_ci = mean_ci(steps)
    diffs = [a - c - 0.4 * step for a, c in zip([73.0, 74.0, 72.0, 73.5], [72.0, 72.5, 71.0, 72.2])]
    mean, ci = mean_ci(diffs)
    assert pos["seeds"] == 4 and pos["mean"] == pytest.approx(mean)
    assert pos["ci95"] == pytest.approx(math.hypot(ci, 0.4 * step_ci))

    below = CF.against_curve(cand, points, "infer")
    assert (below["lo"], below["where"], below["f"]) == ("conv-w12", "cheaper than the narrowest", 0.0)
    assert below["mean"] == pytest.approx(sum([73.0 - 70.0, 74.0 - 71.0, 72.0 - 69.5]) / 3)
    cand["train_run_s"] = 200.0 * 2 ** 0.75  # f = 0.75: each seed paired with conv-w24, the nearer width
    near = CF.against_curve(cand, points, "train")
    assert near["f"] == pytest.approx(0.75) and near["seeds"] == 3  # conv-w24 has seeds 0-2
    diffs = [a - c + 0.25 * step for a, c in zip([73.0, 74.0, 72.0], [74.0, 74.9, 73.0])]
    mean, ci = mean_ci(diffs)
    assert near["mean"] == pytest.approx(mean) and near["ci95"] == pytest.approx(math.hypot(ci, 0.25 * step_ci))
    cand["train_run_s"] = 1000.0
    beyond = CF.against_curve(cand, points, "train")
    assert (beyond["lo"], beyond["where"]) == ("conv-w24", "dearer than the widest")
    assert CF.against_curve(_variant("static-full", [70.0]), points, "train") is None  # no cost: no position
    assert CF.against_curve({**cand, "machine": "other"}, points, "train") is None  # the curve is another machine's


def _bench(path: Path) -> Path:
    """A benchmarks/network.py JSON (its real layout, made-up times) with a width variant and a predictor variant."""
    rows = []
    for kind, ms in (("conv", 200.0), ("static-full", 210.0), ("conv-w24", 450.0), ("stage", 350.0)):
        for phase, scale in (("train", 1.0), ("infer-b1", 0.01), ("infer-b128", 0.3)):
            rows.append({"phase": phase, "batch": 1, "kind": kind, "mode": "eager", "ms": ms * scale,
                         "x_conv": ms / 200.0, "macs": int(ms * 1e5), "params": int(ms * 100)})
    path.write_text(json.dumps({"environment": {"threads": 1}, "model": "cnn9", "width": 16, "rows": rows,
                                "variants": {"conv-w24": "conv,width=24",
                                             "stage": "dynamic-diagonal,share_prediction=true,predictor_stride=2"}}))
    return path


def test_table_json_and_figure_rebuild_from_the_record(tmp_path, capsys):
    previous = {"runs": [{"variant": "conv", "seed": s, "layer": "conv", "options": {}, "test_acc": a,
                          "s_per_step": None, "machine": "m"} for s, a in enumerate([80.0, 81.0, 80.5])]
                + [{"variant": "conv", "seed": 0, "layer": "conv", "options": {}, "test_acc": 90.0}]  # no machine
                + [{"variant": "stage", "seed": s, "layer": "dynamic-diagonal", "s_per_step": None, "machine": "m",
                    "options": {"share_prediction": True, "predictor_stride": 2}, "test_acc": a}
                   for s, a in enumerate([81.0, 81.5, 80.0])],
                "variants": {}}
    (tmp_path / "prev.json").write_text(json.dumps(previous))
    bench = _bench(tmp_path / "bench.json")
    out = tmp_path / "cf.json"
    args = ["--machine", "m", "--known-machine", "m", "--previous", str(tmp_path / "prev.json"),
            "--known", "conv-w24=conv,width=24:82.0,83.5,82.5",
            "--known", "static-full=static-full:80.4,81.9", "--known", "static-full-e20=static-full,epochs=20:84",
            "--bench", str(bench), "--json", str(out), "--figure", str(tmp_path / "f.png")]
    assert CF.main(args) == 0
    record = json.loads(out.read_text())
    assert {(r["key"], r["seed"]) for r in record["runs"]} == (
        {(n, s) for n in ("conv", "stage", "conv-w24") for s in range(3)}
        | {("static-full", 0), ("static-full", 1), ("static-full-e20", 0), ("conv [an earlier machine]", 0)})
    assert {r["machine"] for r in record["runs"]} == {"m", "an earlier machine"}
    stage = record["variants"]["stage"]
    assert stage["train"]["ms"] == 350.0 and stage["train_run_s"] == pytest.approx(350.0 * 5 * 390 / 1000)
    assert stage["diffs"] == {"0": pytest.approx(1.0), "1": pytest.approx(0.5), "2": pytest.approx(-0.5)}
    assert stage["vs_curve"]["train"]["hi"] == "conv-w24"
    # equal MACs per image (the bench rows' MACs: conv 20M, conv-w24 45M, stage 35M)
    macs = stage["vs_curve"]["macs"]
    assert (macs["lo"], macs["hi"], macs["seeds"]) == ("conv", "conv-w24", 3)
    assert macs["f"] == pytest.approx(math.log(35 / 20) / math.log(45 / 20))
    assert [p["macs"] for p in record["curve"]] == [20_000_000, 45_000_000]
    e20 = record["variants"]["static-full-e20"]
    assert e20["train"]["ms"] == 210.0 and e20["train_run_s"] == pytest.approx(210.0 * 20 * 390 / 1000)
    # a static kind is deployed folded: its inference costs are conv's at its width, its training step its own
    static = record["variants"]["static-full"]
    assert static["train"] == {"ms": 210.0, "x_conv": pytest.approx(1.05)}
    for phase, ms in (("infer-b1", 2.0), ("infer-b128", 60.0)):
        assert static[phase] == {"ms": pytest.approx(ms), "x_conv": pytest.approx(1.0), "folded": True}
    assert stage["infer-b128"] == {"ms": pytest.approx(105.0), "x_conv": pytest.approx(1.75)}  # not static
    assert "| 60.0 (1.00x, folded) |" in capsys.readouterr().out
    assert [p["width"] for p in record["curve"]] == [16, 24]
    assert (tmp_path / "f.png").stat().st_size > 0

    # the record alone rebuilds the same numbers (a machine without the run directories)
    again = tmp_path / "again.json"
    assert CF.main(["--machine", "m", "--previous", str(out), "--bench", str(bench), "--json", str(again)]) == 0
    rebuilt = json.loads(again.read_text())
    assert rebuilt["runs"] == record["runs"] and rebuilt["variants"] == record["variants"]

    # --compact: the README's one table, this machine's variants only
    capsys.readouterr()
    assert CF.main(["--machine", "m", "--previous", str(out), "--bench", str(bench), "--compact"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["conv", "conv-w24", "stage", "static-full", "static-full-e20"]
    static = next(r for r in rows if r.startswith("| static-full |")).split(" | ")
    mean, ci = mean_ci([80.4, 81.9])
    dmean, dci = mean_ci([80.4 - 80.0, 81.9 - 81.0])
    assert static[1:4] == ["0-1", f"{mean:.2f} +- {ci:.2f}", f"{dmean:+.2f} +- {dci:.2f} (no)"]
    assert static[7] == "1.00x / 1.00x (folded)" and static[6] == "1.05x"
    stage = next(r for r in rows if r.startswith("| stage |")).split(" | ")
    assert "vs conv..conv-w24 (f=0.69): **" in stage[10]  # the equal-MACs position
    e20 = next(r for r in rows if r.startswith("| static-full-e20 |")).split(" | ")
    assert e20[8] != "" and e20[9:] == ["", " |"]  # per image, a longer schedule's inference and MACs are its twin's


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        CF.main([str(tmp_path / "missing")])
    assert e.value.code == 2
    assert f"{tmp_path / 'missing'} is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--known expects NAME=KIND"):
        CF.main(["--known", "static-full:80"])
    (tmp_path / "bench.json").write_text('{"rows": [{"mode": "eager"}]}')
    with pytest.raises(SystemExit):
        CF.main(["--known", "conv=conv:80", "--bench", str(tmp_path / "bench.json")])
    assert "not a benchmarks/network.py JSON (KeyError" in capsys.readouterr().err


@pytest.mark.slow  # three nsl train processes, the resumed script and the table: about a minute
def test_the_runs_script_and_the_table_on_tiny_runs(data_root, tmp_path):
    out = tmp_path / "frontier"
    tiny = "--iters 2 --batch-size 8 --set train_subset=32 --set test_subset=20 --set eval_batch_size=20"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), RUNS="conv:0 conv-w12:0 static-full:0 light-none:0",
               TRAIN_ARGS=tiny)
    cmd = ["bash", str(REPO / "experiments" / "cost_frontier_cpu.sh"), str(data_root), str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert all((out / f"{n}-s{s}" / "done").is_file() for n, s in (("conv", 0), ("conv-w12", 0), ("static-full", 0)))
    assert json.loads((out / "conv-w12-s0" / "config.json").read_text())["width"] == 12
    light = json.loads((out / "light-none-s0" / "config.json").read_text())
    assert (light["layer"], light["predictor_norm"], light["width"]) == ("dynamic-diagonal-light", "none", 16)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # finished runs: skipped
    assert again.returncode == 0 and "start" not in again.stderr

    res = subprocess.run([sys.executable, str(SCRIPT), str(out), "--json", str(tmp_path / "cf.json")],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "cf.json").read_text())
    assert record["variants"]["static-full"]["baseline"] == "conv"
    assert set(record["variants"]["static-full"]["diffs"]) == {"0"}
    assert [p["width"] for p in record["curve"]] == [12, 16]
    assert record["variants"]["static-full"]["macs"] > 0 and "| conv-w12 |" in res.stdout
    assert record["variants"]["light-none"]["options"]["predictor_norm"] == "none"
