"""No command prints a traceback: errors from DataLoader workers and unexpected exceptions become one line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import nsl.cli
from cli_helpers import run
from nsl._cli_utils import one_line
from nsl.data import DatasetError


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DatasetError(f"cannot decode image /data/{i}.png (OSError: truncated)")


def test_one_line_keeps_the_original_message_of_a_worker_error():
    loader = torch.utils.data.DataLoader(_Broken(), batch_size=2, num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what PyTorch re-raises: the worker's whole traceback
    assert one_line(str(info.value)) == "cannot decode image /data/0.png (OSError: truncated)"
    assert one_line("first\nsecond\nthird") == "first (+2 more line(s))"
    assert one_line("plain") == "plain"


def test_a_corrupt_image_read_by_a_worker_is_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(4):
                px = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "tree" / split / c / f"{i}.png")
    bad = tmp_path / "tree" / "train" / "cat" / "9.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "tree"), "--model", "cnn9",
                        "--out", str(tmp_path / "run"), "--iters", "4", "--batch-size", "9", "--no-progress",
                        "--set", "num_workers=1", "--set", "image_size=16", "--set", "width=4"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "Traceback" not in err and f"cannot decode image {bad}" in err


def test_an_unexpected_exception_is_one_line_unless_asked(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("something deep failed\n  at frame 1\n  at frame 2")

    monkeypatch.setattr(nsl.cli, "build_parser", _parser_with(boom))
    code, _, err = run(["eval", "--checkpoint", str(tmp_path / "x.pt")], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("nsl eval: error: something deep failed (+2 more line(s)) (unexpected RuntimeError; "
                          "set NSL_TRACEBACK=1")
    monkeypatch.setenv("NSL_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something deep failed"):
        nsl.cli.main(["eval", "--checkpoint", str(tmp_path / "x.pt")])


def _parser_with(func):
    build = nsl.cli.build_parser

    def parser():
        p = build()
        sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        sub.choices["eval"].set_defaults(func=func)
        return p
    return parser
