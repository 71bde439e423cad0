"""The checked domain of every configuration field, in one place.

Each field of :class:`~nsl.train.TrainConfig` and :class:`~nsl.fewshot.FewShotConfig` has a
:class:`Domain`: its type and its range or choices. The configs check every field against its domain
whenever one is built (``from_dict``: command-line flags, ``--set``, protocols and a saved
``config.json`` all pass through it), so a value outside its domain is refused with a message naming
the field, whatever its source. Rules between fields (``shape_warmup <= shape_freeze``, a model that
takes no ``width``, ...) stay in the configs' ``validate`` methods.

A domain accepts exactly its type: booleans are not integers, integers are accepted for floats, and
numbers must be finite. Each config class names its table in the class attribute ``DOMAINS``
(:data:`TRAIN_DOMAINS` here, ``nsl.fewshot.domains.FEWSHOT_DOMAINS`` for few-shot; both start from
:data:`ENGINE_DOMAINS`), and :func:`check_domains` refuses a field without an entry, so a new field
cannot go unchecked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

__all__ = ["Domain", "TRAIN_DOMAINS", "ENGINE_DOMAINS", "check_domains", "ConfigError", "AMP_MODES", "COMPILE_MODES"]


class ConfigError(ValueError):
    """An invalid configuration value or an unknown configuration key.

    ``fields`` are the configuration fields (or arguments of the call, such as ``resume``) that the
    message names, each written ``{name}`` in ``message``. ``str(error)`` names them as fields; a front
    end names them its own way with :meth:`render` (the command line: by its flags, e.g. ``--data-dir``).
    """

    def __init__(self, message: str, *fields: str):
        self.template, self.fields = message, fields
        super().__init__(self.render())

    def render(self, name=lambda field: field) -> str:
        """The message with each field ``f`` of :attr:`fields` written as ``name(f)``."""
        text = self.template
        for f in self.fields:
            text = text.replace("{" + f + "}", name(f))
        return text


#: values of the configs' ``amp``
AMP_MODES = ("none", "bf16", "fp16", "auto")
#: values of the configs' ``compile``: ``none`` or a ``torch.compile`` mode (``default`` is torch's default mode)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
_COMPILE_ALIASES = {True: "default", False: "none", "true": "default", "false": "none", "yes": "default",
                    "no": "none", "on": "default", "off": "none", "1": "default", "0": "none"}


@dataclass(frozen=True)
class Domain:
    """A field's domain.

    ``kind``: ``bool``, ``int``, ``float``, ``str``, ``floats`` (a list/tuple of numbers) or ``dict``.
    ``lo``/``hi``: bounds for numbers (and for every item of ``floats``), open where ``lo_open``/``hi_open``.
    ``choices``: allowed values, or a callable returning them (read when checked: registries of models,
    layer kinds and datasets live in other modules). ``optional``: ``None`` allowed. ``also``: extra
    allowed values outside the range (e.g. ``0`` meaning "off"). ``pattern``: a regular expression a
    string must match in full. ``increasing``: ``floats`` strictly increasing. ``text``: how the domain
    reads in messages (derived when empty). ``normalize``: applied to a value before it is checked
    (the normalised value is stored). ``noun``/``plural``: a choice outside its registry reads
    "unknown NOUN 'x'; valid PLURAL: a, b" (registries of models, layer kinds, datasets).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | Callable[[], Iterable] | None = None
    optional: bool = False
    also: tuple = ()
    pattern: str | None = None
    increasing: bool = False
    text: str = ""
    normalize: Callable | None = None
    noun: str = ""
    plural: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self._choices()))
        parts = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
                 "floats": "a list of finite numbers", "dict": "a JSON object"}[self.kind]
        rng = []
        if self.lo is not None:
            rng.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            rng.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        if rng:
            parts += " " + " and ".join(rng)
        if self.also:
            parts += " (or " + ", ".join(map(str, self.also)) + ")"
        if self.optional:
            parts += ", or null"
        return parts

    def _choices(self) -> tuple:
        c = self.choices() if callable(self.choices) else self.choices
        return tuple(c)

    def _number_ok(self, v) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def contains(self, v) -> bool:
        """True when ``v`` lies in the domain."""
        if v is None:
            return self.optional
        if any(type(v) is type(a) and v == a for a in self.also):
            return True
        if self.choices is not None:
            return type(v) is str and v in self._choices()
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "int":
            return isinstance(v, int) and not isinstance(v, bool) and self._number_ok(v)
        if self.kind == "float":
            return isinstance(v, int | float) and not isinstance(v, bool) and self._number_ok(float(v))
        if self.kind == "str":
            return isinstance(v, str) and (self.pattern is None or re.fullmatch(self.pattern, v) is not None)
        if self.kind == "floats":
            if not isinstance(v, list | tuple):
                return False
            ok = all(isinstance(x, int | float) and not isinstance(x, bool) and self._number_ok(float(x)) for x in v)
            return ok and (not self.increasing or all(a < b for a, b in zip(v, v[1:])))
        if self.kind == "dict":
            return isinstance(v, dict)
        raise ValueError(f"unknown domain kind {self.kind!r}")


def boolean():
    return Domain("bool")


def integer(lo=None, **kw):
    return Domain("int", lo=lo, **kw)


def number(lo=None, hi=None, **kw):
    return Domain("float", lo=lo, hi=hi, **kw)


def choice(choices, **kw):
    return Domain("str", choices=choices, **kw)


def _models():
    from ..models import MODELS
    return MODELS


def layer_kinds():
    from ..models import LAYER_KINDS
    return LAYER_KINDS


def _predictor_norms():
    from ..layers import PREDICTOR_NORMS
    return PREDICTOR_NORMS


def _datasets():
    from ..data import DATASETS
    return tuple(DATASETS)


def _dataset_name(name):
    """A dataset's registered name for one of its aliases (``CIFAR-10`` -> ``cifar10``); others unchanged."""
    from ..data import _ALIASES

    if not isinstance(name, str):
        return name
    return _ALIASES.get(name.lower(), name.lower())


def _protocols():
    from .protocols import PROTOCOLS
    return tuple(PROTOCOLS)


def _compile_alias(v):
    try:
        return _COMPILE_ALIASES.get(v.lower() if isinstance(v, str) else v, v)
    except TypeError:  # unhashable: left for the domain check to refuse
        return v


_DEVICE = r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?"
PATH = Domain("str", optional=True, pattern=r"(?s).+", text="a path, or null")
#: random seeds: what torch.manual_seed takes (a 64-bit unsigned integer)
SEED = integer(0, hi=2**64 - 1, text="an integer from 0 to 2**64 - 1")
#: the predictors' normalisation (``nsl.layers.PREDICTOR_NORMS``), shared by the training and few-shot configs
PREDICTOR_NORM = choice(_predictor_norms)

#: fields every run configuration has (read by the training engine)
ENGINE_DOMAINS: dict[str, Domain] = {
    "out": PATH,
    "seed": SEED,
    "device": Domain("str", pattern=_DEVICE, text="auto, cpu, cuda, cuda:N, mps or xpu"),
    "progress": boolean(),
    "log_every": integer(0),
    "checkpoint_every": integer(0),
    "grad_clip": number(0, text="a finite number >= 0 (0: off)"),
    "amp": choice(AMP_MODES),
    "stop_at": integer(0),
    "compile": Domain("str", choices=COMPILE_MODES,
                      normalize=lambda v: _compile_alias(v),
                      text="one of none, default, reduce-overhead, max-autotune (true/false: default/none)"),
    "compile_backend": Domain("str", pattern=r"[A-Za-z_][\w.\-]*", text="the name of a torch.compile backend"),
    "extra": Domain("dict"),
}

TRAIN_DOMAINS: dict[str, Domain] = {
    **ENGINE_DOMAINS,
    "protocol": choice(_protocols, noun="protocol", plural="protocols"),
    "dataset": choice(_datasets, noun="dataset", plural="names", normalize=_dataset_name),
    "data_dir": PATH,
    "model": choice(_models, noun="model", plural="models"),
    "layer": choice(layer_kinds, noun="layer kind", plural="kinds"),
    "width": integer(0, text="an integer >= 0 (0: the model's own)"),
    "predictor_stride": integer(0, hi=2, text="0, 1 or 2 (2: the predictor on a half-resolution grid; 0: one g per "
                                             "image, from the globally pooled input)"),
    "share_prediction": boolean(),
    "paper_init": boolean(),
    "train_subset": integer(0, text="an integer >= 0 (0: all)"),
    "test_subset": integer(0, text="an integer >= 0 (0: all)"),
    "iters": integer(1, optional=True),
    "epochs": number(0, lo_open=True, optional=True),
    "batch_size": integer(1),
    "optimizer": choice(("sgd", "adam", "adamw")),
    "lr": number(0, lo_open=True),
    "momentum": number(0, 1, hi_open=True),
    "nesterov": boolean(),
    "weight_decay": number(0),
    "decay_bn": boolean(),
    "wd_static_diagonal": number(0),
    "wd_static_full": number(0),
    "schedule": choice(("multistep", "cosine", "onecycle", "constant")),
    "lr_milestones": Domain("floats", lo=0, hi=1, lo_open=True, hi_open=True, increasing=True,
                            text="increasing fractions of the run, each in (0, 1)"),
    "lr_gamma": number(0, 1, lo_open=True),
    "warmup_iters": integer(0),
    "onecycle_pct": number(0, 1, lo_open=True, hi_open=True),
    "label_smoothing": number(0, 1, hi_open=True),
    "orthogonality": number(0),
    "shape_active": integer(0, text="an integer >= 0 (0: no kernel shape)"),
    "shape_method": choice(("learned", "magnitude")),
    "shape_start": number(0, 1, hi_open=True),
    "shape_warmup": number(0, 1, hi_open=True),
    "shape_freeze": number(0, 1, hi_open=True),
    "shape_weight": number(0),
    "shape_lr": number(0, lo_open=True),
    "shape_per_filter": boolean(),
    "input": choice(("raw", "unit", "normalize")),
    "augment": boolean(),
    "pad": integer(0),
    "flip": boolean(),
    "bn_momentum": number(0, 1, lo_open=True),
    "bn_eps": number(0, lo_open=True),
    "bn_zero_init": boolean(),
    "bn_recalibrate": integer(0),
    "channels_last": boolean(),
    "eval_every": integer(0, text="an integer >= 0 (0: only at the end)"),
    "eval_batch_size": integer(1),
    "num_workers": integer(0),
    "image_size": integer(8),
    "predictor_width": integer(0, text="an integer >= 0 (0: the predictor's own width)"),
    "share_predictor": boolean(),
    "predictor_norm": PREDICTOR_NORM,
    "bias": boolean(),
}

def check_domains(cfg) -> None:
    """Check every field of config dataclass ``cfg`` against ``type(cfg).DOMAINS``.

    Raises :class:`~nsl.train.ConfigError` naming the first field outside its domain (a field with no
    entry in the table is an error too: a new field cannot go unchecked). Values are normalised first
    where the domain says how (e.g. dataset names to lower case)."""
    table = type(cfg).DOMAINS
    for f in fields(cfg):
        dom = table.get(f.name)
        if dom is None:
            raise ConfigError(f"{{{f.name}}} has no checked domain (add it to {type(cfg).__name__}.DOMAINS)", f.name)
        v = getattr(cfg, f.name)
        if dom.normalize is not None and v is not None:
            v = dom.normalize(v)
            setattr(cfg, f.name, v)
        if not dom.contains(v):
            if dom.noun:
                raise ConfigError(f"unknown {dom.noun} {v!r}; valid {dom.plural}: "
                                  f"{', '.join(map(str, dom._choices()))}", f.name)
            raise ConfigError(f"{{{f.name}}} must be {dom.describe()}, got {v!r}", f.name)
