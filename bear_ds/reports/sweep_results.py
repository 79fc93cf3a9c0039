"""A sweep's results: one row per point (results.csv), mean/std/n over seeds (results_by_config.csv)
and results.md, read from the points' saved run folders (the sweep folder layout: bear_ds/sweeps.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from bear_ds.config import override_value
from bear_ds.errors import MissingPathError
from bear_ds.outputs import atomic_path, write_text_atomic
from bear_ds.reports.tables import format_mean_std, format_param, markdown_table
from bear_ds.runs import (
    CLAIMS,
    METHOD_KEYS,
    POINT_CONFIGS,
    SEED_KEY,
    STAGE1_DIR,
    SWEEP_MANIFEST,
    flatten,
    read_config_yaml,
    read_json,
)


def _metric_sort_key(metric: str) -> tuple[str, int, str]:
    name, _, k = metric.partition("@")
    return (name, int(k) if k.isdigit() else 0, metric)


def _metrics_of(section: Any) -> dict[str, float]:
    """hr@K / ndcg@K entries of a summary's "valid"/"test" dict."""
    if not isinstance(section, dict):
        return {}
    return {
        k: float(v)
        for k, v in section.items()
        if ("@" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def collect_points(sweep_dir: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(one row per point, grid keys, notes). Pending points are rows with status 'pending'."""
    sweep_dir = Path(sweep_dir)
    manifest, why = read_json(sweep_dir / SWEEP_MANIFEST)
    if manifest is None:
        raise MissingPathError(f"{sweep_dir} is not a sweep folder: {why}")
    grid_keys: list[str] = list(manifest.get("grid", []))
    names = [p["name"] for p in manifest.get("points", [])]
    param_keys = list(dict.fromkeys([*METHOD_KEYS, *grid_keys]))
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    for point in manifest.get("points", []):
        name = point["name"]
        point_dir = sweep_dir / name
        config, why = read_config_yaml(point_dir / "config.yaml")
        if config is None:
            config, why_planned = read_config_yaml(sweep_dir / POINT_CONFIGS / f"{name}.yaml")
            if config is None:
                notes.append(f"point {name}: parameters unknown ({why}; {why_planned})")
        params = flatten(config) if config else {}
        row: dict[str, Any] = {"point": name, "status": "pending"}
        # a list-valued key (model.lora.target_modules) as its override text: groupable, and as typed
        row.update({k: _as_cell(params.get(k)) for k in param_keys})
        # grid keys that sweep.only_when left out of this point do not apply to it: shown as empty
        swept = {o.split("=", 1)[0] for o in point.get("overrides", [])}
        row.update({k: None for k in grid_keys if k not in swept})
        summary, why = read_json(point_dir / "summary.json")
        if summary is None:
            notes.append(f"point {name}: not done ({why})")
        else:
            row["status"] = "done"
            row["selected_epoch"] = summary.get("selected_epoch")
            row["select_metric"] = summary.get("select_metric")
            for split in ("valid", "test"):
                for metric, value in _metrics_of(summary.get(split)).items():
                    row[f"{split}.{metric}"] = value
            row["train_time_s"] = summary.get("train_time_s")
            row["optim_time_s"] = summary.get("optim_time_s")
            row["steps"] = summary.get("steps")
            missing = [k for k in ("selected_epoch", "test", "train_time_s") if k not in summary]
            if missing:
                notes.append(f"point {name}: {point_dir / 'summary.json'} lacks {', '.join(missing)}")
            # kept in results.csv as read; group_over_seeds leaves them out of the means
            infinite = [
                f"{col} = {value}"
                for col, value in row.items()
                if col not in ("point", "status", "steps", *param_keys)
                and isinstance(value, float)
                and not math.isfinite(value)
            ]
            if infinite:
                notes.append(
                    f"point {name}: {'; '.join(infinite)} in {point_dir / 'summary.json'}: "
                    "not a finite number, left out of the mean and std over seeds"
                )
        rows.append(row)
    # data: the points' prepared splits; stage1: a two-stage sweep's stage-1 sweep
    known = set(names) | {POINT_CONFIGS, CLAIMS, STAGE1_DIR, "data", "jobs", "plots"}
    for sub in sorted(sweep_dir.iterdir()):
        if sub.is_dir() and sub.name not in known:
            notes.append(f"folder {sub} is not a point of this sweep's grid; ignored")
    df = pd.DataFrame(rows)
    metric_cols = sorted(
        (c for c in df.columns if c.startswith(("valid.", "test."))),
        key=lambda c: (c.split(".")[0] != "valid", _metric_sort_key(c.split(".", 1)[1])),
    )
    head = ["point", "status", *param_keys]
    tail = [c for c in ("selected_epoch", "select_metric", "train_time_s", "optim_time_s", "steps") if c in df.columns]
    return df[head + tail + metric_cols], grid_keys, notes


def group_keys_of(grid_keys: list[str]) -> list[str]:
    keys = [k for k in grid_keys if k != SEED_KEY]
    return keys or ["loss.name"]


def _as_cell(value: Any) -> Any:
    return override_value(value) if isinstance(value, (list, dict)) else value


def group_over_seeds(points: pd.DataFrame, grid_keys: list[str]) -> pd.DataFrame:
    """Done points grouped by every grid key except train.seed: mean, std (ddof=1) and n, and for
    each value column its own count where some point lacks it (`<col> n`). A non-finite value
    (inf, nan) counts as absent: one inf would make the mean inf."""
    keys = group_keys_of(grid_keys)
    done = points[points["status"] == "done"]
    value_cols = [
        c
        for c in points.columns
        if c.startswith(("valid.", "test.")) or c in ("train_time_s", "optim_time_s", "selected_epoch")
    ]
    if done.empty:
        return pd.DataFrame(columns=[*keys, "n"])
    numeric = done[value_cols].apply(pd.to_numeric, errors="coerce").replace([math.inf, -math.inf], math.nan)
    grouped = pd.concat([done[keys], numeric], axis=1).groupby(keys, sort=False, dropna=False)
    stats = grouped[value_cols].agg(["mean", "std", "count"])
    stats.columns = [f"{col} {'n' if stat == 'count' else stat}" for col, stat in stats.columns]
    size = grouped.size()
    stats = stats.drop(columns=[f"{c} n" for c in value_cols if (stats[f"{c} n"] == size).all()])
    stats.insert(0, "n", size)
    return stats.reset_index()


def grouped_markdown(grouped: pd.DataFrame, grid_keys: list[str], select_metric: str = "ndcg@10") -> str:
    """Mean ± std of the test metrics, the validation selection metric, selected epoch and time
    (every validation metric is in results_by_config.csv)."""
    keys = group_keys_of(grid_keys)
    metrics = [c[: -len(" mean")] for c in grouped.columns if c.endswith(" mean")]
    shown = [m for m in metrics if m.startswith("test.")] + [m for m in metrics if m == f"valid.{select_metric}"]
    shown += [m for m in ("selected_epoch", "train_time_s", "optim_time_s") if m in metrics]
    headers = [*keys, "n", *(f"{m} (s)" if m.endswith("_time_s") else m for m in shown)]
    rows = []
    for _, r in grouped.iterrows():
        row = [format_param(r[k]) for k in keys]
        row.append(str(int(r["n"])))
        for m in shown:
            digits = 1 if m in ("train_time_s", "optim_time_s", "selected_epoch") else 4
            cell = format_mean_std(r[f"{m} mean"], r[f"{m} std"], digits)
            count = r.get(f"{m} n")
            if count is not None and not pd.isna(count) and int(count) != int(r["n"]):
                cell += f" (n={int(count)})"  # some points lack this value: the mean is over fewer
            row.append(cell)
        rows.append(row)
    return markdown_table(headers, rows)


def _select_metric(points: pd.DataFrame) -> str:
    chosen = points["select_metric"].dropna() if "select_metric" in points.columns else pd.Series(dtype=object)
    return str(chosen.mode().iloc[0]) if not chosen.empty else "ndcg@10"


def aggregate_markdown(points: pd.DataFrame, grouped: pd.DataFrame, grid_keys: list[str], notes: list[str]) -> str:
    done = int((points["status"] == "done").sum())
    group_label = ", ".join(group_keys_of(grid_keys))
    parts = [
        f"### Mean ± std over seeds (grouped by {group_label}; std with ddof=1; {done} of {len(points)} points done)",
        "",
        grouped_markdown(grouped, grid_keys, _select_metric(points)) if not grouped.empty else "No point is done yet.",
    ]
    if notes:
        parts += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(parts)


def aggregate(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per point (parameters, seed, selected_epoch, valid/test metrics, train_time_s);
    writes results.csv (per point), results_by_config.csv (mean/std/n over seeds) and results.md."""
    sweep_dir = Path(sweep_dir)
    points, grid_keys, notes = collect_points(sweep_dir)
    grouped = group_over_seeds(points, grid_keys)
    with atomic_path(sweep_dir / "results.csv") as tmp:
        points.to_csv(tmp, index=False)
    with atomic_path(sweep_dir / "results_by_config.csv") as tmp:
        grouped.to_csv(tmp, index=False)
    write_text_atomic(
        sweep_dir / "results.md",
        f"# Sweep results: {sweep_dir.name}\n\n" + aggregate_markdown(points, grouped, grid_keys, notes) + "\n",
    )
    return points
