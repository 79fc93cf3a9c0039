"""Evaluation: HR/NDCG, user sharding and gathering, `evaluate`, `analyze` (exhaustive ranking, pruning)."""

from bear_ds.evaluation.metrics import rank_metrics

__all__ = ["rank_metrics"]
