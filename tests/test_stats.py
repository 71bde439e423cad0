"""nsl.stats: the confidence intervals every report, table and few-shot evaluation uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nsl.fewshot import confidence_interval
from nsl.stats import mean_ci, normal_ci, t_quantile


def test_t_quantiles_match_the_printed_table():
    for df, t in {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 30: 2.042}.items():
        assert t_quantile(df) == pytest.approx(t, abs=5e-4)


def test_mean_ci_is_the_student_t_interval():
    values = [0.8211, 0.8184, 0.8177]
    mean, half = mean_ci(values)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert mean == pytest.approx(sum(values) / 3, abs=1e-15)
    assert half == pytest.approx(4.302652729911275 * s / math.sqrt(3), rel=1e-12)
    one = mean_ci([0.5])
    assert one[0] == 0.5 and math.isnan(one[1])


def test_normal_ci_is_the_few_shot_interval_for_lists_arrays_and_tensors():
    acc = np.array([0.2, 0.6, 0.4, 0.8, 1.0])
    expected = (acc.mean(), 1.96 * acc.std(ddof=0) / math.sqrt(5))
    for given in (acc.tolist(), acc, torch.tensor(acc)):
        assert normal_ci(given) == pytest.approx(expected, rel=1e-12)
        assert confidence_interval(given) == normal_ci(given)


@pytest.mark.parametrize("fn", [mean_ci, normal_ci])
def test_empty_or_nested_values_are_refused(fn):
    with pytest.raises(ValueError, match=r"must be a non-empty 1-D sequence, got shape \(0,\)"):
        fn([])
    with pytest.raises(ValueError, match=r"must be a non-empty 1-D sequence, got shape \(1, 2\)"):
        fn([[0.1, 0.2]])
