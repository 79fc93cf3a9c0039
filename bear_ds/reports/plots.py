"""PNG plots of saved run outputs (matplotlib, Agg backend: no display needed).

Each function takes already-read data, writes one PNG and returns a `PlotOutcome`: the file, or
None with the reason it was skipped. A plot is never drawn from partial data without saying so:
runs left out of a plot are listed in its notes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bear_ds.outputs import atomic_path  # noqa: E402

_MAX_LEGEND_ROWS = 12


@dataclass
class PlotOutcome:
    title: str
    file: Path | None
    notes: list[str] = field(default_factory=list)
    skipped_because: str | None = None


def _finish(fig: Any, ax: Any, out: Path, n_series: int) -> None:
    if n_series > _MAX_LEGEND_ROWS:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + n_series // 30)
    else:
        ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_series(series: Sequence[dict[float, float]]) -> tuple[list[float], list[float]]:
    """Mean over runs at each x present in every run (seeds of one configuration)."""
    common = set(series[0])
    for s in series[1:]:
        common &= set(s)
    xs = sorted(common)
    return xs, [sum(s[x] for s in series) / len(series) for x in xs]


def _draw_group_means(
    ax: Any,
    groups: dict[str, list[str]],
    per_run: dict[str, dict[float, float]],
    outcome: PlotOutcome,
    unit: str,
    *,
    linewidth: float,
    marker: Callable[[int], str | None],
) -> list[tuple[list[str], Any]]:
    """One line per group: the mean over its runs at each x they all share (seeds of a setting).

    Returns (the group's runs that have data, the line) for each line drawn; groups whose runs
    share no x get a note instead.
    """
    drawn = []
    for label, runs in groups.items():
        present = [r for r in runs if r in per_run]
        if not present:
            continue
        xs, ys = mean_series([per_run[r] for r in present])
        if not xs:
            outcome.notes.append(f"{label}: its runs share no {unit}; not drawn")
            continue
        suffix = f" (mean of {len(present)} runs)" if len(present) > 1 else ""
        (line,) = ax.plot(xs, ys, linewidth=linewidth, marker=marker(len(xs)), label=f"{label}{suffix}")
        drawn.append((present, line))
    return drawn


def plot_step_metric(
    logs: dict[str, list[dict[str, Any]]],
    groups: dict[str, list[str]],
    key: str,
    *,
    title: str,
    ylabel: str,
    out: Path,
    ylim: tuple[float, float] | None = None,
) -> PlotOutcome:
    """`key` of train_log.jsonl against the optimiser step, one line per group (mean over its runs)."""
    outcome = PlotOutcome(title=title, file=None)
    per_run: dict[str, dict[float, float]] = {}
    for run, records in logs.items():
        if not records:
            continue  # the caller says why the file is missing or empty
        points = {float(r["step"]): float(r[key]) for r in records if _finite(r.get("step")) and _finite(r.get(key))}
        if points:
            per_run[run] = points
        else:
            outcome.notes.append(f"{run}: no finite '{key}' values in train_log.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = _draw_group_means(
        ax, groups, per_run, outcome, "step", linewidth=1.0, marker=lambda n: "." if n <= 50 else None
    )
    n_series = len(drawn)
    if n_series == 0:
        plt.close(fig)
        outcome.skipped_because = f"no run has '{key}' in train_log.jsonl"
        return outcome
    ax.set_title(title)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    _finish(fig, ax, out, n_series)
    outcome.file = out
    return outcome


def plot_epoch_metric(
    epochs: dict[str, list[dict[str, Any]]],
    groups: dict[str, list[str]],
    selected: dict[str, Any],
    metric: str,
    *,
    out: Path,
) -> PlotOutcome:
    """valid[metric] of epochs.jsonl per epoch, one line per group; a star at each run's selected epoch."""
    title = f"Validation {metric.upper()} per epoch"
    outcome = PlotOutcome(title=title, file=None)
    per_run: dict[str, dict[float, float]] = {}
    for run, records in epochs.items():
        if not records:
            continue  # the caller says why the file is missing or empty
        points = {
            float(r["epoch"]): float(r["valid"][metric])
            for r in records
            if _finite(r.get("epoch")) and isinstance(r.get("valid"), dict) and _finite(r["valid"].get(metric))
        }
        if points:
            per_run[run] = points
        else:
            outcome.notes.append(f"{run}: no valid '{metric}' in epochs.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = _draw_group_means(ax, groups, per_run, outcome, "epoch", linewidth=1.2, marker=lambda n: "o")
    n_series = len(drawn)
    stars = 0
    for runs, line in drawn:
        if len(runs) == 1:  # a mean over seeds has no single selected epoch
            run = runs[0]
            sel = selected.get(run)
            if _finite(sel) and float(sel) in per_run[run]:
                ax.plot([float(sel)], [per_run[run][float(sel)]], marker="*", markersize=14, color=line.get_color())
                stars += 1
    if n_series == 0:
        plt.close(fig)
        outcome.skipped_because = f"no run has a valid '{metric}' in epochs.jsonl"
        return outcome
    if stars:
        ax.plot(
            [], [], marker="*", linestyle="none", color="gray", markersize=12, label="selected epoch (summary.json)"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric.upper()} (0-1)")
    _finish(fig, ax, out, n_series + (1 if stars else 0))
    outcome.file = out
    return outcome


_PARAM_LABELS = {"loss.lam": "λ (loss.lam, BEAR weight)", "loss.xi": "ξ (loss.xi, BEAR sigmoid temperature)"}


def plot_metric_vs_param(
    points: pd.DataFrame, param: str, metric_col: str, group_keys: list[str], *, out: Path
) -> PlotOutcome:
    """Sweep points: mean ± std over seeds of `metric_col` against `param` for BEAR points, one line
    per setting of the other grid keys; other methods (where loss.name varies) as dashed reference lines."""
    metric = metric_col.split(".", 1)[1].upper()
    symbol = _PARAM_LABELS.get(param, param).split(" ")[0]
    title = f"Test {metric} vs {symbol} (mean ± std over seeds)"
    outcome = PlotOutcome(title=title, file=None)
    if metric_col not in points.columns:
        outcome.skipped_because = f"no done point has {metric_col}"
        return outcome
    done = points[(points["status"] == "done") & points[metric_col].notna()]
    is_bear = done["loss.name"] == "bear"
    bear = done[is_bear]
    if bear[param].nunique(dropna=True) < 2:
        outcome.skipped_because = f"{param} takes fewer than 2 values among done BEAR points"
        return outcome
    others = [k for k in group_keys if k not in (param, "loss.name")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n_series = 0
    line_groups = bear.groupby(others, sort=False, dropna=False) if others else [((), bear)]
    for key, frame in line_groups:
        key = key if isinstance(key, tuple) else (key,)
        stats = frame.groupby(param)[metric_col].agg(["mean", "std", "count"]).sort_index()
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key, strict=True)) or "bear"
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=label)
        n_series += 1
    for name, frame in done[~is_bear].groupby("loss.name", sort=False):
        mean = frame[metric_col].mean()
        ax.axhline(
            mean,
            linestyle="--",
            linewidth=1.0,
            color=f"C{n_series % 10}",
            label=f"{name} (mean of {len(frame)} points)",
        )
        n_series += 1
    ax.set_title(title)
    ax.set_xlabel(_PARAM_LABELS.get(param, param))
    ax.set_ylabel(f"test {metric} (0-1)")
    _finish(fig, ax, out, n_series)
    outcome.file = out
    return outcome


def plot_pruning(analyses: dict[str, dict[str, Any]], groups: dict[str, list[str]], *, out: Path) -> PlotOutcome:
    """Bars per group (a run, or a sweep configuration averaged over its seeds): share of top-B
    positives pruned by beam search, and share of those pruned whose per-token condition fails at
    or before the pruning step (analysis.json)."""
    title = "Beam-search pruning of top-B positives (analysis.json)"
    outcome = PlotOutcome(title=title, file=None)
    shares: dict[str, float] = {}
    violating_of: dict[str, float] = {}
    for run, analysis in analyses.items():
        share = analysis.get("pruned_share")
        if not _finite(share):
            keys = ", ".join(sorted(analysis)) or "none"
            outcome.notes.append(f"{run}: analysis.json has no numeric 'pruned_share' (keys present: {keys})")
            continue
        shares[run] = float(share)
        v = analysis.get("pruned_violating_share")
        if _finite(v):
            violating_of[run] = float(v)
        else:
            outcome.notes.append(f"{run}: analysis.json has no numeric 'pruned_violating_share'; that bar is left out")
    names, pruned, violating = [], [], []
    for label, runs in groups.items():
        with_share = [shares[r] for r in runs if r in shares]
        if not with_share:
            continue
        with_violating = [violating_of[r] for r in runs if r in violating_of]
        tick = label.replace(", ", "\n")  # one grid key per line keeps tick labels apart
        names.append(tick if len(with_share) == 1 else f"{tick}\n(mean of {len(with_share)})")
        pruned.append(sum(with_share) / len(with_share))
        violating.append(sum(with_violating) / len(with_violating) if with_violating else math.nan)
    if not names:
        outcome.skipped_because = "no run has an analysis.json with 'pruned_share'"
        return outcome
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) + 2), 4.6))
    xs = list(range(len(names)))
    width = 0.38
    bars = ax.bar([x - width / 2 for x in xs], pruned, width, label="pruned by beam search (share of top-B positives)")
    ax.bar_label(bars, fmt="%.2f", fontsize="x-small")
    if any(not math.isnan(v) for v in violating):
        bars = ax.bar(
            [x + width / 2 for x in xs], violating, width, label="per-token condition violated (share of pruned)"
        )
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in violating], fontsize="x-small")
    ax.set_xticks(
        xs, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center", fontsize="small"
    )
    ax.set_ylim(0.0, 1.25)  # headroom for the legend above the bars
    ax.set_title(title)
    ax.set_xlabel("run")
    ax.set_ylabel("share (fraction, 0-1)")
    _finish(fig, ax, out, 2)
    outcome.file = out
    return outcome
