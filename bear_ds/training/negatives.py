"""Negatives for the preference losses: catalog title groups, never the target's, seeded and pure.

Every negative is a title group of the catalog, so its response is a full trie path (the trie is
built over exactly these groups). Sources (`loss.negative_source`):

- random: items drawn uniformly over the catalog's items (a group with m items weighs m), K distinct
  groups per example, leaving out the target's group and, with `loss.exclude_history`, the groups of
  the user's history;
- popular: the same, each group weighted by how often it is a training target; when fewer than K
  eligible groups were ever a target, the rest are drawn uniformly among the remaining eligible ones;
- self: the model's own top recommendations for the training prompt (the evaluator's beam search,
  `self_negatives` picks from its lists), regenerated each epoch (SPRec's self-play).

A generator `numpy.random.default_rng([seed, epoch])` makes the draws reproducible on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bear_ds.errors import ConfigError


def group_weights(item_groups: Sequence[int], num_groups: int, source: str, target_groups: Sequence[int]) -> np.ndarray:
    """float64 [G]: random -> items per group (uniform over items); popular -> training-target counts."""
    if source == "random":
        return np.bincount(np.asarray(item_groups, dtype=np.int64), minlength=num_groups).astype(np.float64)
    if source == "popular":
        return np.bincount(np.asarray(target_groups, dtype=np.int64), minlength=num_groups).astype(np.float64)
    raise ValueError(f"loss.negative_source={source!r} has no sampling weights (expected random or popular)")


def _draw(
    rng: np.random.Generator, weights: np.ndarray, eligible: np.ndarray, k: int, row: int, num_negatives: int
) -> np.ndarray:
    """k distinct groups among `eligible`, by `weights`, filled uniformly when too few have weight.

    num_negatives: the negatives the row needs in all (k of them drawn here), named in the error.
    """
    w = np.where(eligible, weights, 0.0)
    positive = int((w > 0).sum())
    if positive >= k:
        return rng.choice(len(w), size=k, replace=False, p=w / w.sum())
    first = np.flatnonzero(w > 0)
    rest = np.flatnonzero(eligible & (w <= 0))
    if positive + len(rest) < k:
        raise ConfigError(
            f"training row {row}: only {positive + len(rest) + num_negatives - k} catalog title groups are "
            f"eligible negatives (the target's and, with loss.exclude_history, the history's are left out); "
            f"loss.num_negatives={num_negatives} needs at least that many"
        )
    fill = rng.choice(rest, size=k - positive, replace=False)
    return np.concatenate([first if positive == 0 else rng.permutation(first), fill])


def sample_negatives(
    target_groups: Sequence[int],
    history_groups: Sequence[Sequence[int]] | None,
    weights: np.ndarray,
    k: int,
    *,
    seed: int,
    epoch: int = 0,
) -> np.ndarray:
    """int64 [N, K]: K distinct groups per example drawn by `weights` [G], never the target's group.

    history_groups: per example, groups also left out (None: only the target's).
    """
    num_groups = len(weights)
    rng = np.random.default_rng([seed, epoch])
    out = np.empty((len(target_groups), k), dtype=np.int64)
    for row, target in enumerate(target_groups):
        eligible = np.ones(num_groups, dtype=bool)
        if history_groups is not None:
            eligible[np.asarray(history_groups[row], dtype=np.int64)] = False
        eligible[target] = False
        out[row] = _draw(rng, weights, eligible, k, row, k)
    return out


def self_negatives(
    recommended: Sequence[Sequence[int]],
    target_groups: Sequence[int],
    num_groups: int,
    k: int,
    *,
    seed: int,
    epoch: int = 0,
) -> tuple[np.ndarray, int]:
    """int64 [N, K]: the first K recommended groups of each example other than its target's.

    recommended[i]: the groups beam search returned for example i, best first. When fewer than K
    remain (a beam that finished fewer items), the rest are drawn uniformly among the other groups;
    returns (negatives, number of negatives filled that way).
    """
    rng = np.random.default_rng([seed, epoch])
    uniform = np.ones(num_groups, dtype=np.float64)
    out = np.empty((len(target_groups), k), dtype=np.int64)
    filled = 0
    for row, (groups, target) in enumerate(zip(recommended, target_groups, strict=True)):
        picked: list[int] = []
        for g in groups:
            if 0 <= g != target and g not in picked:
                picked.append(int(g))
            if len(picked) == k:
                break
        if len(picked) < k:
            eligible = np.ones(num_groups, dtype=bool)
            eligible[[target, *picked]] = False
            extra = _draw(rng, uniform, eligible, k - len(picked), row, k)
            filled += len(extra)
            picked.extend(int(g) for g in extra)
        out[row] = picked
    return out, filled


__all__ = ["group_weights", "sample_negatives", "self_negatives"]
