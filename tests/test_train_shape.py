"""Kernel-shape learning and the model width inside the training engine (TrainConfig.shape_*, width)."""

from __future__ import annotations

import pytest
import torch

from cli_helpers import records, run
from nsl.layers import NSConv2d
from nsl.shape import gated_layers
from nsl.train import ConfigError, build_from_checkpoint, build_model_for, load_checkpoint, make_config

COMMON = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "static-full", "--protocol", "fast",
          "--batch-size", "32", "--test-subset", "200", "--no-progress", "--set", "width=8", "--set", "log_every=1"]


def test_width_sets_the_channels_and_is_checked():
    cfg = make_config("fast", dataset="digits", width=8)

    model = build_model_for(cfg, {"num_classes": 10, "in_channels": 1, "image_size": 8})
    assert model.stem.conv.out_channels == 8
    with pytest.raises(ConfigError, match="width applies to cnn9, resnet20, resnet32, resnet56 only"):
        make_config("fast", model="resnet18", width=8)
    with pytest.raises(ConfigError, match="width must be (an integer )?>= 0"):
        make_config("fast", width=-1)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) for m in ("learned", "magnitude")])
def test_shaped_run_ends_with_exact_budget_and_folds_to_zeros(tmp_path, capsys, method):
    out = tmp_path / method
    code, _, err = run([*COMMON, "--iters", "30", "--out", str(out), "--set", "shape_active=3",
                        "--set", f"shape_method={method}"], capsys)
    assert code == 0, err
    train = records(out, "train")
    # dense until shape_start (30% of 30 steps = step 9), exactly 3 of 9 positions at the end
    assert all(r["active"] == 1.0 for r in train if r["step"] <= 9)
    assert records(out, "eval")[-1]["active"] == pytest.approx(3 / 9)
    model, _ = build_from_checkpoint(load_checkpoint(out / "checkpoints" / "last.pt"))
    gated = gated_layers(model)
    assert len(gated) == sum(isinstance(m, NSConv2d) for m in model.modules()) > 0
    for _, layer, gate in gated:
        assert gate.phase == "frozen" and gate.mask.sum().item() == 3
        w = layer.effective_weight().flatten(2)
        assert (w[:, :, gate.mask == 0] == 0).all()  # removed positions are exact zeros
    code, text, err = run(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--fold"], capsys)
    assert code == 0, err
    assert "max |logit difference| 0.00e+00" in text


def test_magnitude_keeps_the_largest_positions(tmp_path, capsys):
    out = tmp_path / "m"
    assert run([*COMMON, "--iters", "10", "--out", str(out), "--set", "shape_active=4", "--set",
                "shape_method=magnitude", "--stop-at", "3"], capsys)[0] == 0  # pruning happens at step 3
    before, _ = build_from_checkpoint(load_checkpoint(out / "checkpoints" / "last.pt"))
    assert run(["train", "--out", str(out), "--resume", "--no-progress", "--stop-at", "4"], capsys)[0] == 0
    after, _ = build_from_checkpoint(load_checkpoint(out / "checkpoints" / "last.pt"))
    for (_, lb, gb), (_, _, ga) in zip(gated_layers(before), gated_layers(after)):
        assert gb.phase == "relaxed" and ga.phase == "frozen"
        scores = lb._similar_weight().pow(2).sum((0, 1)).flatten()  # ||(W M)[:, :, q]||^2 before pruning
        assert set(torch.nonzero(ga.mask).flatten().tolist()) == set(scores.topk(4).indices.tolist())


def test_resume_mid_shaping_gives_identical_weights(tmp_path, capsys):
    common = [*COMMON, "--iters", "20", "--set", "shape_active=5", "--seed", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*common, "--out", str(a)], capsys)[0] == 0
    assert run([*common, "--out", str(b), "--stop-at", "10"], capsys)[0] == 0  # in the relaxed phase
    assert run(["train", "--out", str(b), "--resume", "--no-progress", "--stop-at", "14"], capsys)[0] == 0  # hard
    assert run(["train", "--out", str(b), "--resume", "--no-progress"], capsys)[0] == 0
    ca, cb = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (a, b))
    for k, v in ca["model"].items():
        assert (torch.equal(v, cb["model"][k]) if torch.is_tensor(v) else v == cb["model"][k]), k
    assert ca["shape"]["optimizer"]["state"] and ca["model"]["stage1.0.conv.kernel_gate._extra_state"]["phase"] \
        == "frozen"
    assert records(a, "eval") and [r["active"] for r in records(a, "train")] == \
        [r["active"] for r in records(b, "train")]


def test_shape_config_errors(tmp_path, capsys):
    base = [*COMMON, "--iters", "2", "--out", str(tmp_path / "x")]
    code, _, err = run([*base, "--layer", "conv", "--set", "shape_active=3"], capsys)
    assert code == 2 and "shape_active needs NSL layers" in err
    code, _, err = run([*base, "--set", "shape_active=10"], capsys)
    assert code == 2 and "shape_active=10" in err and "1 <= k <= 9" in err
    code, _, err = run([*base, "--set", "shape_method=random"], capsys)
    assert code == 2 and "shape_method" in err and "must be one of learned, magnitude" in err
    code, _, err = run([*base, "--set", "shape_freeze=1.0"], capsys)
    assert code == 2 and "shape_freeze" in err and "< 1" in err
    code, _, err = run([*base, "--layer", "dynamic-full", "--set", "shape_active=3", "--set",
                        "shape_per_filter=true"], capsys)
    assert code == 2 and "shape_per_filter needs a diagonal M" in err
