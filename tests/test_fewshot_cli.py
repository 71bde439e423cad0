"""``nsl fewshot train`` / ``nsl fewshot eval`` end to end on real CIFAR-FS, resume, determinism, errors."""

from __future__ import annotations

import json
import math
import signal
import sys

import numpy as np
import pytest
import torch

import nsl.functional as NF
from cli_helpers import assert_same_training, run_to_end, signal_when_training
from nsl.cli import main
from nsl.fewshot import FewShotConfig, apply_fewshot_overrides, compare_results, load_fewshot_checkpoint
from nsl.train import CheckpointError, ConfigError

# tiny episodes: 5-way 1-shot 2-query (15 images), a handful of episodes
TINY = ["--ways", "5", "--shots", "1", "--queries", "2", "--val-episodes", "2", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("unfold_backend")


def _train(data_root, out, *extra) -> int:
    return main(["fewshot", "train", "--dataset", "cifar-fs", "--data-dir", str(data_root), "--backbone", "conv4",
                 "--out", str(out), *TINY, *extra])


def _eval_json(capsys, ckpt, *extra) -> dict:
    capsys.readouterr()
    assert main(["fewshot", "eval", "--checkpoint", str(ckpt), "--no-progress", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot") / "conv"
    with NF.use_backend("unfold"):
        assert _train(data_root, out, "--layer", "conv", "--episodes", "4", "--val-every", "2") == 0
    return out


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["conv", pytest.param("dynamic-diagonal", marks=pytest.mark.slow)])
def test_train_then_eval(data_root, tmp_path, capsys, layer):
    out = tmp_path / layer
    assert _train(data_root, out, "--layer", layer, "--episodes", "3", "--val-every", "2") == 0
    for name in ("config.json", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dataset"], cfg["layer"], cfg["episodes"], cfg["queries"]) == ("cifar-fs", layer, 3, 2)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert [r["episode"] for r in vals] == [2, 3]
    ckpt = load_fewshot_checkpoint(out / "checkpoints/last.pt")
    assert ckpt["episode"] == 3 and len(ckpt["meta"]["mean"]) == 3
    best = load_fewshot_checkpoint(out / "checkpoints/best.pt")
    assert best["best_acc"] == max(r["val_acc"] for r in vals)

    res = _eval_json(capsys, out / "checkpoints/best.pt", "--episodes", "3", "--ways", "5", "--shots", "1")
    assert (res["ways"], res["shots"], res["split"], res["layer"]) == (5, 1, "test", layer)
    a = np.asarray(res["accuracies"])
    assert len(a) == 3 and np.all((a >= 0) & (a <= 1))
    assert res["mean"] == pytest.approx(a.mean())
    assert res["ci95"] == pytest.approx(1.96 * a.std() / math.sqrt(3))

    capsys.readouterr()
    assert main(["fewshot", "eval", "--checkpoint", str(out / "checkpoints/best.pt"), "--episodes", "3",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"{100 * res['mean']:.2f} +- {100 * res['ci95']:.2f} %" in text and "5-way 1-shot" in text


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_resume_gives_identical_weights(data_root, tmp_path, trained_run):
    full, half = trained_run, tmp_path / "half"  # trained_run: 4 episodes in one go
    assert _train(data_root, half, "--episodes", "2", "--val-every", "2") == 0
    assert _train(data_root, half, "--episodes", "4", "--resume") == 0
    a = load_fewshot_checkpoint(full / "checkpoints/last.pt")
    b = load_fewshot_checkpoint(half / "checkpoints/last.pt")
    assert a["episode"] == b["episode"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    recs = [json.loads(ln) for ln in (half / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in recs if r["kind"] == "val"] == [2, 4]


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_sigusr1_saves_exits_75_and_resume_equals_uninterrupted(data_root, tmp_path):
    """``nsl fewshot train`` trains through the one loop (:func:`nsl.train.fit`), so a real SIGUSR1 to a real
    process stops it as it stops ``nsl train``: the episode finishes, last.pt is written, one line says how to
    resume, exit 75; the resumed run's weights and train records equal an uninterrupted run's, bitwise."""
    from nsl.train.loop import EXIT_PREEMPTED

    common = ["fewshot", "train", "--dataset", "cifar-fs", "--data-dir", str(data_root), "--backbone", "conv4",
              "--layer", "static-diagonal", "--episodes", "30", "--val-every", "1000", *TINY, "--set", "log_every=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = signal_when_training([sys.executable, "-m", "nsl.cli", *common, "--out", str(b)], b,
                                        signal.SIGUSR1)
    assert code == EXIT_PREEMPTED, err
    stopped = load_fewshot_checkpoint(b / "checkpoints/last.pt")["episode"]
    assert err.strip().splitlines() == [
        f"nsl fewshot train: error: stopped by SIGUSR1 at episode {stopped} of 30; checkpoint "
        f"{b / 'checkpoints' / 'last.pt'} written; continue with --resume (nsl fewshot train --out {b} --resume)"]
    assert 2 <= stopped < 30
    for cmd in ([*common, "--out", str(a)], ["fewshot", "train", "--out", str(b), "--resume", "--no-progress"]):
        run_to_end([sys.executable, "-m", "nsl.cli", *cmd])
    assert load_fewshot_checkpoint(a / "checkpoints/last.pt")["episode"] == 30
    assert_same_training(a, b, load_fewshot_checkpoint, "episode", "episodes_per_s")


# -- evaluation ------------------------------------------------------------------------------------
def test_eval_is_deterministic_and_compare(trained_run, capsys):
    best, last = trained_run / "checkpoints/best.pt", trained_run / "checkpoints/last.pt"
    r1 = _eval_json(capsys, last, "--episodes", "4", "--seed", "3")
    r2 = _eval_json(capsys, last, "--episodes", "4", "--seed", "3")
    assert r1["accuracies"] == r2["accuracies"] and r1["mean"] == r2["mean"]

    both = _eval_json(capsys, last, "--episodes", "4", "--seed", "3", "--compare", str(best))
    assert both["a"]["accuracies"] == r1["accuracies"]
    d = np.asarray(both["a"]["accuracies"]) - np.asarray(both["b"]["accuracies"])
    assert both["paired"]["mean_diff"] == pytest.approx(d.mean())
    assert both["paired"]["ci95"] == pytest.approx(1.96 * d.std() / 2)
    assert both["paired"]["wins"] + both["paired"]["losses"] + both["paired"]["ties"] == 4

    capsys.readouterr()
    assert main(["fewshot", "eval", "--checkpoint", str(last), "--compare", str(last), "--episodes", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "paired difference (first - second) over the same 2 episodes: +0.00 +- 0.00 %" in text
    assert "tied in 2 episodes" in text


def test_compare_results_rejects_different_episodes():
    a = {"dataset": "cifar-fs", "split": "test", "ways": 5, "shots": 1, "queries": 15, "episodes": 2, "seed": 0,
         "accuracies": [0.5, 0.6]}
    with pytest.raises(ValueError, match=r"differ in seed \(0 vs 1\)"):
        compare_results(a, {**a, "seed": 1})


# -- configuration ---------------------------------------------------------------------------------
def test_config_overrides_and_schedule():
    cfg = apply_fewshot_overrides(FewShotConfig(), ["train_ways=20", "lr=5e-4", "rotations=false", "head=bilinear"])
    assert (cfg.train_ways, cfg.n_train_ways, cfg.lr, cfg.head) == (20, 20, 5e-4, "bilinear")
    assert FewShotConfig().n_train_ways == 5
    cfg = FewShotConfig(lr_step=10, lr_gamma=0.5)
    assert [cfg.lr_factor(e) for e in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        apply_fewshot_overrides(FewShotConfig(), ["bogus=1"])
    with pytest.raises(ConfigError, match="unknown head 'knn'"):
        FewShotConfig.from_dict({"head": "knn"})
    with pytest.raises(ConfigError, match="rotations is an Omniglot option"):
        FewShotConfig.from_dict({"rotations": True})
    from nsl.fewshot.train import build_fewshot_model

    def params(**kw):
        return sum(p.numel() for p in build_fewshot_model(FewShotConfig(**kw), 3, 32).parameters())

    assert params(layer="dynamic-diagonal", predictor_width=8) < params(layer="dynamic-diagonal")
    assert params(layer="dynamic-diagonal", share_predictor=True) < params(layer="dynamic-diagonal")
    with pytest.raises(ConfigError, match="predictor_width and share_predictor apply to layer kinds with a predictor"):
        FewShotConfig.from_dict({"layer": "conv", "predictor_width": 8})


# -- bad inputs ------------------------------------------------------------------------------------
def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(data_root, tmp_path, trained_run, capsys):
    base = ["fewshot", "train", "--data-dir", str(data_root), "--out", str(tmp_path / "r"), *TINY]
    err = _err(capsys, [*base, "--dataset", "cifar-fs", "--queries", "600"])
    assert "class 0 has 600 images, an episode needs 1 shot + 600 queries = 601" in err
    err = _err(capsys, [*base, "--dataset", "imagenet-fs"])
    assert "unknown few-shot dataset 'imagenet-fs'; valid names: cifar-fs, fc100, mini-imagenet, omniglot" in err
    err = _err(capsys, ["fewshot", "train", "--dataset", "cifar-fs", "--data-dir", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "r2"), *TINY])
    assert f"data directory {tmp_path / 'nope'} does not exist" in err
    err = _err(capsys, [*base, "--dataset", "cifar-fs", "--set", "bogus=1"])
    assert "unknown config key 'bogus'" in err
    err = _err(capsys, ["fewshot", "train", "--dataset", "cifar-fs", "--data-dir", str(data_root),
                        "--out", str(trained_run), *TINY])
    assert "already holds a run" in err and "--resume" in err

    ckpt = str(trained_run / "checkpoints/best.pt")
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", ckpt, "--split", "bogus", "--no-progress"])
    assert "unknown split 'bogus' for cifar-fs; valid splits: train, val, test" in err
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", ckpt, "--shots", "590", "--queries", "15",
                        "--no-progress"])
    assert "an episode needs 590 shots + 15 queries = 605" in err
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", ckpt, "--data-dir", str(tmp_path / "nope"),
                        "--no-progress"])
    assert "does not exist" in err
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", str(tmp_path / "missing.pt"), "--no-progress"])
    assert "does not exist" in err
    torch.save({"format": "nsl-train", "model": {}}, tmp_path / "other.pt")
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", str(tmp_path / "other.pt"), "--no-progress"])
    assert "is not a few-shot checkpoint" in err
    with pytest.raises(CheckpointError, match="is a directory"):
        load_fewshot_checkpoint(trained_run)


def test_eval_resolves_device_like_training(trained_run, capsys):
    # --device auto is resolved (the CPU here or GPU 0), not handed to .to() as a device name
    ckpt = str(trained_run / "checkpoints/best.pt")
    auto = _eval_json(capsys, ckpt, "--device", "auto", "--episodes", "3")
    assert auto["episodes"] == 3 and 0 <= auto["mean"] <= 1
    if not torch.cuda.is_available():
        assert auto == _eval_json(capsys, ckpt, "--device", "cpu", "--episodes", "3")
    err = _err(capsys, ["fewshot", "eval", "--checkpoint", ckpt, "--device", "gpu", "--no-progress"])
    assert err.strip().splitlines() == [
        "nsl fewshot eval: error: --device must be auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'"]


def test_nan_loss_stops_and_keeps_last_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    import nsl.fewshot.train as fst

    calls = {"n": 0}
    real = fst.episode_loss_and_accuracy

    def poisoned(*args):
        loss, acc = real(*args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), acc

    monkeypatch.setattr(fst, "episode_loss_and_accuracy", poisoned)
    out = tmp_path / "nan"
    capsys.readouterr()
    assert _train(data_root, out, "--episodes", "4", "--val-every", "2") == 1
    err = capsys.readouterr().err
    assert "loss became nan at episode 3" in err and "(episode 2)" in err
    assert load_fewshot_checkpoint(out / "checkpoints/last.pt")["episode"] == 2


def test_fewshot_help(capsys):
    assert main(["fewshot"]) == 2
    assert "train" in capsys.readouterr().out
    for cmd in ("train", "eval"):
        with pytest.raises(SystemExit):
            main(["fewshot", cmd, "--help"])
        assert "--episodes" in capsys.readouterr().out
