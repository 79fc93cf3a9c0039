"""Negatives: never the target's title group, distinct, seeded, weighted as documented."""

from __future__ import annotations

import numpy as np
import pytest

from bear_ds.training.negatives import group_weights, sample_negatives, self_negatives

# 12 items in 8 groups: items 0-2 share group 0 and items 3-4 group 1 (shared titles)
ITEM_GROUPS = [0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7]
G = 8


def test_random_negatives_avoid_target_group_and_history_and_are_seeded():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, G, size=300).tolist()
    history = [rng.integers(0, G, size=2).tolist() for _ in targets]
    weights = group_weights(ITEM_GROUPS, G, "random", targets)
    assert weights.tolist() == [3, 2, 1, 1, 1, 1, 1, 2]  # uniform over items: a group weighs its items
    neg = sample_negatives(targets, history, weights, 3, seed=5)
    assert neg.shape == (300, 3) and neg.dtype == np.int64
    for row, t in enumerate(targets):
        assert t not in neg[row] and not set(history[row]) & set(neg[row].tolist())
        assert len(set(neg[row].tolist())) == 3
    np.testing.assert_array_equal(neg, sample_negatives(targets, history, weights, 3, seed=5))
    assert not np.array_equal(neg, sample_negatives(targets, history, weights, 3, seed=6))
    without_history = sample_negatives(targets, None, weights, 3, seed=5)
    assert any(set(h) & set(n.tolist()) for h, n in zip(history, without_history, strict=True))


def test_random_negatives_follow_item_frequency():
    targets = [7] * 4000
    neg = sample_negatives(targets, None, group_weights(ITEM_GROUPS, G, "random", targets), 1, seed=0)
    share = np.bincount(neg[:, 0], minlength=G) / len(targets)
    assert share[7] == 0
    np.testing.assert_allclose(share[:7], np.array([3, 2, 1, 1, 1, 1, 1]) / 10, atol=0.03)


def test_popular_negatives_weight_training_targets_and_fill_uniformly():
    targets = [0] * 50 + [1] * 30 + [2] * 20  # only 3 groups were ever targets
    weights = group_weights(ITEM_GROUPS, G, "popular", targets)
    assert weights.tolist() == [50, 30, 20, 0, 0, 0, 0, 0]
    neg = sample_negatives(targets, None, weights, 3, seed=1)
    for row, t in enumerate(targets):
        popular = {0, 1, 2} - {t}
        assert set(neg[row].tolist()) >= popular and t not in neg[row]  # both popular ones, then a filler
    k1 = sample_negatives([3] * 3000, None, weights, 1, seed=2)[:, 0]
    np.testing.assert_allclose(np.bincount(k1, minlength=G)[:3] / 3000, [0.5, 0.3, 0.2], atol=0.03)


def test_too_few_groups_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match="training row 0: only 7 catalog title groups.*num_negatives=8"):
        sample_negatives([0], None, np.ones(G), 8, seed=0)


def test_self_negatives_take_the_top_recommendations_except_the_target():
    recommended = [[3, 5, 1, 2], [5, 4], [-1, 2, 2, 6, 0]]
    neg, filled = self_negatives(recommended, [5, 4, 2], G, 2, seed=0)
    assert neg[0].tolist() == [3, 1]  # the target (5) skipped
    assert neg[1][0] == 5 and neg[1][1] not in (4, 5)  # one recommendation left: one filler
    assert neg[2].tolist() == [6, 0]  # -1 (unfinished beam) and the target's group skipped
    assert filled == 1


def test_self_negatives_that_cannot_be_filled_name_the_configured_k():
    # 2 recommended, 2 more to draw, but only 1 other group is left: the error names K = 4, not the 2 missing
    with pytest.raises(ValueError, match=r"only 3 catalog title groups are eligible.*num_negatives=4 "):
        self_negatives([[1, 2]], [0], 4, 4, seed=0)
