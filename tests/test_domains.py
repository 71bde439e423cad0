"""Every configuration field has a checked domain, checked in one place for every source of values."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from nsl.fewshot import FewShotConfig
from nsl.train import TrainConfig
from nsl.train.config import ConfigError, apply_overrides, make_config
from nsl.train.domains import Domain, check_domains


def _bad_values(dom: Domain) -> list:
    """Values outside ``dom``, derived from the domain itself (so every field is probed, not examples)."""
    bad = [] if dom.optional else [None]
    if dom.choices is not None:
        return bad + ["no-such-choice", 3]
    if dom.kind == "bool":
        return bad + ["yes", 1]
    if dom.kind in ("int", "float"):
        bad += ["eight", True, [1]]
        if dom.kind == "int":
            bad.append(1.5)
        else:
            bad += [math.nan, math.inf]
        if dom.lo is not None:
            bad.append(dom.lo if dom.lo_open else dom.lo - 1)
        if dom.hi is not None:
            bad.append(dom.hi if dom.hi_open else dom.hi + 1)
        return [b for b in bad if not any(type(b) is type(a) and b == a for a in dom.also)]
    if dom.kind == "str":
        return bad + [3, ""] if dom.pattern else bad + [3]
    if dom.kind == "floats":
        bad += ["0.5", [math.nan]]
        if dom.increasing:
            bad.append([0.5, 0.2])
        if dom.hi is not None:
            bad.append([dom.hi + 1])
        return bad
    if dom.kind == "dict":
        return bad + [[1], "x"]
    raise AssertionError(dom.kind)


CONFIGS = {"train": (TrainConfig, lambda: make_config("paper").to_dict()),
           "fewshot": (FewShotConfig, lambda: FewShotConfig().to_dict())}
CASES = [(name, f.name, bad) for name, (cls, _) in CONFIGS.items() for f in dataclasses.fields(cls)
         for bad in _bad_values(cls.DOMAINS[f.name])]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_field_has_a_domain_and_the_defaults_lie_in_it(config):
    cls, valid = CONFIGS[config]
    assert set(cls.DOMAINS) == {f.name for f in dataclasses.fields(cls)}
    check_domains(cls.from_dict(valid()))


@pytest.mark.parametrize("config,field,bad", CASES, ids=[f"{c}-{f}-{b!r}" for c, f, b in CASES])
def test_a_value_outside_its_domain_is_refused_naming_the_field(config, field, bad):
    cls, valid = CONFIGS[config]
    d = valid()
    d[field] = bad
    shown = tuple(bad) if isinstance(bad, list) and isinstance(getattr(cls(), field), tuple) else bad
    dom = cls.DOMAINS[field]
    expected = rf"^unknown {dom.noun} {re.escape(repr(shown))}; valid {dom.plural}: " if dom.noun \
        else rf"^{field} must be .*, got {re.escape(repr(shown))}$"
    with pytest.raises(ConfigError, match=expected):
        cls.from_dict(d)  # the path of config.json, protocols (make_config) and the CLI flags


@pytest.mark.parametrize("pair", ["grad_clip=-1", "lr_gamma=-0.1", "weight_decay=-1e-4", "protocol=bogus",
                                  "momentum=1.5", "bn_momentum=0", "label_smoothing=1", "lr_milestones=0.7,0.3",
                                  "layer=dyn", "device=gpu", "compile=sometimes", "seed=-1"])
def test_set_overrides_are_checked_by_the_same_domains(pair):
    key = pair.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^({key} must be |unknown (protocol|layer kind) )"):
        apply_overrides(make_config("paper"), [pair])


def test_protocol_overrides_and_fewshot_episodes_are_checked():
    with pytest.raises(ConfigError, match="^grad_clip must be a finite number >= 0"):
        make_config("fast", grad_clip=-0.5)
    with pytest.raises(ConfigError, match=r"^ways must be an integer >= 2 \(a 1-way episode"):
        FewShotConfig.from_dict({**FewShotConfig().to_dict(), "ways": 1})
    with pytest.raises(ConfigError, match=r"^train_ways must be 0 \(same as ways\) or an integer >= 2, got 1$"):
        apply_overrides(FewShotConfig(), ["train_ways=1"])


def test_domain_normalises_before_checking():
    cfg = FewShotConfig.from_dict({**FewShotConfig().to_dict(), "dataset": "CIFAR_FS"})
    assert cfg.dataset == "cifar-fs"


def test_predictor_norm_field():
    assert make_config("paper").predictor_norm == "batch"  # the authors' BatchNorm stays the default
    assert make_config("paper", layer="dynamic-diagonal", predictor_norm="group").predictor_norm == "group"
    with pytest.raises(ConfigError, match=re.escape("predictor_norm must be one of batch, group, none, got 'layer'")):
        make_config("paper", layer="dynamic-diagonal", predictor_norm="layer")
    with pytest.raises(ConfigError, match=re.escape("predictor_norm='group' applies to layer kinds with a predictor")):
        make_config("paper", layer="conv", predictor_norm="group")
    with pytest.raises(ConfigError, match=re.escape("predictor_norm must be one of batch, group, none")):
        FewShotConfig.from_dict({"predictor_norm": "bn"})
