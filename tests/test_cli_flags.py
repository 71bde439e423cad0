"""Command-line flags are derived from the config fields: one table per command, typed and checked by the
fields' domains, so a flag and ``--set`` refuse a value with the same message."""

from __future__ import annotations

import dataclasses

import pytest

from nsl._cli_utils import FEWSHOT_TRAIN_FLAGS, FIELD_FLAGS, TRAIN_FLAGS, TRAIN_LENGTH_FLAGS
from nsl.cli import build_parser, main
from nsl.fewshot import FewShotConfig
from nsl.train import TrainConfig

TABLES = {"train": (TrainConfig, (*TRAIN_FLAGS, *TRAIN_LENGTH_FLAGS)), "fewshot train": (FewShotConfig,
                                                                                          FEWSHOT_TRAIN_FLAGS)}


@pytest.mark.parametrize("command", list(TABLES))
def test_every_flag_names_a_field_and_the_parser_stores_it_there(command):
    cls, flags = TABLES[command]
    names = {f.name for f in dataclasses.fields(cls)}
    parser = build_parser()
    for f in flags:
        assert f.field in names and FIELD_FLAGS[f.field] == f.flag
        args = parser.parse_args([*command.split(), "--out", "o"])
        assert getattr(args, f.field) is None or f.field == "out"  # not given: None, so the config's default holds


@pytest.mark.parametrize("command,flag,value,field", [("train", "--iters", "0", "iters"),
                                                      ("train", "--seed", "-1", "seed"),
                                                      ("train", "--subset", "-3", "train_subset"),
                                                      ("fewshot train", "--ways", "1", "ways"),
                                                      ("fewshot train", "--val-every", "-1", "val_every")])
def test_a_flag_and_set_refuse_a_value_with_the_same_message(capsys, tmp_path, command, flag, value, field):
    base = [*command.split(), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*base, flag, value]) == 2
    by_flag = capsys.readouterr().err.strip().splitlines()
    assert main([*base, "--set", f"{field}={value}"]) == 2
    by_set = capsys.readouterr().err.strip().splitlines()
    assert len(by_flag) == len(by_set) == 1
    assert by_flag[0].startswith(f"nsl {command}: error: {flag} must be ")
    assert by_flag[0] == by_set[0]
    assert not (tmp_path / "run").exists()


def test_a_mistyped_flag_value_is_an_argparse_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fewshot", "train", "--out", "x", "--seed", "abc"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("nsl fewshot train: error: argument --seed: expected "
                                                                "an integer, got 'abc'")
