"""Issue 27, part 5: faults of a third audit, each with a real file, process or signal where the fault is one.

* A resumed run does what its config says: a changed ``weight_decay``, ``momentum`` or ``nesterov`` reaches
  the restored optimizer (and the recorded config is what ran); another optimizer is refused in one line.
* What a checkpoint claims is checked in one place (format version, step counter, the fields a resume reads):
  eval, export, resume and few-shot eval refuse a tampered file with one line naming the file and the field.
* A checkpoint (or config) path that is not a regular file (a named pipe, a device) fails at once, never hangs.
* ``nsl doctor`` checks the kernel cache folder a build needs.
* A termination signal during ``nsl export`` (and any non-training command) leaves no temporary file.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import run, subprocess_env
from nsl import _build, _cpp, doctor
from nsl._cli_utils import Terminated, terminate_by_exception
from nsl.train import CheckpointError, load_checkpoint

BASE = ["train", "--dataset", "digits", "--model", "cnn9", "--layer", "conv", "--batch-size", "32", "--seed", "1",
        "--test-subset", "60", "--no-progress", "--set", "width=4"]
NSL = [sys.executable, "-m", "nsl.cli"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 4-step conv run on digits (protocol paper: SGD, momentum 0.9, weight decay 5e-4)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    from nsl.cli import main

    assert main([*BASE, "--iters", "4", "--out", str(out)]) == 0
    return out


def _tampered(src: Path, dst: Path, **changes) -> Path:
    """``src``'s checkpoint with entries replaced (``None``: removed), saved as ``dst``."""
    ckpt = torch.load(src, weights_only=True)
    for k, v in changes.items():
        if v is None:
            ckpt.pop(k, None)
        else:
            ckpt[k] = v
    torch.save(ckpt, dst)
    return dst


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- a resumed run does what its config says ----------------------------------------------------------------------
def test_a_resumed_run_applies_changed_optimizer_settings_and_records_what_ran(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*BASE, "--iters", "6", "--out", str(out)]
    assert run([*common, "--stop-at", "3"], capsys)[0] == 0
    groups = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["name"], g["weight_decay"], g["momentum"], g["nesterov"]) for g in groups} == {
        ("default", 5e-4, 0.9, False)}
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress", "--set", "weight_decay=0.05",
                        "--set", "momentum=0.5", "--set", "nesterov=true"], capsys)
    assert code == 0, err
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    ran = {(g["name"], g["weight_decay"], g["momentum"], g["nesterov"]) for g in ckpt["optimizer"]["param_groups"]}
    assert ran == {("default", 0.05, 0.5, True)}  # the optimizer that ran its last steps
    recorded = json.loads((out / "config.json").read_text())
    for cfg in (recorded, ckpt["config"]):  # the recorded config is what ran
        assert (cfg["weight_decay"], cfg["momentum"], cfg["nesterov"]) == (0.05, 0.5, True)
    assert ckpt["optimizer"]["state"], "the momentum buffers were restored, not dropped"


def test_resuming_with_another_optimizer_is_refused_in_one_line(run_dir, tmp_path, capsys):
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--no-progress", "--set", "optimizer=adam"],
                       capsys)
    assert code == 2
    assert "cannot resume with different optimizer (run: 'sgd', now: 'adam')" in _one_error_line(err)


def test_an_optimizer_state_of_other_groups_is_refused_naming_the_file(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "4", "--stop-at", "2", "--out", str(out)], capsys)[0] == 0
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    group["params"] = group["params"][:-1]  # an edit (or another model's state): a group one tensor short
    torch.save(ckpt, last)
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2
    assert re.search(rf"checkpoint {re.escape(str(last))}: its optimizer's parameter groups .* are not this run's",
                     _one_error_line(err))


# -- what a checkpoint claims: one check, for every reader ----------------------------------------------------------
TAMPERED = {
    "future version": ({"version": 99}, "format version 99 is unknown to this nsl, which reads version 1 "
                                        "(written by a newer nsl?)"),
    "no version": ({"version": None}, "'version' is missing"),
    "negative step": ({"step": -3}, "'step' is -3, expected an integer >= 0"),
    "no step": ({"step": None}, "'step' is missing (expected an integer >= 0)"),
    "step of another type": ({"step": "12"}, "'step' is '12', expected an integer >= 0"),
}


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_eval_export_and_viz_refuse_a_tampered_checkpoint_naming_file_and_field(case, run_dir, tmp_path, capsys):
    changes, expected = TAMPERED[case]
    bad = _tampered(run_dir / "checkpoints" / "last.pt", tmp_path / "bad.pt", **changes)
    for argv in (["eval", "--checkpoint", str(bad)],
                 ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "m.onnx")],
                 ["viz", "--checkpoint", str(bad), "--out", str(tmp_path / "figs")]):
        code, _, err = run(argv, capsys)
        line = _one_error_line(err)
        assert code == 2 and str(bad) in line and expected in line, (argv[0], line)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("case", ["future version", "negative step", "no step"])
def test_resume_refuses_a_tampered_last_checkpoint(case, tmp_path, capsys):
    changes, expected = TAMPERED[case]
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "4", "--stop-at", "2", "--out", str(out)], capsys)[0] == 0
    last = out / "checkpoints" / "last.pt"
    _tampered(last, last, **changes)
    before = (out / "metrics.jsonl").read_text()
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(last) in line and expected in line, line
    assert (out / "metrics.jsonl").read_text() == before  # nothing was trained or dropped


@pytest.mark.parametrize("field,value,expected", [
    ("iters", 1, "'step' is 2, past the run's length iters=1"),
    ("best_step", 7, "'best_step' is 7, after the checkpoint's step 2"),
    ("world_size", 0, "'world_size' is 0, expected an integer >= 1"),
    ("rng", None, "'rng' is missing (expected a dict)"),
    ("optimizer", [1, 2], "'optimizer' is a list of 2 entries, expected a dict"),
    ("best_acc", "high", "'best_acc' is 'high', expected a number"),
])
def test_resume_checks_every_field_it_restores(field, value, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "4", "--stop-at", "2", "--out", str(out)], capsys)[0] == 0
    last = out / "checkpoints" / "last.pt"
    _tampered(last, last, **{field: value})
    code, _, err = run(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    line = _one_error_line(err)
    assert code == 2 and f"checkpoint {last}: {expected}" in line, line


def _fewshot_checkpoint(path: Path, **changes) -> Path:
    from nsl.fewshot.train import CHECKPOINT_FORMAT, FewShotConfig, build_fewshot_model

    cfg = FewShotConfig(dataset="omniglot", backbone="conv4", layer="conv")
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "episode": 5, "config": cfg.to_dict(),
            "meta": {"in_channels": 1, "image_size": 28}, "model": build_fewshot_model(cfg, 1, 28).state_dict()}
    ckpt.update(changes)
    torch.save({k: v for k, v in ckpt.items() if v is not None}, path)
    return path


@pytest.mark.parametrize("changes,expected", [
    ({"version": 2}, "format version 2 is unknown to this nsl"),
    ({"episode": -1}, "'episode' is -1, expected an integer >= 0"),
    ({"episode": None}, "'episode' is missing"),
])
def test_fewshot_readers_check_the_same_fields_with_their_counter(changes, expected, tmp_path, capsys):
    from nsl.fewshot.train import load_fewshot_checkpoint

    good = _fewshot_checkpoint(tmp_path / "good.pt")
    assert load_fewshot_checkpoint(good)["episode"] == 5
    bad = _fewshot_checkpoint(tmp_path / "bad.pt", **changes)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_fewshot_checkpoint(bad)
    for argv in (["fewshot", "eval", "--checkpoint", str(bad), "--no-progress"],
                 ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "fs.onnx")]):
        code, _, err = run(argv, capsys)
        line = _one_error_line(err)
        assert code == 2 and str(bad) in line and expected in line, (argv[0], line)


# -- paths that are not regular files --------------------------------------------------------------------------
def test_a_named_pipe_checkpoint_is_refused_at_once_not_waited_on(tmp_path):
    """In process, with a real FIFO: the reader runs in a thread; if it blocks, the test opens the pipe for
    writing (which releases it) and fails."""
    fifo = tmp_path / "best.pt"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            load_checkpoint(fifo)
        except CheckpointError as e:
            result["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # lets the blocked reader go
        t.join(10)
        pytest.fail("load_checkpoint waited on a named pipe")
    assert result["error"] == f"checkpoint {fifo} is a named pipe (FIFO), not a regular file"


def test_a_device_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape("checkpoint /dev/zero is a character device, not a regular "
                                                        "file")):
        load_checkpoint("/dev/zero")


def _nsl(argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*NSL, *argv], capture_output=True, text=True, timeout=timeout, env=subprocess_env())


@pytest.mark.slow  # real nsl processes
def test_commands_given_a_named_pipe_fail_at_once(run_dir, tmp_path):
    """A real FIFO where a checkpoint or a run's files are: each command ends with one line, never hangs (the
    timeout would fail the test); ``--resume`` does so while it holds the run lock, which it then releases."""
    fifo = tmp_path / "ck.pt"
    os.mkfifo(fifo)
    for argv in (["eval", "--checkpoint", str(fifo)],
                 ["export", "--checkpoint", str(fifo), "--out", str(tmp_path / "m.onnx")],
                 ["fewshot", "eval", "--checkpoint", str(fifo), "--no-progress"]):
        res = _nsl(argv)
        assert res.returncode == 2, res.stderr
        assert f"{fifo} is a named pipe (FIFO), not a regular file" in _one_error_line(res.stderr)
    for name in ("checkpoints/last.pt", "config.json"):
        out = tmp_path / f"run-{name.replace('/', '-')}"
        assert run_dir.is_dir()
        subprocess.run(["cp", "-r", str(run_dir), str(out)], check=True)
        (out / name).unlink()
        os.mkfifo(out / name)
        res = _nsl(["train", "--out", str(out), "--resume", "--no-progress"])
        assert res.returncode == 2, res.stderr
        assert f"{out / name} is a named pipe (FIFO), not a regular file" in _one_error_line(res.stderr)
        again = _nsl(["train", "--out", str(out), "--resume", "--no-progress"])  # the lock was released
        assert "is in use by another process" not in again.stderr


# -- nsl doctor checks what a build needs ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["root", "below"])
def test_doctor_reports_a_file_where_the_kernel_cache_folder_must_be(where, tmp_path, monkeypatch):
    blocker = tmp_path / "ext"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NSL_EXTENSIONS_DIR", str(blocker if where == "root" else blocker / "sub"))
    monkeypatch.delenv("NSL_DISABLE_CPP", raising=False)
    for build in (False, True):
        out = io.StringIO()
        assert doctor.doctor(build=build, out=out) == 1
        text = out.getvalue()
        assert f"unusable: {blocker} is a regular file, where a folder is needed" in text, text
        assert "all fine" not in text and "problems found" in text
        if build:
            assert "--build: skipped, nothing was compiled: the kernel cache cannot be used" in text
    assert blocker.read_text() == "not a folder"


def test_an_unusable_kernel_cache_falls_back_saying_why_without_compiling(tmp_path, monkeypatch):
    blocker = tmp_path / "ext"
    blocker.write_text("")
    monkeypatch.setenv("NSL_EXTENSIONS_DIR", str(blocker))
    spec = _cpp._spec()
    with pytest.raises(_build.BuildUnavailable, match=re.escape(f"the kernel cache cannot be used: {blocker} is a "
                                                                "regular file")):
        _build.load_or_build(spec)
    assert _build.cache_problem(tmp_path / "new" / "folder") is None  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()


# -- termination signals leave no temporary files ----------------------------------------------------------------
def test_a_termination_signal_raises_through_finally_blocks(tmp_path):
    """A real SIGTERM to this process inside ``terminate_by_exception``: the ``finally`` of an atomic write runs."""
    from nsl.train.rundir import write_atomically

    target = tmp_path / "f.txt"

    def write(f):
        f.write("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="stopped by SIGTERM"), terminate_by_exception():
        write_atomically(target, write)
    assert signal.getsignal(signal.SIGTERM) is before
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary file


def test_export_removes_its_temporary_file_on_a_termination_signal(tmp_path, monkeypatch):
    from nsl.export import export_module

    seen = []

    def fake_export(module, args, f, **kw):
        Path(f).write_bytes(b"partial")
        seen.append(Path(f))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.raises(Terminated), terminate_by_exception():
        export_module(torch.nn.Conv2d(1, 2, 3), tmp_path / "m.onnx", (2, 1, 8, 8))
    assert seen and seen[0].name.startswith(".m.onnx.tmp")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a real nsl export process and a real SIGTERM
def test_sigterm_during_nsl_export_leaves_no_hidden_temporary_file(run_dir, tmp_path):
    pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install 'nsl[onnx]')")
    out = tmp_path / "m.onnx"
    # a large check batch: the onnxruntime comparison keeps the temporary file in place for a while
    proc = subprocess.Popen([*NSL, "export", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--out",
                             str(out), "--batch", "6000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env())
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".m.onnx.tmp") for p in tmp_path.iterdir()):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode == 0:
        pytest.fail(f"the export ended before its temporary file was seen: {err}")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert _one_error_line(err) == "nsl export: error: stopped by SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a temporary (or half) file was left"
