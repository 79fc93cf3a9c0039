"""Statistics of `bear-ds report` (bear_ds/reports/stats.py) and the most-popular recommender."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bear_ds.evaluation.metrics import rank_metrics
from bear_ds.evaluation.popularity import most_popular_ranks, popularity_order
from bear_ds.reports.stats import (
    paired_difference,
    per_user_metrics,
    seed_summary,
    wilson_interval,
    window_mean_over_seeds,
)


def test_seed_summary_is_the_t_interval_of_the_mean() -> None:
    s = seed_summary([0.01, 0.02, 0.03])
    assert s.n == 3 and s.mean == pytest.approx(0.02) and s.std == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 dof)
    assert (s.low, s.high) == pytest.approx((0.02 - half, 0.02 + half))
    one = seed_summary([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.low)
    with pytest.raises(ValueError):
        seed_summary([])


def test_per_user_metrics_average_to_rank_metrics() -> None:
    ranks = [0, None, 3, 9, 10, 1]
    per_user = per_user_metrics(ranks, 10)
    expected = rank_metrics(ranks, [10])
    assert per_user["hr@10"].mean() == pytest.approx(expected["hr@10"])
    assert per_user["ndcg@10"].mean() == pytest.approx(expected["ndcg@10"])
    assert per_user["hr@10"].tolist() == [1, 0, 1, 1, 0, 1]
    assert per_user_metrics([3.0, None], 5)["hr@5"].tolist() == [1, 0]  # a whole float is a rank, as in rank_metrics
    for bad in (-1, 3.7, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="integers >= 0"):
            per_user_metrics([0, bad], 10)


def test_paired_difference_exact_small_sample_and_no_difference() -> None:
    # 5 users, each better by 1: the sign-flip distribution has 2^5 equally likely outcomes, of which
    # two (all +, all -) are as extreme as observed: p = 2/32
    d = paired_difference([1, 1, 1, 1, 1], [0, 0, 0, 0, 0])
    assert d.mean_diff == 1.0 and (d.low, d.high) == (1.0, 1.0)
    assert d.p_value == pytest.approx(2 / 32)
    same = paired_difference([0.5, 0.0, 1.0], [0.5, 0.0, 1.0])
    assert (same.mean_diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.distinguishable
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1, 2], [1])


def test_paired_difference_separates_a_real_effect_from_noise() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(800) < 0.05).astype(float)
    better = np.maximum(base, (rng.random(800) < 0.10).astype(float))  # same users, more hits
    clear = paired_difference(better, base)
    assert clear.distinguishable and clear.low > 0 and clear.p_value < 0.001
    assert clear.low < clear.mean_diff < clear.high
    noise = paired_difference(rng.permutation(base), base)  # same hit rate, shuffled users
    assert noise.low < 0 < noise.high and noise.p_value > 0.05 and not noise.distinguishable


def test_wilson_interval_matches_the_closed_form() -> None:
    s = wilson_interval(30, 60)
    z = 1.959963984540054
    centre, half = (30 + z * z / 2) / (60 + z * z), z / (60 + z * z) * math.sqrt(30 * 30 / 60 + z * z / 4)
    assert (s.low, s.high) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 10).low == 0.0 and 0.2 < wilson_interval(0, 10).high < 0.35
    empty = wilson_interval(0, 0)
    assert empty.n == 0 and math.isnan(empty.share)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_window_mean_over_seeds() -> None:
    s = window_mean_over_seeds([[1.0, 0.5, 0.2, 0.2], [1.0, 0.7, 0.4, 0.4]], window=2)
    assert s.mean == pytest.approx(0.3) and s.std == pytest.approx(math.sqrt(0.02))
    first = window_mean_over_seeds([[1.0, 0.5, float("nan"), 0.2]], window=2, last=False)
    assert first.mean == pytest.approx(0.75)


def test_most_popular_orders_groups_by_training_frequency() -> None:
    item_group = {"a": 0, "b": 1, "b2": 1, "c": 2, "d": 3}  # b and b2 share a title: one group
    train = ["c", "b", "b2", "c", "a", "c", "b", "zz"]  # zz is not in the catalog
    order = popularity_order(train, item_group)
    assert order == [1, 2, 0, 3]  # b: 3 (b, b2, b), c: 3 (tie: lower id first), a: 1, d: never
    assert most_popular_ranks(order, [2, 3, None, 1], k=3) == [1, None, None, 0]
    with pytest.raises(ValueError):
        most_popular_ranks(order, [0], k=0)
