"""Top-K metrics with one relevant item per user: HR@K and NDCG@K (exact title-group match)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def rank_metrics(target_ranks: Sequence[int | None], ks: Sequence[int]) -> dict[str, float]:
    """HR@K and NDCG@K averaged over users.

    target_ranks: per user, the 0-based rank of the target in the returned list, or None when it
    is absent (a miss; users whose target is not in the catalog count here too).
    NDCG@K = 1 / log2(rank + 2) when rank < K, else 0 (one relevant item, so IDCG = 1).
    Returns {"hr@K": ..., "ndcg@K": ...} for each K in `ks`.
    """
    if len(target_ranks) == 0:
        raise ValueError("rank_metrics needs at least one user")
    bad_k = [k for k in ks if int(k) != k or k < 1]
    if bad_k:
        raise ValueError(f"K values must be integers >= 1, got {bad_k}")
    bad_rank = [r for r in target_ranks if r is not None and (int(r) != r or r < 0)]
    if bad_rank:
        raise ValueError(f"target ranks must be None or integers >= 0, got {bad_rank[:5]}")
    hits = [r for r in target_ranks if r is not None]
    n = len(target_ranks)
    out: dict[str, float] = {}
    for k in ks:
        inside = [r for r in hits if r < k]
        out[f"hr@{k}"] = len(inside) / n
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in inside) / n
    return out
