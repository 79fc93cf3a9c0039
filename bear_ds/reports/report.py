"""`report(dir)`: results.md with tables and PNG plots for a run, a folder of runs, or a sweep.

Reads saved outputs only. A missing input never crashes the report and never yields a fake plot:
the plot is skipped with a line in results.md saying why, and runs left out of a table cell or a
plot are named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from bear_ds.outputs import write_text_atomic
from bear_ds.reports.evidence import MOST_POPULAR, evidence_sections
from bear_ds.reports.plots import PlotOutcome, plot_epoch_metric, plot_metric_vs_param, plot_pruning, plot_step_metric
from bear_ds.reports.sweep_results import aggregate_markdown, collect_points, group_keys_of, group_over_seeds
from bear_ds.reports.tables import format_number, format_param, is_finite_number, markdown_table
from bear_ds.runs import SEED_KEY, STAGE1_DIR, RunData, discover_runs, is_sweep_dir, load_run

PLOTS_DIR = "plots"
TABLE_METRICS: tuple[str, ...] = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def _percent(value: Any) -> str:
    return f"{100.0 * value:.1f}%" if is_finite_number(value) else "–"


def _test_metrics(run: RunData, notes: list[str]) -> dict[str, Any]:
    """Test metrics at the selected epoch (summary.json); else evaluate's metrics.json, said so."""
    if run.summary is not None:
        test = run.summary.get("test")
        if isinstance(test, dict):
            return test
        why = "summary.json has no 'test' metrics (no per-epoch evaluation)"
    else:
        why = "no summary.json"
    if run.eval_metrics is not None:
        notes.append(
            f"{run.name}: {why}; metrics are from evaluate's metrics.json "
            "(the split evaluate ran on, no epoch selection)"
        )
        return run.eval_metrics
    if run.summary is not None:
        notes.append(f"{run.name}: {why}, and {'; '.join(run.notes.get('eval_metrics', []))}")
        return {}
    notes.append(
        f"{run.name}: no metrics ({'; '.join(run.notes.get('summary', []) + run.notes.get('eval_metrics', []))})"
    )
    return {}


def _results_table(runs: dict[str, RunData], popular: dict[str, Any] | None = None) -> str:
    headers = ["run", *(m.upper() for m in TABLE_METRICS)]
    headers += ["selected epoch", "train time (s)", "optimiser steps (s)", "pruned share"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for name, run in runs.items():
        metrics = _test_metrics(run, notes)
        missing = [m for m in TABLE_METRICS if m in metrics and not is_finite_number(metrics[m])] + [
            m for m in TABLE_METRICS if metrics and m not in metrics
        ]
        if missing:
            notes.append(f"{name}: no numeric {', '.join(missing)} in its metrics")
        summary = run.summary or {}
        pruned = (run.analysis or {}).get("pruned_share")
        if run.analysis is None:
            notes.append(f"{name}: pruned share unknown ({'; '.join(run.notes.get('analysis', []))})")
        elif not is_finite_number(pruned):
            notes.append(f"{name}: analysis.json has no numeric 'pruned_share'")
        rows.append(
            [
                name,
                *(format_number(metrics.get(m)) if is_finite_number(metrics.get(m)) else "–" for m in TABLE_METRICS),
                str(summary.get("selected_epoch", "–")),
                *(
                    format_number(summary.get(key), 1) if is_finite_number(summary.get(key)) else "–"
                    for key in ("train_time_s", "optim_time_s")
                ),
                _percent(pruned),
            ]
        )
    if popular is not None:  # the reference every method has to beat: the same list for every test user
        cells = [format_number(popular[m]) if is_finite_number(popular.get(m)) else "–" for m in TABLE_METRICS]
        source = f", {popular['from']}" if popular.get("from") else ""
        users = f" ({popular['users']} users{source})" if "users" in popular else ""
        rows.append([f"{MOST_POPULAR}{users}", *cells, "–", "–", "–", "–"])
        if "users" not in popular:
            notes.append(f"{MOST_POPULAR}: not scored ({popular.get('why')})")
    text = markdown_table(headers, rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def results_table(runs: dict[str, str | Path]) -> str:
    """Markdown table of HR@5/10, NDCG@5/10 (test at the selected epoch), selected epoch, training
    time and pruned share for named run folders, with a note under it for each missing value, and a
    most-popular row when the runs' data and catalog are found (scored on an LML run's test users)."""
    loaded = {name: load_run(name, Path(folder)) for name, folder in runs.items()}
    _, popular = evidence_sections(loaded, {name: [name] for name in loaded}, statistics=False)
    return _results_table(loaded, popular)


def _analysis_recall(analysis: dict[str, Any], which: str, k: int | None) -> Any:
    block = analysis.get(which)
    if not isinstance(block, dict):
        nested = next((v for key, v in analysis.items() if key.startswith("recall") and isinstance(v, dict)), {})
        block = nested.get(which) if isinstance(nested.get(which), dict) else None
    if not isinstance(block, dict) or k is None:
        return None
    return block.get(f"hr@{k}")


def _pruning_table(runs: dict[str, RunData]) -> str:
    wanted = ("num_beams", "users", "topb_positives", "pruned", "pruned_share", "pruned_violating_share")
    rows, notes = [], []
    for name, run in runs.items():
        a = run.analysis
        if a is None:
            continue
        absent = [k for k in (*wanted, "exhaustive", "beam") if k not in a]
        if absent:
            notes.append(f"{name}: analysis.json lacks {', '.join(absent)}")
        beams = a.get("num_beams")
        k = int(beams) if is_finite_number(beams) else None
        recall = [_analysis_recall(a, which, k) for which in ("exhaustive", "beam")]
        rows.append(
            [
                name,
                *(str(a.get(key, "–")) for key in ("num_beams", "users", "topb_positives", "pruned")),
                _percent(a.get("pruned_share")),
                _percent(a.get("pruned_violating_share")),
                *(format_number(r) if is_finite_number(r) else "–" for r in recall),
            ]
        )
    if not rows:
        return ""
    headers = ["run", "B", "users", "top-B positives", "pruned", "pruned share", "violating share (of pruned)"]
    headers += ["exhaustive HR@B", "beam HR@B"]
    text = markdown_table(headers, rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def _plot_section(outcome: PlotOutcome, root: Path) -> list[str]:
    lines = [f"### {outcome.title}", ""]
    if outcome.file is None:
        lines.append(f"Skipped: {outcome.skipped_because}.")
    else:
        lines.append(f"![{outcome.title}]({outcome.file.relative_to(root).as_posix()})")
    if outcome.notes:
        lines += ["", *(f"- {n}" for n in outcome.notes)]
    return lines + [""]


def _groups(runs: dict[str, RunData], points: pd.DataFrame | None, group_keys: list[str]) -> dict[str, list[str]]:
    """Plot lines: one per run, or for a sweep one per configuration (its seeds averaged)."""
    if points is None:
        return {name: [name] for name in runs}
    params = points.set_index("point")
    groups: dict[str, list[str]] = {}
    for name in runs:
        row = params.loc[name]
        label = ", ".join(f"{k}={format_param(row[k])}" for k in group_keys if format_param(row[k]) != "–")
        groups.setdefault(label or name, []).append(name)
    return groups


CONTROL = "continue-LML: "  # a two-stage sweep's LML configurations: the control every method is compared with


def _with_stage_one(
    stage1_dir: Path, runs: dict[str, RunData], groups: dict[str, list[str]]
) -> tuple[dict[str, RunData], dict[str, list[str]], str]:
    """A two-stage sweep's runs and groups with its finished stage-1 points of the same seeds added
    (named `stage1/POINT`, one group), its LML groups labelled as the control; and the stage-1 label."""
    groups = {(CONTROL + label if label.startswith("loss.name=lml") else label): n for label, n in groups.items()}
    seeds = {run.config_value(SEED_KEY) for run in runs.values()}
    points, _, _ = collect_points(stage1_dir)
    done = points.loc[points["status"] == "done", "point"]
    loaded = {f"{STAGE1_DIR}/{name}": load_run(f"{STAGE1_DIR}/{name}", stage1_dir / name) for name in done}
    stage1_runs = {name: run for name, run in loaded.items() if run.config_value(SEED_KEY) in seeds}
    label = f"stage 1 ({len(stage1_runs)} run(s) in {STAGE1_DIR}/)"
    if stage1_runs:
        groups[label] = list(stage1_runs)
    return {**runs, **stage1_runs}, groups, label


def report(run_or_sweep_dir: str | Path) -> Path:
    """Write results.md and plots/*.png into `run_or_sweep_dir`; returns the results.md path."""
    root = Path(run_or_sweep_dir)
    kind, folders = discover_runs(root)
    runs = {name: load_run(name, folder) for name, folder in folders.items()}
    plots_dir = root / PLOTS_DIR
    described = {"sweep": f"a sweep of {len(runs)} points", "runs": f"{len(runs)} runs", "run": "one run"}[kind]
    lines = [
        f"# Results: {root.resolve().name}",
        "",
        f"Report of {described}, from the files saved in this folder.",
        "",
    ]

    points = None
    group_keys = None
    if kind == "sweep":
        points, grid_keys, sweep_notes = collect_points(root)
        group_keys = group_keys_of(grid_keys)
        grouped = group_over_seeds(points, grid_keys)
        lines += ["## Sweep summary", "", aggregate_markdown(points, grouped, grid_keys, sweep_notes), ""]
        done = set(points.loc[points["status"] == "done", "point"])
        runs = {name: run for name, run in runs.items() if name in done}

    groups = _groups(runs, points, group_keys or [])
    stage1 = None
    if kind == "sweep" and is_sweep_dir(root / STAGE1_DIR):  # a two-stage sweep: its stage 1 compared too
        runs, groups, stage1 = _with_stage_one(root / STAGE1_DIR, runs, groups)
    statistics, popular = evidence_sections(runs, groups, stage1=stage1) if runs else ([], {})
    lines += [
        "## Results (test at the selected epoch)",
        "",
        _results_table(runs, popular) if runs else "No finished run.",
        "",
    ]
    pruning = _pruning_table(runs)
    if pruning:
        lines += ["## Pruning analysis (analysis.json)", "", pruning, ""]
    lines += statistics

    widths = {run.config_value("loss.beam_width") for run in runs.values()} - {None}
    b_text = f"B={widths.pop()}" if len(widths) == 1 else "B = loss.beam_width"
    logs = {name: run.train_log for name, run in runs.items()}
    outcomes: list[PlotOutcome] = [
        plot_step_metric(
            logs,
            groups,
            "loss",
            title="Training loss per step",
            ylabel="training loss (nats per response token)",
            out=plots_dir / "train_loss.png",
        ),
        plot_step_metric(
            logs,
            groups,
            "frac_outside_topb",
            title=f"Share of target tokens outside the top-B per step ({b_text})",
            ylabel="target tokens outside the top-B (fraction, 0-1)",
            out=plots_dir / "frac_outside_topb.png",
            ylim=(0.0, 1.0),
        ),
        plot_epoch_metric(
            {name: run.epochs for name, run in runs.items()},
            groups,
            {name: (run.summary or {}).get("selected_epoch") for name, run in runs.items()},
            "ndcg@10",
            out=plots_dir / "valid_ndcg10.png",
        ),
    ]
    for topic, outcome in (("train_log", outcomes[0]), ("train_log", outcomes[1]), ("epochs", outcomes[2])):
        for name, run in runs.items():
            outcome.notes.extend(f"{name}: {n}" for n in run.notes.get(topic, []))
    if points is not None:
        for param, filename in (("loss.lam", "ndcg10_vs_lam.png"), ("loss.xi", "ndcg10_vs_xi.png")):
            outcomes.append(
                plot_metric_vs_param(points, param, "test.ndcg@10", group_keys or [], out=plots_dir / filename)
            )
    else:
        outcomes.append(
            PlotOutcome(
                title="Test NDCG@10 vs λ and ξ",
                file=None,
                skipped_because="not a sweep folder (these plots need a sweep's aggregate over loss.lam / loss.xi)",
            )
        )
    pruning_plot = plot_pruning(
        {name: run.analysis for name, run in runs.items() if run.analysis is not None},
        groups,
        out=plots_dir / "pruning.png",
    )
    pruning_plot.notes.extend(f"{name}: {n}" for name, run in runs.items() for n in run.notes.get("analysis", []))
    outcomes.append(pruning_plot)

    lines += ["## Plots", ""]
    for outcome in outcomes:
        lines += _plot_section(outcome, root)
    # notes name files by their path; inside results.md, relative to it reads better
    text = "\n".join(lines).replace(f"{root}{os.sep}", "").replace(f"{root.resolve()}{os.sep}", "")
    return write_text_atomic(root / "results.md", text.rstrip() + "\n")
