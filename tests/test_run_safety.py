"""Issue 11's run rules, end to end: one writer per run directory, crash leftovers cleaned, a torn metrics line
recovered, a resumed run's metrics equal to the uninterrupted run's, no diverged state ever saved or evaluated,
write failures named in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import run
from nsl.train import TrainingDiverged, fit, make_config
from nsl.train.classification import ClassificationTask

BASE = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "conv", "--batch-size", "32", "--seed", "1",
        "--test-subset", "60", "--no-progress", "--set", "width=4"]
VOLATILE = ("time", "images_per_s")  # wall-clock fields: the only ones allowed to differ


def _records(run_dir):
    return [{k: v for k, v in json.loads(ln).items() if k not in VOLATILE}
            for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # tier 2: two short trainings (resume is also covered by test_faults and test_engine)
def test_resumed_run_writes_the_uninterrupted_metrics_record_for_record(tmp_path, capsys):
    common = [*BASE, "--iters", "11", "--eval-every", "5", "--set", "log_every=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run([*common, "--out", str(a)], capsys)[0] == 0
    # stopped in the middle of a logging window (steps 5-8), then two crashes' leftovers: a half-written
    # checkpoint temp file and a torn last line of metrics.jsonl
    assert run([*common, "--out", str(b), "--stop-at", "6"], capsys)[0] == 0
    stale = b / "checkpoints" / ".last.pt.tmp4242"
    stale.write_bytes(b"")
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')
    code, _, err = run(["train", "--out", str(b), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert not stale.exists()
    ra, rb = _records(a), _records(b)
    assert [r.get("step") for r in ra] == [4, 5, 8, 10, 11, 11] and ra == rb


HOLDER = "import sys, time; from nsl.train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); " \
         "print('locked', flush=True); time.sleep(120)"


@pytest.mark.slow  # tier 2 (README: the slow tests)
def test_a_run_directory_has_one_writer(tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "2", "--out", str(out)], capsys)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in ([*BASE, "--iters", "2", "--out", str(out)], ["train", "--out", str(out), "--resume"],
                     [*BASE, "--iters", "2", "--out", str(tmp_path / "other")]):
            code, _, err = run(argv, capsys)
            if "other" in argv[-1]:
                assert code == 0, err  # another directory is not locked
                continue
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
            assert f"is in use by another process (pid {holder.pid} on " in err and "choose another --out" in err
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock is gone with it, the resume goes through
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress", "--iters", "3"], capsys)
    assert code == 0, err


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run([*BASE, "--iters", "1", "--out", str(f)], capsys)
    assert code == 2 and f"--out {f} is a file, expected a folder" in err and "Traceback" not in err
    code, _, err = run([*BASE, "--iters", "1", "--out", str(f / "sub")], capsys)
    assert code == 2 and "cannot create --out" in err and "a part of the path is a file" in err


class _Poisoned(ClassificationTask):
    """Overflows one BN statistic after step 3: the loss stays finite, the state does not."""

    def attach(self, model, optimizer):
        super().attach(model, optimizer)
        self.model = model

    def after_step(self, step):
        super().after_step(step)
        if step == 2:
            bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))


def test_a_diverged_state_is_never_saved_and_never_evaluated(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = make_config("demo", out=str(out), iters=6, batch_size=32, width=4, checkpoint_every=1, log_every=1,
                      progress=False)
    with pytest.raises(TrainingDiverged, match=r"1 parameter or buffer tensor\(s\) became NaN or inf by step 3 "
                                               r"\(first .*running_var\); stopped without saving\. Last good "
                                               r"checkpoint: .*last.pt \(step 2\)"):
        fit(_Poisoned(cfg), cfg, echo=lambda *a, **k: None)
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # a checkpoint that does hold non-finite statistics (an older nsl, a hand edit) is refused by eval and resume
    key = next(k for k in ckpt["model"] if k.endswith("running_var"))
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("inf"))
    torch.save(ckpt, last)
    for argv in (["eval", "--checkpoint", str(last)], ["train", "--out", str(out), "--resume"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert f"checkpoint {last} holds non-finite values (NaN or inf) in 1 tensor(s), first {key}" in err


def test_a_checkpoint_without_meta_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "1", "--out", str(out)], capsys)[0] == 0
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    del ckpt["meta"]
    bad = tmp_path / "nometa.pt"
    torch.save(ckpt, bad)
    code, _, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert code == 2 and f"{bad} is not an nsl training checkpoint" in err and "has no meta entry" in err


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "2", "--out", str(out), "--set", "checkpoint_every=1"], capsys)[0] == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress", "--iters", "4"], capsys)
    assert code == 2 and err.count("\n") == 1 and "inline_container" not in err
    assert "cannot write checkpoint" in err and "no space left on the device?" in err
    assert "keeps its previous content" in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert [p.name for p in (out / "checkpoints").iterdir() if ".tmp" in p.name] == []
