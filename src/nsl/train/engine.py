"""Former home of the training engine, kept so that ``from nsl.train.engine import ...`` keeps working.

The engine is now split by job: :mod:`nsl.train.run` (run directory, checkpoints, RNG, device, DDP,
AMP), :mod:`nsl.train.optim` (lr schedules, optimisers, parameter groups, batch norm),
:mod:`nsl.train.loop` (the loop :func:`~nsl.train.loop.fit` and :class:`~nsl.train.loop.Task`) and
:mod:`nsl.train.classification` (the classification task, :func:`train`, :func:`evaluate_checkpoint`).
Import from :mod:`nsl.train` instead.
"""

from __future__ import annotations

#: the names this module held, now in :mod:`nsl.train`
_MOVED = frozenset({"train", "TrainingDiverged", "CheckpointError", "load_checkpoint", "evaluate_checkpoint",
                    "lr_factor", "param_groups", "recalibrate_bn", "evaluate", "build_from_checkpoint",
                    "orthogonality_filters",
                    "build_model_for", "atomic_save", "rng_state", "set_rng_state", "resolve_device", "load_data"})
__all__: list[str] = []


def __getattr__(name: str):
    """The names of :data:`_MOVED`, from :mod:`nsl.train` where they live now."""
    if name in _MOVED:
        from .. import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
