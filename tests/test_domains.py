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


@pytest.mark.parametrize("config,field,bad", CASES, ids=[f"{c}-{f}-{b!r}" for c, f, b in CASES])
def test_validate_checks_a_changed_field_by_its_domain_alone(config, field, bad):
    # a config changed after it was built is checked again by validate(), with the domain's own message: the
    # domain table is the only range and choice check (no second rule in validate() that could disagree)
    cls, valid = CONFIGS[config]
    cfg = cls.from_dict(valid())
    setattr(cfg, field, bad)
    dom = cls.DOMAINS[field]
    with pytest.raises(ConfigError, match=rf"^unknown {dom.noun} " if dom.noun else rf"^{field} must be "):
        cfg.validate()


def test_seed_takes_every_value_torch_takes():
    top = 2**64 - 1
    assert make_config("paper", seed=top).seed == top
    assert FewShotConfig.from_dict({**FewShotConfig().to_dict(), "seed": top, "val_seed": top}).val_seed == top
    with pytest.raises(ConfigError, match=r"^seed must be an integer from 0 to 2\*\*64 - 1, got 18446744073709551616$"):
        make_config("paper", seed=top + 1)


def _accelerators():
    import torch

    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
            "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "mps", "xpu", "xpu:0"])
def test_every_device_the_domain_accepts_resolves_or_is_refused_as_absent(device):
    # a value the domain accepts either gives that device or says this machine lacks it (never "unknown")
    from nsl.train.run import resolve_device

    assert TrainConfig.DOMAINS["device"].contains(device)
    kind = device.partition(":")[0]
    if device in ("auto", "cpu") or _accelerators()[kind]:
        got = resolve_device(device)
        assert got.type == ("cuda" if device == "auto" and _accelerators()["cuda"] else
                            "cpu" if device == "auto" else kind)
    else:
        with pytest.raises(ConfigError, match=rf"^device {re.escape(device)} requested but {kind.upper()} is not "
                                              "available$"):
            resolve_device(device)


def test_a_device_outside_the_domain_is_refused_by_resolve_device():
    from nsl.train.run import resolve_device

    with pytest.raises(ConfigError, match=r"^device must be auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'$"):
        resolve_device("gpu")


def test_predictor_norm_field():
    assert make_config("paper").predictor_norm == "batch"  # the authors' BatchNorm stays the default
    assert make_config("paper", layer="dynamic-diagonal", predictor_norm="group").predictor_norm == "group"
    with pytest.raises(ConfigError, match=re.escape("predictor_norm must be one of batch, group, none, got 'layer'")):
        make_config("paper", layer="dynamic-diagonal", predictor_norm="layer")
    with pytest.raises(ConfigError, match=re.escape("predictor_norm='group' applies to layer kinds with a predictor")):
        make_config("paper", layer="conv", predictor_norm="group")
    with pytest.raises(ConfigError, match=re.escape("predictor_norm must be one of batch, group, none")):
        FewShotConfig.from_dict({"predictor_norm": "bn"})
