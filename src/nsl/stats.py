"""Confidence intervals, in one place (``scipy.stats`` for the quantiles).

* :func:`mean_ci`: mean of a few independent results (training seeds) and the half-width of its 95%
  Student-t interval, ``t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
  (``ddof=1``). Used for seed spreads (``nsl report``, ``nsl demo --full``, the few-shot seed table).
* :func:`normal_ci`: mean of many results (test episodes) and ``z * std / sqrt(n)`` with the
  population standard deviation (``ddof=0``) and ``z = 1.96``, as the usual few-shot evaluation code
  computes it. Used for few-shot accuracies and paired episode differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mean_ci", "normal_ci", "t_quantile"]


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile ``t_{(1 + level) / 2, df}`` (``t_quantile(2) = 4.303``)."""
    from scipy import stats  # imported here: scipy.stats takes about a second to import, nsl's start-up none

    return float(stats.t.ppf((1 + level) / 2, df))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the 95% Student-t interval of ``values`` (``n - 1`` degrees of freedom);
    the half-width is NaN for a single value."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {a.shape}")
    mean = float(a.mean())
    if len(a) < 2:
        return mean, float("nan")
    return mean, t_quantile(len(a) - 1) * float(a.std(ddof=1)) / math.sqrt(len(a))


def normal_ci(values, z: float = 1.96) -> tuple[float, float]:
    """``(mean, z * std / sqrt(n))`` of ``values`` (a sequence, array or tensor of per-episode results),
    ``std`` the population standard deviation (``ddof=0``); ``z = 1.96`` gives the 95% interval."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"accuracies must be a non-empty 1-D sequence, got shape {a.shape}")
    return float(a.mean()), float(z * a.std(ddof=0) / math.sqrt(len(a)))
