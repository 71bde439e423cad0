"""The training engine itself (nsl.train.fit) on a tiny task of its own: torch.compile with every layer kind,
images/s over training time only, the divergence check before any checkpoint, errors naming fields
(and the command line naming flags), the configs' shared (de)serialisation."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli_helpers import records, run
from nsl._cli_utils import message_of
from nsl.fewshot import FewShotConfig
from nsl.layers import LAYER_KINDS, make_conv
from nsl.train import (
    ConfigBase,
    ConfigError,
    RunDir,
    Task,
    TrainConfig,
    TrainingDiverged,
    fit,
    load_checkpoint,
    load_data,
    make_config,
    train,
)

pytestmark = pytest.mark.usefixtures("unfold_backend")


class TinyTask(Task):
    """One NSL layer of kind ``kind`` + a linear classifier, on 8 fixed random 2-channel 6x6 images, 3 classes."""

    structural = ("seed",)

    chance_loss = math.log(3)

    def __init__(self, kind="conv", total=2, eval_every=0, eval_sleep=0.0, poison_at=None, collapse_at=None):
        self.kind, self.total, self.eval_every, self.eval_sleep, self.poison_at = kind, total, eval_every, \
            eval_sleep, poison_at
        self.collapse_at = collapse_at  # from this step on the logits are zero (a finite, input-independent loss)
        self.name, self.calls = kind, 0

    def load_checkpoint(self, path, resume=False):
        return load_checkpoint(path, resume=resume)

    def setup(self, process, ckpt):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        self.meta = {"classes": 3}

    def build_model(self):
        return nn.Sequential(make_conv(self.kind, 2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def lr_factor(self, step):
        return 1.0

    def batches(self, step):
        while True:
            yield self.x, self.y

    def loss(self, net, batch, autocast):
        x, y = batch
        with autocast():
            out = net(x)
        self.calls += 1
        if self.collapse_at is not None and self.calls > self.collapse_at:
            out = out * 0.0
        loss = F.cross_entropy(out.float(), y)
        if self.calls == self.poison_at:
            loss = loss * float("nan")
        return loss, {"acc": ((out.argmax(1) == y).sum(), len(y))}, len(y)

    @torch.no_grad()
    def evaluate(self, model, autocast):
        time.sleep(self.eval_sleep)
        return {"test_acc": (model(self.x).argmax(1) == self.y).float().mean().item()}

    def describe(self, params):
        return f"tiny {self.kind}, {params} parameters"

    def eval_message(self, result):
        return f"accuracy {result['test_acc']:.2f}"


def _cfg(out, **kw) -> TrainConfig:
    return TrainConfig(**{"out": str(out), "device": "cpu", "progress": False, "log_every": 1, **kw})


# -- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_compile_trains_every_layer_kind_as_eager(tmp_path, kind):
    """aot_eager (the fastest backend to compile on the CPU): same weights as eager, uncompiled state_dict keys."""
    eager = fit(TinyTask(kind), _cfg(tmp_path / "eager"), echo=lambda *a: None)
    compiled = fit(TinyTask(kind), _cfg(tmp_path / "compiled", compile="true", compile_backend="aot_eager"),
                   echo=lambda *a: None)
    assert eager["step"] == compiled["step"] == 2
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert (saved["compile"], saved["compile_backend"]) == ("default", "aot_eager")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("eager", "compiled"))
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv", "static-full", "dynamic-diagonal"])
def test_compile_with_inductor(tmp_path, kind):
    eager = fit(TinyTask(kind), _cfg(tmp_path / "eager"), echo=lambda *a: None)
    compiled = fit(TinyTask(kind), _cfg(tmp_path / "compiled", compile="default"), echo=lambda *a: None)
    assert compiled["step"] == 2 and compiled["test_acc"] == pytest.approx(eager["test_acc"])
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("eager", "compiled"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_compile_setting_is_checked():
    assert make_config("demo").compile == "none"
    assert make_config("demo", compile=True).compile == "default"
    assert make_config("demo", compile="reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile must be .*none.*default.*reduce-overhead.*max-autotune.*'fast'"):
        make_config("demo", compile="fast")
    with pytest.raises(ConfigError, match="compile_backend must be the name of a torch.compile backend"):
        make_config("demo", compile_backend="")


# -- throughput over training time -------------------------------------------------------------------
def test_images_per_s_counts_training_time_only(tmp_path):
    summary = fit(TinyTask(total=3, eval_every=1, eval_sleep=1.0), _cfg(tmp_path / "r"), echo=lambda *a: None)
    assert summary["seconds"] >= 3 * 1.0 + summary["train_seconds"] - 1e-3
    assert summary["images_per_s"] > 3 * 8 / (summary["seconds"] - 3 * 1.0 + 1e-3)
    # the train records' windows leave the evaluations (1 s each, between the windows) out too
    assert all(r["images_per_s"] > 8 / 1.0 for r in records(tmp_path / "r", "train"))


# -- divergence ------------------------------------------------------------------------------------
def test_divergence_is_found_before_any_checkpoint_is_written(tmp_path):
    """The loss stays on the device until a step that saves: a NaN at step 2 is found at step 3, before its
    checkpoint, and named as step 2."""
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 2 .*Last good checkpoint: none"):
        fit(TinyTask(total=6, poison_at=2), _cfg(out, checkpoint_every=3, log_every=0), echo=lambda *a: None)
    assert not (out / "checkpoints" / "last.pt").exists() and records(out, "train") == []
    out = tmp_path / "nan2"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5 .*last.pt \(step 3\)"):
        fit(TinyTask(total=6, poison_at=5), _cfg(out, checkpoint_every=3, log_every=0), echo=lambda *a: None)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3


def _collapse_warnings(lines):
    return [m for m in lines if m.startswith("warning: the training loss has stayed at")]


def test_a_finite_collapse_is_warned_once_and_resume_warns_where_the_uninterrupted_run_does(tmp_path):
    """Loss at ln 3 from step 21 (zero logits) after training got it below 0.9 ln 3: one warning at the second
    collapsed window (step 24, windows of 2), naming its first step (22); a run without collapse, none."""
    said = []
    fit(TinyTask(total=40, collapse_at=20), _cfg(tmp_path / "a", log_every=2), echo=said.append)
    losses = [r["loss"] for r in records(tmp_path / "a", "train")]
    assert min(losses[:10]) < 0.9 * math.log(3) and losses[-1] == pytest.approx(math.log(3))
    (warning,) = _collapse_warnings(said)
    assert f"at 1.0986, the loss of a prediction that ignores its input (1.0986), since step 22, after reaching " \
           f"{min(losses[:10]):.4f}" in warning and "Checkpoints up to step 20 predate it" in warning
    said_b = []
    fit(TinyTask(total=40, collapse_at=20), _cfg(tmp_path / "b", log_every=2, stop_at=22), echo=said_b.append)
    fit(TinyTask(total=40, collapse_at=0), _cfg(tmp_path / "b", log_every=2), resume=True, echo=said_b.append)
    assert _collapse_warnings(said_b) == [warning]
    quiet = []
    fit(TinyTask(total=40), _cfg(tmp_path / "c", log_every=2), echo=quiet.append)
    assert not _collapse_warnings(quiet)


# -- errors name config fields; the command line names flags ------------------------------------------
def test_engine_errors_name_fields_and_the_cli_names_flags(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"set the run directory \(out RUN_DIR\)") as e:
        train(make_config("demo"))
    assert e.value.fields == ("out",) and message_of(e.value) == "set the run directory (--out RUN_DIR)"
    with pytest.raises(ConfigError, match="cifar10 needs data_dir") as e:
        load_data(make_config("paper", dataset="cifar10"), torch.device("cpu"))
    assert "cifar10 needs --data-dir" in message_of(e.value)
    fit(TinyTask(total=1), _cfg(tmp_path / "done"), echo=lambda *a: None)
    with pytest.raises(ConfigError, match="pass resume to continue it or choose another out"):
        RunDir(tmp_path / "done").open(_cfg(tmp_path / "done"), resume=False, structural=())
    # a field without a flag: named as --set FIELD=...; a plain ValueError is unchanged
    assert message_of(ConfigError("{shape_lr} is wrong", "shape_lr")) == "--set shape_lr=... is wrong"
    assert message_of(ValueError("plain {out}")) == "plain {out}"
    code, _, err = run(["train", "--dataset", "imagefolder", "--out", str(tmp_path / "if"), "--iters", "1",
                        "--no-progress"], capsys)
    assert code == 2 and "imagefolder needs --data-dir, the folder with train/ and val/" in err
    code, _, err = run(["train", "--protocol", "demo", "--iters", "1", "--out", str(tmp_path / "dv"), "--device",
                        "cuda:7", "--no-progress"], capsys)
    if not torch.cuda.is_available():
        assert code == 2 and "--device cuda:7 requested but CUDA is not available" in err


# -- configs share their (de)serialisation -------------------------------------------------------------
def test_configs_share_serialisation_and_old_files_load():
    assert issubclass(TrainConfig, ConfigBase) and issubclass(FewShotConfig, ConfigBase)
    assert "to_dict" not in vars(FewShotConfig) and "from_dict" not in vars(TrainConfig)
    for cfg in (make_config("paper", lr_milestones=(0.5, 0.75)), FewShotConfig(head="bilinear", stop_at=3)):
        d = json.loads(cfg.to_json())
        assert type(cfg).from_dict(d) == cfg
    c = TrainConfig.from_dict(json.loads(make_config("paper").to_json()))
    assert c.lr_milestones == make_config("paper").lr_milestones and isinstance(c.lr_milestones, tuple)
    # a config.json written before the engine fields existed takes their defaults
    old = {k: v for k, v in FewShotConfig().to_dict().items() if k not in ("amp", "stop_at", "compile",
                                                                           "compile_backend")}
    assert FewShotConfig.from_dict(old) == FewShotConfig()
    with pytest.raises(ConfigError, match="amp must be one of none, bf16, fp16, auto"):
        FewShotConfig.from_dict({"amp": "fp8"})
