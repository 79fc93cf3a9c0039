"""The most-popular recommender: the same top-K list for every user, the catalog groups ordered by
how often their items are training targets. It is the "better than trivial" reference of every
results table; it is scored like beam search (one target per user, its 0-based rank in the list,
`rank_metrics`), on the same test users, without excluding a user's history (nor does decoding).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence


def popularity_order(train_targets: Iterable[str], item_group: Mapping[str, int]) -> list[int]:
    """Groups by training frequency (descending; ties by group id): a group counts its items' occurrences
    as training targets. Groups never seen come last, by id; training items not in the catalog are ignored."""
    counts: Counter[int] = Counter()
    for item in train_targets:
        group = item_group.get(item)
        if group is not None:
            counts[group] += 1
    groups = sorted(set(item_group.values()))
    return sorted(groups, key=lambda g: (-counts[g], g))


def most_popular_ranks(order: Sequence[int], target_groups: Sequence[int | None], k: int) -> list[int | None]:
    """Each user's target rank in the top-`k` of `order` (None: not in it, or no catalog group)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    position = {g: i for i, g in enumerate(order[:k])}
    return [None if g is None else position.get(g) for g in target_groups]


__all__ = ["most_popular_ranks", "popularity_order"]
