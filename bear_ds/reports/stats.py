"""Statistics for comparing methods: pure functions on arrays, built on scipy.stats.

- `seed_summary`: mean, std (ddof=1) and a t-based 95% interval of a metric over seeds;
- `per_user_metrics`: per-user HR@K / NDCG@K from 0-based target ranks (None = miss);
- `paired_difference`: mean per-user difference of two methods on the same users, a paired
  bootstrap 95% interval (BCa, percentile when BCa is degenerate) and a paired permutation test
  (random sign flips of each user's difference; exact for small n);
- `user_level_difference`: the same pooled over seeds by user (each user's difference averaged over
  the seeds), so n is the number of users, not of user-seed pairs;
- `wilson_interval`: a share k/n with its Wilson 95% interval (binomtest(...).proportion_ci);
- `window_mean_over_seeds`: a per-step series (e.g. the share of gold tokens outside the top-B)
  averaged over a window of steps per seed, then mean and std over seeds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class SeedSummary:
    n: int
    mean: float
    std: float  # nan when n < 2
    low: float  # t interval; nan when n < 2
    high: float


def seed_summary(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedSummary:
    """Mean ± std (ddof=1) over seeds and the t interval of the mean."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("seed_summary needs at least one value")
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite values: {x.tolist()}")
    mean = float(x.mean())
    if x.size < 2:
        return SeedSummary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0.0:
        return SeedSummary(int(x.size), mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=std / math.sqrt(x.size))
    return SeedSummary(int(x.size), mean, std, float(low), float(high))


def is_rank(value: object) -> bool:
    """A 0-based rank: a whole number >= 0 (3.0 is 3, as for `rank_metrics`; 3.7, -1, inf are not)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 0 and float(value).is_integer()  # type: ignore[arg-type]


def per_user_metrics(target_ranks: Sequence[int | None], k: int) -> dict[str, np.ndarray]:
    """{"hr@K": [U], "ndcg@K": [U]} per user; their means are `rank_metrics`' figures."""
    bad = [r for r in target_ranks if r is not None and not is_rank(r)]
    if bad:
        raise ValueError(f"target ranks must be None or integers >= 0, got {bad[:5]}")
    ranks = np.array([math.inf if r is None else float(r) for r in target_ranks])
    inside = ranks < k
    ndcg = np.zeros_like(ranks)
    ndcg[inside] = 1.0 / np.log2(ranks[inside] + 2.0)
    return {f"hr@{k}": inside.astype(float), f"ndcg@{k}": ndcg}


@dataclass(frozen=True)
class PairedDifference:
    n: int  # users (pairs)
    mean_diff: float  # mean of a - b
    low: float  # bootstrap interval of the mean difference
    high: float
    p_value: float  # two-sided paired permutation test of "mean difference = 0"

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0 and p < 0.05: the difference is unlikely to be noise."""
        return self.p_value < 1.0 - CONFIDENCE and (self.low > 0.0 or self.high < 0.0)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = 9999,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PairedDifference:
    """Per-user paired comparison of two methods (a - b) on the same users, in the same order."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("a paired comparison needs at least 2 users")
    d = x - y
    mean = float(d.mean())
    if np.all(d == 0.0):
        return PairedDifference(int(d.size), 0.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    test = stats.permutation_test(
        (x, y), _mean_diff, permutation_type="samples", n_resamples=n_resamples, vectorized=True, batch=1000,
        alternative="two-sided", random_state=rng,
    )  # fmt: skip
    if np.all(d == d[0]):  # every resample of the users gives the same mean
        return PairedDifference(int(d.size), mean, mean, mean, float(min(1.0, test.pvalue)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa's degenerate-jackknife warning: handled by the fallback
        ci = stats.bootstrap(
            (d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa", batch=1000,
            random_state=rng,
        ).confidence_interval  # fmt: skip
        if not (math.isfinite(ci.low) and math.isfinite(ci.high)):
            ci = stats.bootstrap(
                (d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile", batch=1000,
                random_state=rng,
            ).confidence_interval  # fmt: skip
    return PairedDifference(int(d.size), mean, float(ci.low), float(ci.high), float(min(1.0, test.pvalue)))


def user_mean_differences(per_seed: Sequence[tuple[Sequence[str], Sequence[float]]]) -> tuple[list[str], np.ndarray]:
    """(user ids, each user's difference averaged over the seeds that hold the user), from one
    (user ids, per-user differences) pair per seed; users in order of first appearance. A user with
    several test windows in a seed (the paper's Amazon test files have some) is first averaged
    within the seed: its windows are no more independent of each other than its seeds are."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for users, diffs in per_seed:
        values = np.asarray(diffs, dtype=float)
        if len(users) != values.size:
            raise ValueError(f"{len(users)} user ids for {values.size} differences")
        seed_sums: dict[str, float] = {}
        seed_counts: dict[str, int] = {}
        for user, value in zip(users, values.tolist(), strict=True):
            seed_sums[user] = seed_sums.get(user, 0.0) + value
            seed_counts[user] = seed_counts.get(user, 0) + 1
        for user, total in seed_sums.items():
            sums[user] = sums.get(user, 0.0) + total / seed_counts[user]
            counts[user] = counts.get(user, 0) + 1
    ids = list(sums)
    return ids, np.array([sums[u] / counts[u] for u in ids])


def user_level_difference(
    per_seed: Sequence[tuple[Sequence[str], Sequence[float]]], *, n_resamples: int = 9999, seed: int = 0
) -> PairedDifference:
    """Per-user paired differences of several seeds pooled by USER, not by user-seed pair: the same
    users under several seeds are not independent samples (a user whose outcome repeats across seeds
    would count once per seed and narrow the interval). Each user's difference is averaged over the
    seeds, then the users are resampled (bootstrap interval, sign-flip permutation test); n = users."""
    _, means = user_mean_differences(per_seed)
    return paired_difference(means, np.zeros_like(means), n_resamples=n_resamples, seed=seed)


@dataclass(frozen=True)
class Share:
    k: int
    n: int
    share: float  # nan when n == 0
    low: float  # Wilson interval; nan when n == 0
    high: float


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Share:
    """k of n with the Wilson score interval; n == 0 gives nan (there is nothing to estimate)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Share(0, 0, math.nan, math.nan, math.nan)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Share(k, n, k / n, float(ci.low), float(ci.high))


def window_mean_over_seeds(series: Sequence[Sequence[float]], window: int, *, last: bool = True) -> SeedSummary:
    """Each seed's mean over its last (or first) `window` values, then mean ± std over seeds."""
    if window < 1:
        raise ValueError("window must be >= 1")
    per_seed = []
    for values in series:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError("a seed has no finite values")
        per_seed.append(float((v[-window:] if last else v[:window]).mean()))
    return seed_summary(per_seed)


__all__ = [
    "CONFIDENCE",
    "PairedDifference",
    "SeedSummary",
    "Share",
    "is_rank",
    "paired_difference",
    "per_user_metrics",
    "seed_summary",
    "user_level_difference",
    "user_mean_differences",
    "wilson_interval",
    "window_mean_over_seeds",
]
