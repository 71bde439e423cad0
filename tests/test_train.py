"""Training toolkit: configs, schedule, the loop end to end through the CLI, resume, NaN stop, errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from cli_helpers import TORCHRUN_NSL, assert_same_training, rank_pids, records, run, run_to_end, signal_when_training
from nsl.layers import LAYER_KINDS
from nsl.models import build_model
from nsl.train import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    build_model_for,
    load_checkpoint,
    lr_factor,
    make_config,
    param_groups,
    recalibrate_bn,
)

pytestmark = pytest.mark.usefixtures("unfold_backend")


FAST = ["--no-progress", "--set", "log_every=1"]


# -- configs ---------------------------------------------------------------------------------------
def test_paper_protocol_values():
    c = make_config("paper")
    assert (c.optimizer, c.lr, c.momentum, c.batch_size, c.iters) == ("sgd", 0.1, 0.9, 128, 42_500)
    assert (c.weight_decay, c.wd_static_diagonal, c.wd_static_full, c.decay_bn) == (5e-4, 0.0, 5e-3, True)
    assert (c.label_smoothing, c.input, c.augment, c.pad, c.flip) == (0.01, "raw", True, 4, True)
    assert (c.bn_momentum, c.bn_eps, c.bn_recalibrate, c.warmup_iters, c.paper_init) == (0.001, 1e-3, 0, 0, True)
    assert c.bn_zero_init is False and c.bias is False  # the authors' convs have no bias
    assert TrainConfig() == make_config("paper")  # the paper protocol is the defaults
    assert make_config("demo").bias is make_config("fast").bias is True
    # lr x 0.1 at 20k, 30k and 37.5k of 42.5k
    f = [lr_factor(c, s, 42_500) for s in (0, 19_999, 20_000, 29_999, 30_000, 37_499, 37_500, 42_499)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    fast = make_config("fast")
    assert fast.schedule == "onecycle" and fast.input == "normalize" and fast.amp == "auto" and fast.iters is None


def test_warmup_and_schedules():
    c = make_config("paper", warmup_iters=200)
    assert lr_factor(c, 0, 42_500) == pytest.approx(1 / 200) and lr_factor(c, 199, 42_500) == 1.0
    c = make_config("fast", iters=100)
    assert lr_factor(c, 0, 100) == pytest.approx(1 / 20) and lr_factor(c, 19, 100) == 1.0
    assert lr_factor(c, 99, 100) < 0.01
    c = make_config("paper", schedule="cosine")
    assert lr_factor(c, 50, 100) == pytest.approx(0.5)


def test_overrides_and_unknown_keys():
    c = apply_overrides(make_config("paper"), ["lr=0.05", "bn_recalibrate=20", "decay_bn=false", "iters=1e3",
                                               "lr_milestones=0.5,0.75", "extra={\"note\": \"x\"}"])
    assert (c.lr, c.bn_recalibrate, c.decay_bn, c.iters, c.lr_milestones) == (0.05, 20, False, 1000, (0.5, 0.75))
    assert c.extra == {"note": "x"}
    with pytest.raises(ConfigError, match="unknown config key 'lrr'; valid keys: .*label_smoothing"):
        apply_overrides(c, ["lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(c, ["lr"])
    with pytest.raises(ConfigError, match="iters expects an integer"):
        apply_overrides(c, ["iters=ten"])
    with pytest.raises(ConfigError, match="schedule must be one of"):
        apply_overrides(c, ["schedule=linear"])
    with pytest.raises(ConfigError, match="unknown protocol 'slow'"):
        make_config("slow")
    with pytest.raises(ConfigError, match="unknown config key"):
        make_config("paper", bogus=1)
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c


def test_weight_decay_groups():
    cfg = make_config("paper")
    for kind, name, wd in (("static-diagonal", "diagonal", 0.0), ("static-full", "full", 5e-3)):
        model = build_model("cnn9", kind)
        groups = {g["name"]: g for g in param_groups(model, cfg)}
        assert len(groups[name]["params"]) == 9 and groups[name]["weight_decay"] == wd
        assert groups["default"]["weight_decay"] == 5e-4
        assert "nodecay" not in groups  # the authors decay BN scale and shift too
    groups = {g["name"]: g for g in param_groups(build_model("cnn9", "conv"), make_config("fast"))}
    assert groups["nodecay"]["weight_decay"] == 0.0 and len(groups["nodecay"]["params"]) == 2 * 10 + 1


def test_recalibrate_bn_is_the_exact_batch_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.001)).eval()
    xs = [torch.randn(8, 3, 6, 6) * 50 + 10 for _ in range(3)]
    recalibrate_bn(model, [(x, None) for x in xs])
    assert not model.training and model[1].momentum == 0.001
    feats = torch.cat([model[0](x) for x in xs])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-3)


# -- end to end through the CLI ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["static-full", pytest.param("dynamic-diagonal", marks=pytest.mark.slow)])
def test_cli_train_and_eval_fold_on_cifar10_subset(data_root, tmp_path, capsys, layer):
    out = tmp_path / "run"
    code, _, err = run(["train", "--dataset", "cifar10", "--data-dir", str(data_root), "--model", "cnn9",
                        "--layer", layer, "--protocol", "paper", "--out", str(out), "--iters", "4", "--batch-size",
                        "16", "--subset", "512", "--test-subset", "128", "--eval-every", "2", "--bn-recalibrate", "2",
                        "--json", *FAST], capsys)
    assert code == 0, err
    assert (out / "config.json").exists() and (out / "checkpoints" / "last.pt").exists()
    assert (out / "checkpoints" / "best.pt").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["layer"] == layer and saved["bn_recalibrate"] == 2 and saved["train_subset"] == 512
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["test_samples"] == 128 for r in evals)
    trains = records(out, "train")
    assert [r["step"] for r in trains] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in trains)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["meta"]["num_classes"] == 10
    code, stdout, err = run(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--fold", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["test_acc"] == res["unfolded_acc"] == pytest.approx(evals[-1]["test_acc"]) and res["fold_matches"]
    assert res["folded_static_layers"] == (9 if LAYER_KINDS[layer].foldable else 0)
    assert res["max_abs_logit_diff"] < 1e-2 * max(1.0, abs(res["test_loss"]))


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_cli_fast_protocol_on_digits_with_epochs(tmp_path, capsys):
    out = tmp_path / "digits"
    code, stdout, err = run(["train", "--dataset", "digits", "--model", "resnet20", "--layer", "dynamic-filter",
                             "--protocol", "fast", "--out", str(out), "--epochs", "0.1", "--batch-size", "32",
                             "--json", *FAST], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["iters"] == 5 and summary["step"] == 5 and summary["test_samples"] == 450  # 42 batches/epoch
    code, stdout, err = run(["eval", "--checkpoint", str(out / "checkpoints" / "best.pt")], capsys)
    assert code == 0 and "test accuracy" in stdout and "450 images" in stdout


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_resume_gives_identical_weights(tmp_path, capsys):
    common = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "dynamic-diagonal", "--iters", "6",
              "--batch-size", "32", "--eval-every", "2", "--bn-recalibrate", "1", "--seed", "3", "--test-subset", "100",
              *FAST]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*common, "--out", str(a)], capsys)[0] == 0
    assert run([*common, "--out", str(b), "--stop-at", "3"], capsys)[0] == 0
    assert load_checkpoint(b / "checkpoints" / "last.pt")["step"] == 3
    code, _, err = run(["train", "--out", str(b), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    ca, cb = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (a, b))
    assert ca["step"] == cb["step"] == 6
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records(a, "eval")]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in records(b, "eval")]
    assert [r["step"] for r in records(b, "train")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_sigterm_saves_exits_75_and_resume_equals_uninterrupted(tmp_path):
    """A real SIGTERM to a real ``nsl train``: the step finishes, last.pt is written, one line says --resume,
    exit EXIT_PREEMPTED; the resumed run's weights equal an uninterrupted run's, bitwise."""
    from nsl.train.loop import EXIT_PREEMPTED

    common = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "static-full", "--iters", "40",
              "--batch-size", "16", "--eval-every", "1000", "--seed", "5", "--test-subset", "50", *FAST]
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = signal_when_training([sys.executable, "-m", "nsl.cli", *common, "--out", str(b)], b,
                                        signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], err
    stopped = load_checkpoint(b / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped < 40
    for cmd in ([*common, "--out", str(a)], ["train", "--out", str(b), "--resume", "--no-progress"]):
        run_to_end([sys.executable, "-m", "nsl.cli", *cmd])
    assert load_checkpoint(a / "checkpoints" / "last.pt")["step"] == 40
    assert_same_training(a, b, load_checkpoint, "step", "images_per_s")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code, _, err = run(["train", "--dataset", "digits", "--model", "cnn9", "--layer", "static-full", "--out", str(out),
                        "--iters", "10", "--batch-size", "32", "--lr", "1e30", "--set", "checkpoint_every=1", *FAST],
                       capsys)
    assert code == 1
    assert "loss became nan at step 2" in err and "Last good checkpoint" in err and "(step 1)" in err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_bad_inputs_have_clear_messages(tmp_path, capsys, data_root):
    base = ["train", "--dataset", "digits", "--iters", "1", "--batch-size", "16", *FAST]
    code, _, err = run([*base, "--out", str(tmp_path / "x"), "--model", "vgg"], capsys)
    assert code == 2 and "unknown model 'vgg'; valid models: cnn9" in err
    code, _, err = run([*base, "--out", str(tmp_path / "x"), "--layer", "dyn"], capsys)
    assert code == 2 and "unknown layer kind 'dyn'; valid kinds: conv" in err
    code, _, err = run([*base, "--out", str(tmp_path / "x"), "--set", "colour=red"], capsys)
    assert code == 2 and "unknown config key 'colour'" in err
    code, _, err = run([*base], capsys)
    assert code == 2 and "--out RUN_DIR is required" in err
    code, _, err = run(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "y"), *FAST], capsys)
    assert code == 2 and "is not a directory" in err
    code, _, err = run(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "y"),
                        "--iters", "1", *FAST], capsys)
    assert code == 2 and "cifar-10" in err.lower()  # the data layer's message: where and how to get the files
    code, _, err = run(["train", "--dataset", "imagenet", "--out", str(tmp_path / "y"), *FAST], capsys)
    assert code == 2 and "unknown dataset 'imagenet'; valid names" in err
    code, out, err = run([*base, "--out", str(tmp_path / "none"), "--resume"], capsys)  # a requeued job: starts fresh
    assert code == 0 and "nothing to resume" in out + err
    # a finished run: refuse to overwrite; refuse to resume with another layer kind
    run_dir = tmp_path / "done"
    assert run([*base, "--out", str(run_dir), "--model", "resnet20"], capsys)[0] == 0
    code, _, err = run([*base, "--out", str(run_dir), "--model", "resnet20"], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--layer", "static-full", *FAST], capsys)
    assert code == 2 and "cannot resume with different layer" in err
    # eval: missing, corrupt, foreign checkpoints and a bad data dir
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:200])
    code, _, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert code == 2 and "corrupt, truncated or not a PyTorch checkpoint" in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    code, _, err = run(["eval", "--checkpoint", str(foreign)], capsys)
    assert code == 2 and "not an nsl training checkpoint" in err
    code, _, err = run(["eval", "--checkpoint", str(run_dir)], capsys)
    assert code == 2 and "is a directory" in err


def test_nsl_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "nsl.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--resume" in res.stdout and "--set KEY=VALUE" in res.stdout
    res = subprocess.run([sys.executable, "-m", "nsl.cli", "demo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--seeds" in res.stdout


@pytest.mark.slow  # tier 2 (README: the slow tests)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: shards, reduced test metrics, one writer, per-rank loader states."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "nsl.cli",
           "train", "--dataset", "digits", "--model", "resnet20", "--layer", "static-full", "--iters", "4",
           "--batch-size", "16", "--eval-every", "2", "--test-subset", "101", "--out", str(out), *FAST]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the ranks' own errors come first in stderr, torchrun's summary last: show both
    assert res.returncode == 0, res.stderr[:3000] + "\n...\n" + res.stderr[-1500:]
    assert res.stdout.count("done: step 4") == 1  # only rank 0 reports
    assert "42 batches of 16 per epoch per rank, 2 ranks" in res.stdout
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4] and all(r["test_samples"] == 101 for r in evals)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and [s["rank"] for s in ckpt["loader"]] == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_amp_bf16_and_channels_last_on_cpu(tmp_path, capsys):
    out = tmp_path / "amp"
    code, stdout, err = run(["train", "--dataset", "digits", "--model", "resnet20", "--layer", "static-diagonal",
                             "--out", str(out), "--iters", "2", "--batch-size", "16", "--amp", "bf16",
                             "--channels-last", "--test-subset", "64", "--json", *FAST], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["test_samples"] == 64
    saved = json.loads((out / "config.json").read_text())
    assert saved["amp"] == "bf16" and saved["channels_last"] is True
    code, _, err = run(["train", "--dataset", "digits", "--out", str(tmp_path / "fp16"), "--iters", "1",
                        "--amp", "fp16", "--device", "cpu", *FAST], capsys)
    assert code == 2 and "amp=fp16 needs CUDA" in err


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_imagefolder_stream_train_resume_and_eval(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in ("cat", "dog"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "tree" / split / c / f"{i}.png")
    out = tmp_path / "run"
    args = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "tree"), "--model", "cnn9", "--layer",
            "static-diagonal", "--out", str(out), "--iters", "4", "--batch-size", "4", "--set", "num_workers=0",
            "--set", "image_size=32", *FAST]
    assert run([*args, "--stop-at", "2"], capsys)[0] == 0
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["loader"] == {"epoch": 0, "position": 4} and ckpt["meta"]["num_classes"] == 2
    code, stdout, err = run(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--fold", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["test_samples"] == 6 and res["test_acc"] == res["unfolded_acc"]


def test_predictor_width_share_predictor_and_bias_reach_the_model():
    meta = {"num_classes": 10, "in_channels": 3, "image_size": 32}

    def params(**kw):
        return sum(p.numel() for p in build_model_for(make_config("fast", **kw), meta).parameters())

    assert params(bias=False) == params() - 10  # cnn9 conv: only the classifier has a bias
    assert sum(p.numel() for p in build_model_for(make_config("paper"), meta).parameters()) == 511_200
    default = params(layer="dynamic-diagonal")
    assert params(layer="dynamic-diagonal", predictor_width=8) < default
    assert params(layer="dynamic-diagonal", share_predictor=True) < default
    for kw in ({"predictor_width": 8}, {"share_predictor": True}):
        with pytest.raises(ConfigError, match="predictor_width and share_predictor apply to layer kinds with a "
                                              "predictor .*, got layer 'static-full'"):
            make_config("fast", layer="static-full", **kw)
    with pytest.raises(ConfigError, match="predictor_width must be (an integer )?>= 0"):
        make_config("fast", layer="dynamic-diagonal", predictor_width=-1)


def test_bn_settings_applied_to_the_model():

    meta = {"num_classes": 10, "in_channels": 3, "image_size": 32}
    model = build_model_for(make_config("paper", layer="dynamic-diagonal", bn_zero_init=True), meta)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 10 + 9 * 2  # the network's and the predictors'
    assert all(b.momentum == 0.001 and b.eps == 1e-3 and not b.running_var.any() for b in bns)
    model = build_model_for(make_config("fast"), meta)
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_resume_gives_identical_weights(tmp_path):
    """2 gloo processes: interrupted at step 3 and resumed == uninterrupted (per-rank loader states restored)."""
    def launch(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
               "nsl.cli", "train", *args, *FAST]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]

    common = ["--dataset", "digits", "--model", "resnet20", "--layer", "dynamic-diagonal", "--iters", "6",
              "--batch-size", "16", "--eval-every", "3", "--bn-recalibrate", "2"]
    launch(*common, "--out", str(tmp_path / "a"))
    launch(*common, "--out", str(tmp_path / "b"), "--stop-at", "3")
    launch("--out", str(tmp_path / "b"), "--resume")
    ca, cb = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b"))
    assert ca["step"] == cb["step"] == 6
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k


# -- preemption of a torchrun job ------------------------------------------------------------------
DDP_PREEMPT = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "static-full", "--iters", "24",
               "--batch-size", "16", "--eval-every", "1000", "--seed", "2", "--test-subset", "50", *FAST]
PREEMPT_LINE = re.compile(r"^nsl train: error: stopped by (SIG\w+) at step (\d+) of 24; .*--resume\)$", re.M)


def _check_preempted_ddp_run(out, stdout: str, err: str, signame: str) -> int:
    """Every rank stopped at the same step N (rank 0 wrote last.pt there, the ranks' collectives agreed),
    exactly one preemption line, nothing else in the checkpoint folder; returns N."""
    lines = PREEMPT_LINE.findall(stdout + err)
    assert len(lines) == 1 and lines[0][0] == signame, stdout + err[-3000:]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and [s["rank"] for s in ckpt["loader"]] == [0, 1]
    assert ckpt["step"] == int(lines[0][1]) == records(out, "train")[-1]["step"] and 2 <= ckpt["step"] < 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    return ckpt["step"]


@pytest.mark.skipif(not torch.distributed.is_available() or not sys.platform.startswith("linux"),
                    reason="needs torch.distributed and Linux signals")
@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_torchrun_sigterm_to_the_agent_stops_every_rank_and_resume_equals_uninterrupted(tmp_path):
    """What a scheduler does: a real SIGTERM to the torchrun agent, which passes it to its ranks. Every rank
    finishes the same step, last.pt is written once, rank 0 prints the one line, the ranks exit 75 and torchrun
    exits 1 (its own SignalException; it does not pass on the ranks' codes); ``--resume`` under torchrun
    ends with the uninterrupted 2-rank run's weights and train records, bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    code, stdout, err = signal_when_training([*TORCHRUN_NSL, *DDP_PREEMPT, "--out", str(b)], b, signal.SIGTERM)
    assert code == 1 and "SignalException" in err, err[-3000:]
    _check_preempted_ddp_run(b, stdout, err, "SIGTERM")
    run_to_end([*TORCHRUN_NSL, "train", "--out", str(b), "--resume", "--no-progress"])
    run_to_end([*TORCHRUN_NSL, *DDP_PREEMPT, "--out", str(a)])
    assert load_checkpoint(a / "checkpoints" / "last.pt")["step"] == 24
    assert_same_training(a, b, load_checkpoint, "step", "images_per_s")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not sys.platform.startswith("linux"),
                    reason="needs torch.distributed and Linux signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_torchrun_signal_to_one_rank_stops_every_rank_and_resume_equals_uninterrupted(tmp_path, sig):
    """A real signal to rank 1 only: the ranks agree (all_reduce of the flag) and all stop at the same step;
    rank 0 writes last.pt and prints the one line; the ranks exit 75, so torchrun reports a failed job (exit 1,
    root cause exit code 75); the resumed run equals the uninterrupted one, bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    code, stdout, err = signal_when_training([*TORCHRUN_NSL, *DDP_PREEMPT, "--out", str(b)], b,
                                             getattr(signal, sig), targets=lambda proc: [rank_pids(proc.pid)[1]])
    assert code == 1 and re.search(r"exitcode\s*:\s*75 ", err), err[-3000:]
    _check_preempted_ddp_run(b, stdout, err, sig)
    run_to_end([*TORCHRUN_NSL, "train", "--out", str(b), "--resume", "--no-progress"])
    run_to_end([*TORCHRUN_NSL, *DDP_PREEMPT, "--out", str(a)])
    assert_same_training(a, b, load_checkpoint, "step", "images_per_s")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not sys.platform.startswith("linux"),
                    reason="needs torch.distributed and Linux signals")
def test_torchrun_forwards_sigusr1_when_asked(tmp_path):
    """torchrun handles SIGTERM, SIGINT, SIGHUP and SIGQUIT by default; with ``--signals-to-handle`` naming
    SIGUSR1 (SLURM's ``--signal=USR1@T`` warning) it passes SIGUSR1 to the ranks, which stop as for SIGTERM."""
    b = tmp_path / "b"
    cmd = [*TORCHRUN_NSL[:-2], "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", *TORCHRUN_NSL[-2:],
           *DDP_PREEMPT, "--out", str(b)]
    code, stdout, err = signal_when_training(cmd, b, signal.SIGUSR1)
    assert code == 1 and "SignalException" in err, err[-3000:]
    _check_preempted_ddp_run(b, stdout, err, "SIGUSR1")
