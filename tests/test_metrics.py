"""HR@K and NDCG@K with one relevant item per user."""

from __future__ import annotations

import math

import pytest

from bear_ds.evaluation.metrics import rank_metrics


def test_hand_computed_values():
    ranks = [0, 1, 4, None, 9]
    m = rank_metrics(ranks, [1, 5, 10])
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert set(m) == {"hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10"}


def test_all_misses_and_monotone_in_k():
    assert rank_metrics([None, None], [1, 3]) == {"hr@1": 0.0, "ndcg@1": 0.0, "hr@3": 0.0, "ndcg@3": 0.0}
    m = rank_metrics([2, 0, 7, 3, None, 1], [1, 2, 4, 8])
    for a, b in [(1, 2), (2, 4), (4, 8)]:
        assert m[f"hr@{a}"] <= m[f"hr@{b}"] and m[f"ndcg@{a}"] <= m[f"ndcg@{b}"]
        assert m[f"ndcg@{b}"] <= m[f"hr@{b}"]


@pytest.mark.parametrize(
    ("ranks", "ks", "match"), [([], [1], "at least one"), ([0], [0], "K values"), ([-1], [1], "ranks")]
)
def test_bad_input(ranks, ks, match):
    with pytest.raises(ValueError, match=match):
        rank_metrics(ranks, ks)
