"""Inputs a user can give that used to print tracebacks or be accepted silently (issue 11): each is now one
line naming the file or option and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cli_helpers import run

BASE = ["train", "--dataset", "digits", "--model", "cnn9", "--batch-size", "32", "--test-subset", "60",
        "--no-progress", "--set", "width=4"]


def _one_line(code, err, expected_code=2):
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished conv run and a finished static-full run (2 steps each, digits)."""
    from nsl.cli import main

    root = tmp_path_factory.mktemp("runs")
    for kind in ("conv", "static-full"):
        assert main([*BASE, "--layer", kind, "--iters", "2", "--out", str(root / kind)]) == 0
    return root


def test_a_checkpoint_of_another_kind_or_width_is_named(runs, tmp_path, capsys):
    conv = torch.load(runs / "conv" / "checkpoints" / "last.pt", weights_only=True)
    static = torch.load(runs / "static-full" / "checkpoints" / "last.pt", weights_only=True)
    mixed = dict(conv, config=static["config"])  # weights of one kind, config of another
    bad = tmp_path / "mixed.pt"
    torch.save(mixed, bad)
    err = _one_line(*run(["eval", "--checkpoint", str(bad)], capsys)[::2])
    assert f"checkpoint {bad} does not fit the model its config describes" in err and "missing tensor(s)" in err
    wide = dict(conv, config={**conv["config"], "width": 8})
    torch.save(wide, bad)
    err = _one_line(*run(["eval", "--checkpoint", str(bad)], capsys)[::2])
    assert "tensor(s) of another shape, checkpoint vs model" in err


def test_wrong_types_in_a_checkpoint_or_a_run_config_name_the_file(runs, tmp_path, capsys):
    conv = torch.load(runs / "conv" / "checkpoints" / "last.pt", weights_only=True)
    bad = tmp_path / "eight.pt"
    torch.save(dict(conv, config={**conv["config"], "width": "eight"}), bad)
    err = _one_line(*run(["eval", "--checkpoint", str(bad)], capsys)[::2])
    assert f"{bad}: its saved config is invalid: width must be an integer >= 0" in err and "'eight'" in err
    out = tmp_path / "run"
    assert run([*BASE, "--iters", "1", "--out", str(out)], capsys)[0] == 0
    cfg_path = out / "config.json"
    good = cfg_path.read_text()
    for text, expected in (('{"width": ', "not valid JSON (Expecting value at line 1 column 11)"),
                           ("[1, 2]", "expected a JSON object of config fields, got a JSON list"),
                           (json.dumps({**json.loads(good), "width": "eight"}), "width must be an integer >= 0")):
        cfg_path.write_text(text)
        err = _one_line(*run(["train", "--out", str(out), "--resume", "--iters", "2"], capsys)[::2])
        assert f"{cfg_path}: {expected}" in err, err
    cfg_path.write_text(good)


def test_eval_on_cuda_without_cuda_is_one_line(runs, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _one_line(*run(["eval", "--checkpoint", str(runs / "conv" / "checkpoints" / "last.pt"), "--device",
                          "cuda"], capsys)[::2])
    assert "--device cuda requested but CUDA is not available" in err


def test_subsets_larger_than_the_data_are_refused(tmp_path, capsys):
    err = _one_line(*run([*BASE, "--iters", "1", "--subset", "100000", "--out", str(tmp_path / "a")], capsys)[::2])
    assert "--subset 100000 is larger than the" in err and "samples of the digits training split" in err
    err = _one_line(*run([*BASE, "--test-subset", "9999", "--iters", "1", "--out", str(tmp_path / "b")],
                         capsys)[::2])
    assert "--test-subset 9999 is larger than the" in err


def _folder(root, classes, n=4):
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            px = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")


@pytest.mark.parametrize("train,val,expected", [
    (("cat",), ("cat",), "has 1 class; classification needs at least 2"),
    (("cat", "dog", "owl"), ("cat", "dog"), "does not have the classes of .*train: 1 missing there \\(owl\\)"),
    (("cat", "dog"), ("cat", "emu"), "1 missing there \\(dog\\); 1 not in the training folder \\(emu\\)"),
])
def test_image_folders_with_one_class_or_other_val_classes(tmp_path, capsys, train, val, expected):
    _folder(tmp_path / "tree" / "train", train)
    _folder(tmp_path / "tree" / "val", val)
    err = _one_line(*run(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "tree"), "--iters", "1",
                          "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress",
                          "--set", "num_workers=0", "--set", "image_size=16", "--set", "width=4"], capsys)[::2])
    assert __import__("re").search(expected, err), err


def test_a_training_stream_without_batches_is_an_error_not_a_hang():
    from nsl.data import DatasetError
    from nsl.train import make_config
    from nsl.train.classification import ClassificationTask

    task = ClassificationTask(make_config("demo"))
    task.train_loader = []  # any loader whose epochs yield nothing (the ImageFolder case of issue 11)
    with pytest.raises(DatasetError, match="yields no batch of 64 in an epoch"):
        next(task.batches(0))
    task.train_loader = [("x", "y")]
    stream = task.batches(0)
    assert [next(stream) for _ in range(3)] == [("x", "y")] * 3  # a one-batch epoch is fine
