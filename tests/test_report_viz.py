"""`nsl report` and `nsl viz` on tiny real training runs (scikit-learn digits)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

import nsl
from cli_helpers import run
from nsl.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(out, layer, seed=0, iters=2, extra=()):
    with nsl.functional.use_backend("unfold"):  # no C++ compile wait
        code = main(["train", "--dataset", "digits", "--model", "cnn9", "--layer", layer, "--protocol", "fast",
                     "--iters", str(iters), "--batch-size", "16", "--eval-every", "0", "--test-subset", "40",
                     "--seed", str(seed), "--device", "cpu", "--out", str(out), "--no-progress", "--set",
                     "log_every=1", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"sf0": _train(root / "sf-seed0", "static-full", 0), "sf1": _train(root / "sf-seed1", "static-full", 1),
            "dd": _train(root / "dd", "dynamic-diagonal", 0)}


def assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_report_table_rows_seed_groups_and_curves(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    code, stdout, err = run(["report", str(runs["sf0"]), str(runs["sf1"]), str(runs["dd"]), "--out", str(out)],
                            capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert str(out / "report.md") in stdout and str(out / "curves.png") in stdout
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")
            and not ln.startswith("| variant")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[:3] == ["sf-seed0", "sf-seed1", "dd"]
    first = rows[0].split("|")
    assert first[2].strip() == "cnn9" and first[3].strip() == "static-full" and first[4].strip() == "digits"
    assert first[11].strip() == "2"  # iterations
    seconds = float(first[10].strip().removesuffix(" s"))
    assert float(first[12].strip()) == pytest.approx(seconds / 2, abs=0.03)  # s / step (wall time shown to 0.1 s)
    assert rows[0].count("%") == 2 and "n/a" not in rows[0]
    # the two static-full seeds form one group with mean +- CI; the dynamic run is alone
    assert "## Runs that differ only by seed" in md and len(rows) == 4
    assert "sf-seed0, sf-seed1" in rows[3] and "+-" in rows[3]
    # dynamic MACs exceed static ones (predictor + modulation), params too
    macs = {names[i]: rows[i].split("|")[7].strip() for i in range(3)}
    assert macs["sf-seed0"] == macs["sf-seed1"] != macs["dd"]
    assert_png(out / "curves.png")
    # one point per seed of each variant
    assert str(out / "accuracy.png") in stdout and "![final test accuracy per variant" in md
    assert_png(out / "accuracy.png")


def test_accuracy_figure_draws_every_seed(runs, tmp_path, monkeypatch):
    import matplotlib.axes

    from nsl.report import load_run, plot_accuracy_by_variant

    recs = [load_run(runs[k]) for k in ("sf0", "sf1", "dd")]
    drawn, scatter = [], matplotlib.axes.Axes.scatter

    def spy(self, x, y, *a, **k):
        drawn.append(list(y))
        return scatter(self, x, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    path = plot_accuracy_by_variant(recs, [[0, 1], [2]], ["static-full", "dynamic-diagonal"], tmp_path / "acc.png")
    assert_png(path)
    assert drawn == [[100 * recs[0].final_acc, 100 * recs[1].final_acc], [100 * recs[2].final_acc]]
    assert plot_accuracy_by_variant(recs, [[]], ["none"], tmp_path / "none.png") is None


def test_report_paired_baseline_and_shape_curve(runs, tmp_path, capsys):
    root = tmp_path / "shaped"
    shaped = [_train(root / f"k3-s{seed}", "static-full", seed, iters=4, extra=("--set", "width=8", "--set",
                                                                                 "shape_active=3"))
              for seed in (0, 1)]
    base = []
    for seed in (0, 1):  # copies of the dense runs with known final accuracies, to check the pairing
        base.append(root / f"dense-s{seed}")
        shutil.copytree(runs[f"sf{seed}"], base[-1])
    for path, acc in zip([*base, *shaped], (0.50, 0.60, 0.53, 0.58)):
        with open(path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": "eval", "step": 9, "test_acc": acc, "test_loss": 1.0, "active": 1.0 if
                                path in base else 3 / 9}) + "\n")
    out = tmp_path / "rep"
    code, stdout, err = run(["report", *map(str, base), *map(str, shaped), "--baseline", "shape_active=0", "--out",
                             str(out)], capsys)
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "## Paired by seed against the baseline (shape_active=0)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| cnn9 / static-full / digits (iters=4, shape_active=3")
                and " of 2 |" in ln)
    # per seed: 0.53 - 0.50 and 0.58 - 0.60; mean +0.5 points, sd 3.54, t(1) CI 12.706 * 3.54 / sqrt(2) = 31.77
    assert "| 0, 1 | +3.00, -2.00 | +0.50 +- 31.77 | 1 of 2 |" in line
    assert str(out / "shape_curve.png") in stdout
    assert_png(out / "shape_curve.png")
    # a baseline that matches no variant, or two, or names no config field
    for sel, msg in (("layer=conv", "matches 0 variant(s)"), ("model=cnn9", "matches 2 variant(s)"),
                     ("colour=red", "'colour' is not a config field"), ("layer", "expects KEY=VALUE")):
        code, _, err = run(["report", str(runs["sf0"]), *map(str, shaped), "--baseline", sel, "--out",
                            str(tmp_path / "bad")], capsys)
        assert code == 2 and msg in err, (sel, err)


def test_count_macs_conv_and_dynamic():
    import torch.nn as nn

    from nsl import DynamicNSConv2d
    from nsl.report import count_macs

    conv = nn.Conv2d(2, 4, 3, padding=1)
    assert count_macs(conv, (2, 5, 5)) == 4 * 2 * 9 * 25
    dyn = DynamicNSConv2d(2, 4, 3, padding=1, similarity="diagonal", predictor="light", hidden_channels=3)
    base = 4 * 2 * 9 * 25 + 2 * 9 * 25  # convolution + modulation of each patch by m(y)
    assert count_macs(dyn, (2, 5, 5)) > base


def test_report_bad_run_dirs(runs, tmp_path, capsys):
    code, _, err = run(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "run directory" in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["report", str(empty), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "config.json is missing" in err and "metrics.jsonl" in err
    broken = tmp_path / "broken"
    shutil.copytree(runs["sf0"], broken)
    (broken / "metrics.jsonl").write_text("{not json\n")
    code, _, err = run(["report", str(broken), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "metrics.jsonl line 1 is not valid JSON" in err


def test_viz_static_full(runs, tmp_path, capsys):
    out = tmp_path / "viz_sf"
    code, stdout, err = run(["viz", "--checkpoint", str(runs["sf0"] / "checkpoints" / "best.pt"), "--out", str(out)],
                            capsys)
    assert code == 0, err
    written = {p.name for p in out.iterdir()}
    assert written == {"static_similarity.png", "training_curves.png"}
    for name in written:
        assert str(out / name) in stdout
        assert_png(out / name)


def test_viz_dynamic_diagonal_test_images_and_image(runs, tmp_path, capsys):
    ckpt = str(runs["dd"] / "checkpoints" / "best.pt")
    out = tmp_path / "viz_dd"
    code, stdout, err = run(["viz", "--checkpoint", ckpt, "--out", str(out)], capsys)
    assert code == 0, err
    written = {p.name for p in out.iterdir()}
    assert written == {"dynamic_deviation.png", "dynamic_mean_similarity.png", "training_curves.png"}
    for name in written:
        assert_png(out / name)
    img = tmp_path / "digit.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    out2 = tmp_path / "viz_img"
    code, stdout, err = run(["viz", "--checkpoint", ckpt, "--out", str(out2), "--image", str(img)], capsys)
    assert code == 0, err
    assert_png(out2 / "dynamic_deviation.png")


def test_viz_bad_arguments(runs, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, _, err = run(["viz", "--checkpoint", str(tmp_path / "missing.pt"), "--out", out], capsys)
    assert code == 2 and "checkpoint" in err and "does not exist" in err
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run(["viz", "--checkpoint", str(bad), "--out", out], capsys)
    assert code == 2 and "corrupt" in err
    code, _, err = run(["viz", "--checkpoint", str(runs["dd"]), "--out", out], capsys)
    assert code == 2 and "is a directory" in err
    ckpt = str(runs["dd"] / "checkpoints" / "best.pt")
    code, _, err = run(["viz", "--checkpoint", ckpt, "--out", out, "--image", str(tmp_path / "no.png")], capsys)
    assert code == 2 and "--image" in err and "does not exist" in err
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    code, _, err = run(["viz", "--checkpoint", ckpt, "--out", out, "--image", str(text)], capsys)
    assert code == 2 and "cannot read --image" in err
    with pytest.raises(SystemExit):
        main(["viz", "--out", out])  # --checkpoint is required
    assert "--checkpoint" in capsys.readouterr().err


def test_kernel_shape_figure_for_gated_model(tmp_path):
    from nsl.models import build_model
    from nsl.shape import attach_kernel_shape
    from nsl.viz import _fig_shapes

    model = build_model("cnn9", "static-diagonal", num_classes=10, in_channels=1, image_size=8)
    attach_kernel_shape(model, active=0.5)
    path = _fig_shapes(model, "cnn9 / static-diagonal (gated)", tmp_path)
    assert path.name == "kernel_shapes.png"
    assert_png(path)
    assert _fig_shapes(build_model("cnn9", "conv", in_channels=1, image_size=8), "plain", tmp_path / "x") is None
