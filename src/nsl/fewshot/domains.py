"""The checked domains of :class:`~nsl.fewshot.FewShotConfig`'s fields (see :mod:`nsl.train.domains`)."""

from __future__ import annotations

from ..train.domains import (
    ENGINE_DOMAINS,
    PATH,
    PREDICTOR_NORM,
    SEED,
    Domain,
    boolean,
    choice,
    integer,
    layer_kinds,
    number,
)

__all__ = ["FEWSHOT_DOMAINS", "FEWSHOT_HEADS"]

#: Episode heads (:func:`nsl.fewshot.build_fewshot_model`): ``protonet`` (squared Euclidean),
#: ``protonet-cosine`` (cosine, learnable scale), ``bilinear`` (``q^T M p - p^T M p / 2``, M learned,
#: starting as ProtoNet).
FEWSHOT_HEADS = ("protonet", "protonet-cosine", "bilinear")


def _fewshot_datasets():
    from .data import FEWSHOT_DATASETS
    return tuple(FEWSHOT_DATASETS)


def _backbones():
    from .models import BACKBONES
    return tuple(BACKBONES)


def _dataset_key(name):
    return name.lower().replace("_", "-") if isinstance(name, str) else name


FEWSHOT_DOMAINS: dict[str, Domain] = {
    **ENGINE_DOMAINS,
    "dataset": choice(_fewshot_datasets, normalize=_dataset_key, noun="few-shot dataset", plural="names"),
    "data_dir": PATH,
    "rotations": boolean(),
    "backbone": choice(_backbones, noun="backbone", plural="backbones"),
    "layer": choice(layer_kinds, noun="layer kind", plural="kinds"),
    "head": choice(FEWSHOT_HEADS, noun="head", plural="heads"),
    "bilinear_rank": integer(0),
    "ways": integer(2, text="an integer >= 2 (a 1-way episode has nothing to classify)"),
    "shots": integer(1),
    "queries": integer(1),
    "train_ways": integer(2, also=(0,), text="0 (same as ways) or an integer >= 2"),
    "train_shots": integer(0, text="an integer >= 0 (0: same as shots)"),
    "episodes": integer(1),
    "lr": number(0, lo_open=True),
    "weight_decay": number(0),
    "lr_step": integer(1),
    "lr_gamma": number(0, 1, lo_open=True),
    "val_every": integer(0),
    "val_episodes": integer(1),
    "val_seed": SEED,
    "predictor_width": integer(0, text="an integer >= 0 (0: the predictor's own width)"),
    "share_predictor": boolean(),
    "predictor_norm": PREDICTOR_NORM,
}


