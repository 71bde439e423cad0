"""experiments/fewshot_cpu.sh with several training seeds, then experiments/fewshot_table.py, on real
CIFAR-FS episodes (a few episodes per run)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _table(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, str(REPO / "experiments" / "fewshot_table.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_seeds_script_trains_pairs_and_tabulates(data_root, tmp_path):
    out = tmp_path / "fs"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO / "src"), SEEDS="0 1", KINDS="conv static-full", DATASETS="cifar-fs",
               TRAIN_EPISODES="3", VAL_EVERY="3", VAL_EPISODES="4", TEST_EPISODES="10")
    cmd = ["bash", str(REPO / "experiments" / "fewshot_cpu.sh"), str(data_root), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    for run in ("cifar-fs-conv", "cifar-fs-static-full", "cifar-fs-conv-s1", "cifar-fs-static-full-s1"):
        assert (out / run / "done").exists(), run
        assert json.loads((out / run / "config.json").read_text())["seed"] == (1 if run.endswith("-s1") else 0)
    evals = sorted(f.name for f in out.glob("eval-*.json"))
    assert evals == ["eval-cifar-fs-static-full-5w1s.json", "eval-cifar-fs-static-full-5w5s.json",
                     "eval-cifar-fs-static-full-s1-5w1s.json", "eval-cifar-fs-static-full-s1-5w5s.json"]
    # each seed's NSL model is paired with the conv model of the same seed, on the same test episodes
    s0 = json.loads((out / "eval-cifar-fs-static-full-5w1s.json").read_text())
    s1 = json.loads((out / "eval-cifar-fs-static-full-s1-5w1s.json").read_text())
    assert s0["paired"]["episodes"] == s1["paired"]["episodes"] == 10
    assert s0["b"]["mean"] != s1["b"]["mean"] or s0["a"]["mean"] != s1["a"]["mean"]
    # a second call skips everything that is done
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "nsl fewshot" not in again.stderr and "run " not in again.stdout

    table = _table(out)
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "Spread over training seeds" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| cifar-fs | 5-way 1-shot | ")]
    assert len(rows) == 3  # the seed-0 row, then conv and static-full over seeds 0, 1
    conv = rows[1].split(" | ")
    assert conv[2] == "conv" and conv[3] == "0, 1"
    assert conv[4] == f"{100 * s0['b']['mean']:.2f}, {100 * s1['b']['mean']:.2f}"
    sf = rows[2].split(" | ")
    assert sf[2] == "static-full" and sf[7] == (f"{100 * s0['paired']['mean_diff']:+.2f}, "
                                                 f"{100 * s1['paired']['mean_diff']:+.2f}")
    mean = (s0["paired"]["mean_diff"] + s1["paired"]["mean_diff"]) / 2
    assert re.match(re.escape(f"{100 * mean:+.2f}") + r" \+- \d+\.\d\d \|$", sf[8])


def _result(mean, ci, n=600):
    return {"mean": mean, "ci95": ci, "episodes": n}


def test_table_spread_statistics(tmp_path):
    """Three seeds of synthetic results: the t-based CI over seeds (t(2) = 4.303) and the mean episode CI."""
    accs = {0: (0.46, 0.48), 1: (0.44, 0.47), 2: (0.45, 0.49)}
    for seed, (conv, dd) in accs.items():
        suffix = "" if seed == 0 else f"-s{seed}"
        res = {"a": _result(dd, 0.008), "b": _result(conv, 0.01),
               "paired": {"episodes": 600, "mean_diff": dd - conv, "ci95": 0.005}}
        (tmp_path / f"eval-cifar-fs-dynamic-diagonal{suffix}-5w1s.json").write_text(json.dumps(res))
    (tmp_path / "eval-notes.json").write_text("{}")  # not a result file: ignored
    table = _table(tmp_path)
    assert table.returncode == 0, table.stderr
    rows = [ln.split(" | ") for ln in table.stdout.splitlines() if ln.startswith("| cifar-fs")]
    assert rows[0][1:] == ["5-way 1-shot", "600", "46.00 +- 1.00", "48.00 +- 0.80", "+2.00 +- 0.50 |"]  # seed 0
    conv, dd = rows[1], rows[2]
    # conv 46, 44, 45: mean 45, sd 1, CI 4.303 / sqrt(3) = 2.48
    assert conv[2:7] == ["conv", "0, 1, 2", "46.00, 44.00, 45.00", "45.00 +- 2.48", "1.00"]
    # differences 2, 3, 4: mean 3, sd 1
    assert dd[2:9] == ["dynamic-diagonal", "0, 1, 2", "48.00, 47.00, 49.00", "48.00 +- 2.48", "0.80",
                       "+2.00, +3.00, +4.00", "+3.00 +- 2.48 |"]


def test_table_without_results(tmp_path):
    table = _table(tmp_path)
    assert table.returncode == 1 and "no eval-*.json files in" in table.stderr
    # one result of seed 1 only: neither table has a row yet
    res = {"a": _result(0.47, 0.008), "b": _result(0.46, 0.01), "paired": {"episodes": 600, "mean_diff": 0.01,
                                                                            "ci95": 0.005}}
    (tmp_path / "eval-cifar-fs-dynamic-diagonal-s1-5w1s.json").write_text(json.dumps(res))
    table = _table(tmp_path)
    assert table.returncode == 1 and table.stdout == "" and "no seed-0 results and no kind with 2" in table.stderr
