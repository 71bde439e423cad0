"""Training configurations: one dataclass, :class:`TrainConfig`, and named protocols.

``paper`` is the authors' CIFAR protocol (method notes ``nsl-method.md``, section 6, from the
authors' TensorFlow code wy1iu/NSL); ``fast`` is a modern short schedule for CPU-budget runs;
``paper-attention`` is the authors' protocol of their global-neural-similarity model
``sphere-attention`` (method notes, section 5; ``nsl_global_ns/train_sa.py``).
Every field can be overridden (``nsl train --set key=value``); the resolved configuration is
written to ``RUN_DIR/config.json``, so every departure from the authors' protocol is on record.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields

from .domains import AMP_MODES, COMPILE_MODES, TRAIN_DOMAINS, ConfigError, check_domains
from .protocols import PAPER_ITERS, PAPER_MILESTONES, PROTOCOLS

__all__ = ["TrainConfig", "ConfigBase", "PROTOCOLS", "make_config", "apply_overrides", "parse_value",
           "ConfigError", "check_keys", "AMP_MODES", "COMPILE_MODES"]






def check_keys(config_cls, d: dict) -> None:
    """Raise ConfigError naming the keys of ``d`` that are not fields of the dataclass ``config_cls``."""
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")




class ConfigBase:
    """What every run configuration shares: (de)serialisation and the settings of the engine.

    A subclass is a dataclass; :func:`nsl.train.fit` reads these of its fields: ``out``, ``seed``,
    ``device``, ``progress``, ``log_every``, ``checkpoint_every``, ``grad_clip``, ``amp``, ``stop_at``,
    ``compile`` and ``compile_backend`` (checked, and ``compile``'s true/false aliases normalised, by
    their domains in :mod:`nsl.train.domains`).
    """

    #: the checked domain of every field (:mod:`nsl.train.domains`); each subclass names its table
    DOMAINS: dict = {}

    def __post_init__(self) -> None:
        # every config that exists has each field in its domain, whatever built it (flags, --set, a protocol,
        # a config.json, Python); the rules between fields are checked by validate()
        check_domains(self)

    def to_dict(self) -> dict:
        """The fields as plain JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        """A validated config from ``to_dict()``'s output (unknown keys rejected; missing ones take defaults)."""
        check_keys(cls, d)
        d = dict(d)
        for f in fields(cls):
            if isinstance(f.default, tuple) and isinstance(d.get(f.name), list):
                d[f.name] = tuple(d[f.name])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field against its domain (:mod:`nsl.train.domains`, the one place for ranges and
        choices) and then the rules between fields; raise :class:`ConfigError` naming the field."""
        check_domains(self)


@dataclass
class TrainConfig(ConfigBase):
    """Everything a training run depends on. Defaults are the ``paper`` protocol.

    Run: ``dataset``, ``data_dir``, ``model``, ``layer``, ``out`` (run directory), ``seed``,
    ``device`` (``auto``: CUDA when available).

    Length: ``iters`` (optimizer steps) or ``epochs`` (converted to steps with the epoch length
    of the training loader); ``iters`` wins when both are set. ``stop_at``: stop after this many
    steps with a checkpoint, exactly as if interrupted (resume continues the same run).
    """

    DOMAINS = TRAIN_DOMAINS

    protocol: str = "paper"
    # data and model
    dataset: str = "cifar10"
    data_dir: str | None = None
    model: str = "cnn9"
    layer: str = "conv"
    width: int = 0  # channels of the first stage; 0: the model's own (cnn9: 32 as the authors, CIFAR ResNets: 16).
    # cnn9 and resnet20/32/56 only; stages 2 and 3 have 2x and 4x
    predictor_width: int = 0  # hidden channels of the NSL layers' predictors (layer kinds with a predictor);
    # 0: the predictor's default (sphere and cosine: 64 for a diagonal M, 128 for a full one; light: 16)
    share_predictor: bool = False  # one predictor per stage for the layers of equal input channels and geometry
    # (the paper's shared parametrisation; layer kinds with a predictor)
    predictor_norm: str = "batch"  # the predictors' normalisation (layer kinds with a predictor): batch (authors'),
    # group (GroupNorm: no batch statistics, trains at batch 1) or none
    predictor_stride: int = 1  # 2: the dynamic layers' predictors read the input average-pooled by 2 and their g
    # is upsampled (nearest) to the layer's grid (about 4x fewer predictor MACs); 0: global, one g per image from
    # the input averaged over all locations; kinds built on DynamicNSConv2d
    share_prediction: bool = False  # cnn9: one prediction g per stage, computed from the stage's input and used
    # by all its NSL layers (the prediction shared, not only the predictor); kinds built on DynamicNSConv2d
    bias: bool = False  # authors: no bias in any conv (none in cnn9's classifier or any predictor conv either)
    out: str | None = None  # run directory
    paper_init: bool = True  # authors' inits: static diagonal M = eye(3) flattened; predictor He x 0.1 / He x 0.001
    train_subset: int = 0  # train on N samples of a fixed seeded subset, the same for every run seed (0: all)
    test_subset: int = 0  # evaluate on N test samples of a fixed seeded subset (0: all)
    # length
    iters: int | None = PAPER_ITERS  # authors: 42,500 iterations (about 109 epochs)
    epochs: float | None = None
    stop_at: int = 0
    batch_size: int = 128  # authors: 128
    seed: int = 0
    device: str = "auto"
    # optimisation
    optimizer: str = "sgd"  # authors: SGD with momentum 0.9 (tf.train.MomentumOptimizer); sgd | adam | adamw
    # (adam: coupled L2 as the gradient of weight_decay * ||p||^2 / 2, i.e. TF's l2 loss under AdamOptimizer;
    # adamw: decoupled decay)
    lr: float = 0.1  # authors: 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # authors: L2 5e-4 on every weight (coupled L2, as SGD weight_decay)
    decay_bn: bool = True  # authors: BN scale and shift decayed too; False exempts BN params and biases
    wd_static_diagonal: float = 0.0  # authors: no weight decay on the diagonal M
    wd_static_full: float = 5e-3  # authors: its own L2 of 5e-3 on the full M
    schedule: str = "multistep"  # multistep | cosine | onecycle | constant
    lr_milestones: tuple = PAPER_MILESTONES  # fractions of iters; authors: 20k, 30k, 37.5k of 42.5k
    lr_gamma: float = 0.1  # authors: lr x 0.1 at each milestone
    warmup_iters: int = 0  # linear warm-up from lr/warmup_iters; NOT in the authors' code (method notes,
    # section 6: lr 0.1 from the first step collapsed one of two seeds; 200 iterations of warm-up fixed it)
    onecycle_pct: float = 0.25  # onecycle: fraction of the run spent warming up
    label_smoothing: float = 0.01  # authors: softmax cross-entropy with label smoothing 0.01
    grad_clip: float = 0.0  # 0: off
    orthogonality: float = 0.0  # weight of nsl.regularizers.orthogonality_penalty added to the loss, over the
    # model's conv filters (model.orthogonality_filters() if defined, else every conv/linear weight but the last
    # layer, the classifier); 0: off. Authors' attention model: 2e-4 (paper-attention)
    # kernel shape (nsl.shape; method notes, section 3: the Boolean D), for runs whose NSL layers learn it
    shape_active: int = 0  # kernel positions kept per NSL layer (of P = 9 for 3x3); 0: no kernel shape
    shape_method: str = "learned"  # learned: gates relaxed -> hard top-k (straight-through) -> frozen;
    # magnitude: the baseline, keep the shape_active positions of largest ||(W M)[:, :, q]|| at shape_start
    shape_start: float = 0.3  # fraction of the run trained dense before shaping (or pruning) starts
    shape_warmup: float = 0.4  # learned: fractions of the shaping part spent relaxed (with the budget penalty) ...
    shape_freeze: float = 0.7  # ... and in hard top-k before D freezes; the rest fine-tunes with D fixed
    shape_weight: float = 1.0  # weight of nsl.shape.sparsity_loss (learned)
    shape_lr: float = 0.05  # lr of the gate logits' own Adam (constant, no weight decay; nsl.train.shaping)
    shape_per_filter: bool = False  # one shape per output filter instead of per layer
    # input
    input: str = "raw"  # authors: raw pixels 0..255 (raw | unit | normalize)
    augment: bool = True  # authors: symmetric pad 4, random crop, random horizontal flip
    pad: int = 4
    flip: bool = True
    # batch norm
    bn_momentum: float = 0.001  # authors: ExponentialMovingAverage(decay=0.999) = PyTorch momentum 0.001
    bn_eps: float = 1e-3  # authors: TensorFlow eps 1e-3
    bn_zero_init: bool = False  # True: running variance starts at 0 as TF's moving_variance does (PyTorch: 1);
    # together with bn_momentum=0.001 this reproduces the authors' statistics exactly, start-up bias included
    bn_recalibrate: int = 0  # fix, NOT in the authors' code: recompute BN statistics on this many training
    # batches before every evaluation (their slow EMA leaves test accuracy at chance for thousands of steps)
    # engine
    amp: str = "none"  # none | bf16 | fp16 | auto (bf16 on CUDA, none on CPU)
    channels_last: bool = False
    compile: str = "none"  # torch.compile of the model for training: none | default | reduce-overhead (CUDA graphs)
    # | max-autotune (torch.compile's modes; true/false are default/none); checkpoints hold the uncompiled weights
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager compiles fastest on the CPU)
    eval_every: int = 2500  # steps between test evaluations (0: only at the end)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at evaluations and the end)
    log_every: int = 50  # steps between metrics.jsonl train records
    eval_batch_size: int = 500
    progress: bool = True
    num_workers: int = 4  # imagefolder only
    image_size: int = 224  # imagefolder only
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the run

    def validate(self) -> None:
        """Check every field against its domain (:mod:`nsl.train.domains`) and then the rules between fields
        (a model's layer kinds, ``width``, kernel-shape and predictor options, the shape schedule, a run
        length); raise :class:`ConfigError` naming the field."""
        from ..layers import LAYER_KINDS
        from ..models import MODEL_LAYERS

        check_domains(self)
        if self.model in MODEL_LAYERS and self.layer not in MODEL_LAYERS[self.model]:
            raise ConfigError(f"model {self.model!r} supports layer kind(s) {', '.join(MODEL_LAYERS[self.model])} "
                              f"only, got {self.layer!r}")
        if self.width and self.model not in WIDTH_MODELS:
            raise ConfigError(f"width applies to {', '.join(WIDTH_MODELS)} only, got model {self.model!r}")
        kind = LAYER_KINDS[self.layer]
        if self.shape_active and not kind.kernel_shape:
            raise ConfigError(f"shape_active needs NSL layers (static-* or dynamic-* kinds but dynamic-filter), got "
                              f"layer {self.layer!r}")
        if self.shape_active and self.shape_per_filter and not kind.per_filter_shape:
            raise ConfigError(f"shape_per_filter needs a diagonal M in dynamic layers; layer {self.layer} has a full M")
        check_predictor_options(self)
        if not self.shape_warmup <= self.shape_freeze:
            raise ConfigError("expected 0 <= shape_start < 1 and 0 <= shape_warmup <= shape_freeze < 1, got "
                              f"shape_start={self.shape_start}, shape_warmup={self.shape_warmup}, "
                              f"shape_freeze={self.shape_freeze}")
        if self.iters is None and self.epochs is None:
            raise ConfigError("set iters or epochs")


def check_predictor_options(cfg) -> None:
    """``cfg.predictor_width``, ``cfg.share_predictor`` and a ``cfg.predictor_norm`` other than ``'batch'`` only
    for layer kinds with a predictor; ``cfg.predictor_stride`` 2 and ``cfg.share_prediction`` (cnn9, without
    ``share_predictor``; read with ``getattr``: a few-shot config has neither) only for ``DynamicNSConv2d`` kinds."""
    from ..layers import LAYER_KINDS, DynamicNSConv2d

    if (cfg.predictor_width or cfg.share_predictor) and LAYER_KINDS[cfg.layer].predictor is None:
        with_predictor = [k for k, v in LAYER_KINDS.items() if v.predictor is not None]
        raise ConfigError(f"predictor_width and share_predictor apply to layer kinds with a predictor "
                          f"({', '.join(with_predictor)}), got layer {cfg.layer!r}")
    stride, share_prediction = getattr(cfg, "predictor_stride", 1), getattr(cfg, "share_prediction", False)
    if stride != 1 or share_prediction:
        option = "predictor_stride" if stride != 1 else "share_prediction"
        dynamic_ns = [k for k, v in LAYER_KINDS.items() if v.module is DynamicNSConv2d]
        if cfg.layer not in dynamic_ns:
            raise ConfigError(f"{{{option}}} applies to the dynamic NSL layer kinds ({', '.join(dynamic_ns)}), got "
                              f"layer {cfg.layer!r}", option)
        if share_prediction and cfg.model != "cnn9":
            raise ConfigError(f"{{share_prediction}} applies to model cnn9 only, got {cfg.model!r}",
                              "share_prediction")
        if share_prediction and cfg.share_predictor:
            raise ConfigError("{share_prediction} shares the predictor too: set {share_predictor} false with it",
                              "share_prediction", "share_predictor")
    if cfg.predictor_norm != "batch" and LAYER_KINDS[cfg.layer].predictor is None:
        with_predictor = [k for k, v in LAYER_KINDS.items() if v.predictor is not None]
        raise ConfigError(f"{{predictor_norm}}={cfg.predictor_norm!r} applies to layer kinds with a predictor "
                          f"({', '.join(with_predictor)}), got layer {cfg.layer!r}", "predictor_norm")


#: models whose channel width ``TrainConfig.width`` sets
WIDTH_MODELS = ("cnn9", "resnet20", "resnet32", "resnet56")




def make_config(protocol: str = "paper", **overrides) -> TrainConfig:
    """The configuration of ``protocol`` with ``overrides`` applied (unknown keys rejected)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    d = dataclasses.asdict(TrainConfig())
    d.update(PROTOCOLS[protocol])
    d["protocol"] = protocol
    d.update(overrides)  # unknown keys: TrainConfig.from_dict raises check_keys's message
    return TrainConfig.from_dict(d)


def _field_types(config_cls: type = TrainConfig) -> dict:
    return {f.name: f for f in fields(config_cls)}


def _annotation_names(f: dataclasses.Field) -> set[str]:
    """The names in field ``f``'s annotation (a string under postponed evaluation, or a type)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return set(re.findall(r"[A-Za-z_]\w*", str(text)))


def parse_value(key: str, text: str, config_cls: type = TrainConfig):
    """Parse the command-line string ``text`` for field ``key`` of the dataclass ``config_cls``.

    Typed by the field's default (JSON-ish): booleans, integers (``1e3`` accepted when integral),
    numbers, tuples of numbers (comma-separated), JSON objects for dicts, strings otherwise. A field
    whose default is ``None`` is typed by its annotation (``int | None``, ``float | None``).
    ``none`` / ``null`` give ``None`` only for fields whose annotation admits ``None``.
    """
    fs = _field_types(config_cls)
    if key not in fs:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fs))}")
    names = _annotation_names(fs[key])
    default = getattr(config_cls(), key)
    low = text.strip().lower()
    if low in ("none", "null") and "None" in names:
        return None
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects true/false, got {text!r}")
    if isinstance(default, int) or (default is None and "int" in names):
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(f"{key} expects an integer, got {text!r}") from None
        if v != int(v):
            raise ConfigError(f"{key} expects an integer, got {text!r}")
        return int(v)
    if isinstance(default, float) or (default is None and "float" in names):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {text!r}") from None
    if isinstance(default, tuple):
        try:
            return tuple(float(t) for t in text.replace("[", "").replace("]", "").split(",") if t.strip())
        except ValueError:
            raise ConfigError(f"{key} expects comma-separated numbers, got {text!r}") from None
    if isinstance(default, dict):
        try:
            v = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{key} expects a JSON object, got {text!r}") from None
        if not isinstance(v, dict):
            raise ConfigError(f"{key} expects a JSON object, got {text!r}")
        return v
    return text


def apply_overrides(cfg, pairs: list[str]):
    """Apply ``key=value`` strings (``--set``) to ``cfg``: a new, validated config of the same class.

    ``cfg`` is any config dataclass with ``to_dict()`` and a validating ``from_dict()`` classmethod
    (:class:`TrainConfig`, :class:`~nsl.fewshot.FewShotConfig`); unknown keys are rejected.
    """
    config_cls = type(cfg)
    d = cfg.to_dict()
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        d[key] = parse_value(key, text, config_cls)
    return config_cls.from_dict(d)
