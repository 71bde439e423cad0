"""experiments/_cifar10_grid.sh's run_variants and experiments/predictor_study_table.py end to end: real tiny
training runs on a CIFAR-10 subset, named variants, seed-major order, skipped finished runs, the paired table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--iters 2 --batch-size 8 --set train_subset=32 --set test_subset=20 --set eval_batch_size=20"


def _variants(data_root: Path, out: Path, seeds: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEEDS=seeds,
               VARIANTS="conv conv\nhalf dynamic-diagonal-light predictor_stride=2 predictor_width=4\n")
    script = f'. experiments/_cifar10_grid.sh && run_variants "{data_root}" "{out}" {TINY}'
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _table(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``experiments/predictor_study_table.py ARGS`` in a subprocess with this checkout's ``nsl``."""
    return subprocess.run([sys.executable, str(REPO / "experiments" / "predictor_study_table.py"), *args],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                          timeout=timeout)


@pytest.mark.slow  # four nsl train processes and the table: about a minute on a quiet 2-core machine
def test_run_variants_and_the_study_table(data_root, tmp_path):
    out = tmp_path / "study"
    first = _variants(data_root, out, "0 1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    started = [line.split()[1].rstrip(":") for line in first.stdout.splitlines() if line.startswith("run ")]
    assert [Path(p).name for p in started] == ["conv-s0", "half-s0", "conv-s1", "half-s1"]  # seed 0 of each first
    cfg = json.loads((out / "half-s1" / "config.json").read_text())
    assert (cfg["layer"], cfg["predictor_stride"], cfg["predictor_width"], cfg["seed"]) == (
        "dynamic-diagonal-light", 2, 4, 1)
    assert all((out / f"{n}-s{s}" / "done").is_file() for n in ("conv", "half") for s in (0, 1))
    again = _variants(data_root, out, "0 1")  # finished runs are skipped
    assert again.returncode == 0 and not any(line.startswith("run ") for line in again.stdout.splitlines())

    res = _table(str(out), "--known", "dd=dynamic-diagonal:50,60", "--json", str(tmp_path / "t.json"),
                 "--figure", str(tmp_path / "f.png"))
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads((tmp_path / "t.json").read_text())
    accs = {(r["variant"], r["seed"]): r["test_acc"] for r in table["runs"]}
    assert set(accs) == {(n, s) for n in ("conv", "half") for s in (0, 1)}
    half = table["variants"]["half"]
    assert half["options"] == {"predictor_width": 4, "predictor_stride": 2}
    for s in (0, 1):
        assert abs(half["diffs"][str(s)] - (accs[("half", s)] - accs[("conv", s)])) < 1e-9
    assert half["macs"] > table["variants"]["conv"]["macs"] and half["ci95"] is not None
    assert table["variants"]["dd"]["known"] and "| half |" in res.stdout
    assert (tmp_path / "f.png").stat().st_size > 0

    # the recorded runs stand in for run directories that are gone; a finished run in OUT_DIR replaces its record
    (tmp_path / "later").mkdir()
    prev = table["runs"][0]
    edited = dict(table, runs=[dict(r, test_acc=r["test_acc"] - 7.0) if r is prev else r for r in table["runs"]])
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    for out_dir, previous in ((tmp_path / "later", tmp_path / "t.json"), (out, tmp_path / "edited.json")):
        again = _table(str(out_dir), "--previous", str(previous), "--json", str(tmp_path / "t2.json"))
        assert again.returncode == 0, again.stderr[-3000:]
        table2 = json.loads((tmp_path / "t2.json").read_text())
        assert {(r["variant"], r["seed"]): r["test_acc"] for r in table2["runs"]} == accs
        assert table2["variants"]["half"]["diffs"] == half["diffs"]


def test_study_table_refuses_a_bad_previous_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [{"variant": "conv"}]}')
    res = _table(str(tmp_path), "--previous", str(bad), timeout=120)
    assert res.returncode == 2
    assert f"--previous {bad}: not a predictor_study_table.py --json file (KeyError" in res.stderr


def test_study_table_refuses_a_missing_out_dir(tmp_path):
    res = _table(str(tmp_path / "nowhere"), timeout=120)
    assert res.returncode == 2 and "nowhere is not a directory (the study's OUT_DIR)" in res.stderr
