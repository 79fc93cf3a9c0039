"""PNG plots of saved run outputs (matplotlib `Figure` objects: no display, no pyplot state).

Each function takes already-read data, writes one PNG and returns a `PlotOutcome`: the file, or
None with the reason it was skipped. A plot is never drawn from partial data without saying so:
runs left out of a plot are listed in its notes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# Figures are built directly, not through pyplot: importing this module (or plotting) never
# switches the process's matplotlib backend, and PNGs need no display
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bear_ds.outputs import atomic_path
from bear_ds.reports.stats import wilson_interval
from bear_ds.reports.tables import is_finite_number

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
        suffix = f" (mean ± std of {len(present)} runs)" if len(present) > 1 else ""
        (line,) = ax.plot(xs, ys, linewidth=linewidth, marker=marker(len(xs)), label=f"{label}{suffix}")
        if len(present) > 1:  # the spread over seeds, as a band
            spread = [statistics.stdev(per_run[r][x] for r in present) for x in xs]
            ax.fill_between(
                xs, [y - s for y, s in zip(ys, spread, strict=True)], [y + s for y, s in zip(ys, spread, strict=True)],
                color=line.get_color(), alpha=0.2, linewidth=0,
            )  # fmt: skip
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
        points = {
            float(r["step"]): float(r[key])
            for r in records
            if is_finite_number(r.get("step")) and is_finite_number(r.get(key))
        }
        if points:
            per_run[run] = points
        else:
            outcome.notes.append(f"{run}: no finite '{key}' values in train_log.jsonl")
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    drawn = _draw_group_means(
        ax, groups, per_run, outcome, "step", linewidth=1.0, marker=lambda n: "." if n <= 50 else None
    )
    n_series = len(drawn)
    if n_series == 0:
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
            if is_finite_number(r.get("epoch"))
            and isinstance(r.get("valid"), dict)
            and is_finite_number(r["valid"].get(metric))
        }
        if points:
            per_run[run] = points
        else:
            outcome.notes.append(f"{run}: no valid '{metric}' in epochs.jsonl")
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    drawn = _draw_group_means(ax, groups, per_run, outcome, "epoch", linewidth=1.2, marker=lambda n: "o")
    n_series = len(drawn)
    stars = 0
    for runs, line in drawn:
        if len(runs) == 1:  # a mean over seeds has no single selected epoch
            run = runs[0]
            sel = selected.get(run)
            if is_finite_number(sel) and float(sel) in per_run[run]:
                ax.plot([float(sel)], [per_run[run][float(sel)]], marker="*", markersize=14, color=line.get_color())
                stars += 1
    if n_series == 0:
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
    done = points[points["status"] == "done"]
    finite = done[metric_col].map(is_finite_number)
    outcome.notes += [  # inf (nan is indistinguishable from absent here: the sweep summary names it)
        f"point {name}: {metric_col} = {value} is not finite; left out"
        for name, value in zip(done["point"][~finite], done[metric_col][~finite], strict=True)
        if not pd.isna(value)
    ]
    done = done[finite]
    is_bear = done["loss.name"] == "bear"
    bear = done[is_bear]
    if bear[param].nunique(dropna=True) < 2:
        outcome.skipped_because = f"{param} takes fewer than 2 values among done BEAR points"
        return outcome
    others = [k for k in group_keys if k not in (param, "loss.name")]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
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


def _count(analysis: dict[str, Any], key: str) -> int | None:
    value = analysis.get(key)
    return int(value) if is_finite_number(value) and float(value) == int(value) and value >= 0 else None


def plot_pruning(analyses: dict[str, dict[str, Any]], groups: dict[str, list[str]], *, out: Path) -> PlotOutcome:
    """Bars per group (a run, or a sweep configuration with its seeds pooled): the share of top-B
    positives pruned by beam search and the share of those pruned whose per-token condition fails
    at or before the pruning step (analysis.json counts), each with its Wilson 95% interval and its
    counts k/n. Every group is drawn: one without top-B positives as "n = 0", one without an
    analysis as "no analysis"."""
    title = "Beam-search pruning of top-B positives (analysis.json, Wilson 95% intervals)"
    outcome = PlotOutcome(title=title, file=None)
    counts: dict[str, tuple[int, int, int | None]] = {}  # run -> (positives, pruned, pruned violating)
    for run, analysis in analyses.items():
        positives, pruned = _count(analysis, "topb_positives"), _count(analysis, "pruned")
        if positives is None or pruned is None or pruned > positives:
            keys = ", ".join(sorted(analysis)) or "none"
            outcome.notes.append(
                f"{run}: analysis.json has no valid 'topb_positives' and 'pruned' counts (keys present: {keys})"
            )
            continue
        violating = _count(analysis, "pruned_violating")
        if violating is None and pruned > 0:
            outcome.notes.append(f"{run}: analysis.json has no 'pruned_violating' count; that bar is left out")
        counts[run] = (positives, pruned, violating if violating is not None and violating <= pruned else None)
    if not counts:
        outcome.skipped_because = "no run has an analysis.json with 'topb_positives' and 'pruned' counts"
        return outcome
    names: list[str] = []
    shares: list[tuple[Any, Any]] = []  # (pruned Share, violating Share or None) per group
    for label, runs in groups.items():
        tick = label.replace(", ", "\n")  # one grid key per line keeps tick labels apart
        present = [counts[r] for r in runs if r in counts]
        missing = [r for r in runs if r not in counts]
        if missing and present:
            outcome.notes.append(f"{label}: pooled over {len(present)} runs; no counts for {', '.join(missing)}")
        names.append(tick if len(present) <= 1 else f"{tick}\n({len(present)} runs pooled)")
        if not present:
            shares.append((None, None))
            continue
        positives, pruned = sum(c[0] for c in present), sum(c[1] for c in present)
        with_violating = [c for c in present if c[2] is not None or c[1] == 0]
        violating = (
            wilson_interval(sum(c[2] or 0 for c in with_violating), sum(c[1] for c in with_violating))
            if len(with_violating) == len(present)
            else None
        )
        shares.append((wilson_interval(pruned, positives), violating))
    fig = Figure(figsize=(max(6.0, 1.8 * len(names) + 2), 4.8))
    ax = fig.subplots()
    width = 0.38
    for offset, which, label in (
        (-width / 2, 0, "pruned by beam search (share of top-B positives)"),
        (width / 2, 1, "per-token condition violated (share of pruned)"),
    ):
        xs, ys, err, texts = [], [], [[], []], []
        for x, pair in enumerate(shares):
            share = pair[which]
            if share is None:
                if which == 0:  # say why the group has no bar instead of leaving a gap
                    ax.text(x, 0.02, "no analysis", ha="center", va="bottom", fontsize="x-small", rotation=90)
                continue
            if share.n == 0:
                ax.text(x + offset, 0.02, "n = 0", ha="center", va="bottom", fontsize="x-small", rotation=90)
                continue
            xs.append(x + offset)
            ys.append(share.share)
            err[0].append(share.share - share.low)
            err[1].append(share.high - share.share)
            texts.append(f"{share.k}/{share.n}")
        bars = ax.bar(xs, ys, width, yerr=err, capsize=3, label=label, color=f"C{which}")
        ax.bar_label(bars, labels=texts, fontsize="x-small", padding=2)
    ax.set_xticks(
        range(len(names)),
        names,
        rotation=30 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize="small",
    )
    ax.set_ylim(0.0, 1.3)  # headroom for the legend above the bars
    ax.set_title(title)
    ax.set_xlabel("run" if all(len(r) == 1 for r in groups.values()) else "configuration")
    ax.set_ylabel("share (fraction, 0-1); k/n above each bar")
    _finish(fig, ax, out, 2)
    outcome.file = out
    return outcome
