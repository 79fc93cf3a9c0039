"""The statistics sections of results.md: the most-popular reference, each method over seeds, paired
per-user comparisons, pruning counts with Wilson intervals, and the share of gold tokens outside
the top-B over seeds. Reads run folders (via `RunData`); the statistics are `stats.py`'s.

Per-user test ranks come from OUT/test_predictions.jsonl (the trainer writes it for the selected
epoch) or, failing that, from an `evaluate` output's predictions.jsonl in the run folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bear_ds.data import load_split
from bear_ds.evaluation.metrics import rank_metrics
from bear_ds.evaluation.popularity import most_popular_ranks, popularity_order
from bear_ds.reports.stats import (
    PairedDifference,
    paired_difference,
    per_user_metrics,
    seed_summary,
    wilson_interval,
    window_mean_over_seeds,
)
from bear_ds.reports.tables import format_number, markdown_table
from bear_ds.runs import RunData, find_output, read_jsonl

K = 10  # the comparisons are on HR@10 and NDCG@10
METRICS = (f"ndcg@{K}", f"hr@{K}")
MOST_POPULAR = "most-popular"
STEP_WINDOW = 50  # steps averaged at the start and the end of training for the gold-token share


@dataclass
class UserRanks:
    """One run's (or the most-popular list's) test ranks, user by user in split order."""

    user_ids: list[str]
    ranks: list[int | None]
    source: str

    def per_user(self) -> dict[str, np.ndarray]:
        return per_user_metrics(self.ranks, K)


@dataclass
class MethodRuns:
    """A group of runs (one configuration, its seeds): seed -> run."""

    label: str
    loss_name: str | None
    runs: dict[Any, RunData] = field(default_factory=dict)


def test_ranks(run: RunData) -> tuple[UserRanks | None, str | None]:
    """The selected epoch's per-user test ranks of a run, or (None, why)."""
    path = run.folder / "test_predictions.jsonl"
    selected = (run.summary or {}).get("selected_epoch")
    if path.is_file():
        records, notes = read_jsonl(path)
        if notes:
            return None, "; ".join(notes)
        epochs = {r.get("epoch") for r in records}
        if selected is not None and epochs != {selected}:
            return None, f"{path} holds epoch(s) {sorted(epochs, key=str)}, not the selected epoch {selected}"
        return UserRanks([str(r["user_id"]) for r in records], [r["target_rank"] for r in records], path.name), None
    found, why = find_output(run.folder, "predictions.jsonl")
    if found is None:
        return None, f"no test_predictions.jsonl and {why}"
    records, notes = read_jsonl(found)
    if notes:
        return None, "; ".join(notes)
    return UserRanks([str(r["user_id"]) for r in records], [r["target_rank"] for r in records], str(found)), None


def _prepared_folder(run: RunData) -> Path | None:
    if run.config_value("data.source") == "prepared" and run.config_value("data.path"):
        return Path(str(run.config_value("data.path")))
    return run.folder / "data" if (run.folder / "data" / "train.parquet").is_file() else None


def most_popular_ranks_for(run: RunData, users: UserRanks | None) -> tuple[UserRanks | None, str | None]:
    """The most-popular list scored on the run's test users (the same users, in the same order):
    groups from the run's exported catalog (OUT/model/catalog.json), frequencies from its training split."""
    prepared = _prepared_folder(run)
    if prepared is None or not (prepared / "train.parquet").is_file():
        return None, f"{run.name}: no prepared data folder found (config data.path or {run.folder / 'data'})"
    catalog_path = run.folder / "model" / "catalog.json"
    if not catalog_path.is_file():
        return None, f"{run.name}: {catalog_path} does not exist (the catalog's groups are needed)"
    item_group = {str(r["item_id"]): int(r["group"]) for r in json.loads(catalog_path.read_text())["items"]}
    order = popularity_order((str(t) for t in load_split(prepared, "train")["target"]), item_group)
    test = load_split(prepared, "test")
    cap = run.config_value("eval.max_users")
    count = len(users.user_ids) if users is not None else min(len(test), cap or len(test))
    test = test.select(range(min(count, len(test))))
    user_ids = [str(u) for u in test["user_id"]]
    if users is not None and user_ids != users.user_ids:
        return None, f"{run.name}: its test users are not the first {count} of {prepared / 'test.parquet'}"
    ranks = most_popular_ranks(order, [item_group.get(str(t)) for t in test["target"]], K)
    return UserRanks(user_ids, ranks, f"{prepared} (train targets)"), None


def method_groups(runs: dict[str, RunData], groups: dict[str, list[str]]) -> list[MethodRuns]:
    out = []
    for label, names in groups.items():
        members = [runs[n] for n in names if n in runs]
        if not members:
            continue
        method = MethodRuns(label, members[0].config_value("loss.name"))
        for run in members:
            seed = run.config_value("train.seed")
            method.runs[seed if seed not in method.runs else run.name] = run
        out.append(method)
    return out


def _fmt_diff(d: PairedDifference) -> str:
    return f"{d.mean_diff:+.4f} (95% interval [{d.low:+.4f}, {d.high:+.4f}], p = {_fmt_p(d.p_value)})"


def _fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _comparison_pairs(methods: list[MethodRuns]) -> list[tuple[str, str]]:
    """(a, b) labels: every other method against each LML configuration, and BEAR against MSL; in a
    folder with neither (an ablation of one method, e.g. BEAR over lam), every configuration and
    most-popular against the first configuration."""
    by_loss: dict[str | None, list[str]] = {}
    for m in methods:
        by_loss.setdefault(m.loss_name, []).append(m.label)
    pairs = []
    for ref in by_loss.get("lml", []):
        pairs += [(m.label, ref) for m in methods if m.label != ref and m.loss_name != "lml"]
        pairs += [(MOST_POPULAR, ref)]
    for msl in by_loss.get("msl", []):
        pairs += [(bear, msl) for bear in by_loss.get("bear", [])]
    if not pairs and len(methods) > 1:
        first = methods[0].label
        pairs = [(m.label, first) for m in methods[1:]] + [(MOST_POPULAR, first)]
    return pairs


def _verdict(d: PairedDifference) -> str:
    if d.distinguishable:
        return "distinguishable from noise"
    why = "the interval includes 0" if d.low <= 0.0 <= d.high else f"p = {_fmt_p(d.p_value)} >= 0.05"
    return f"not distinguishable from noise ({why})"


def _describe(label: str, d: dict[str, PairedDifference], pooled_over: str) -> str:
    ndcg, hr = d[METRICS[0]], d[METRICS[1]]
    return (
        f"{label}, {pooled_over} ({ndcg.n:,} user pairs): NDCG@{K} difference {_fmt_diff(ndcg)}; "
        f"HR@{K} difference {_fmt_diff(hr)}. NDCG@{K}: {_verdict(ndcg)}; HR@{K}: {_verdict(hr)}"
    )


def evidence_sections(
    runs: dict[str, RunData], groups: dict[str, list[str]], *, statistics: bool = True
) -> tuple[list[str], dict[str, Any]]:
    """(Markdown lines, the most-popular metrics) for results.md; the metrics hold only "why" when
    the most-popular list could not be scored. statistics=False: the most-popular metrics only."""
    methods = method_groups(runs, groups)
    notes: list[str] = []
    ranks: dict[str, dict[Any, UserRanks]] = {}
    for m in methods:
        for seed, run in m.runs.items():
            got, why = test_ranks(run)
            if got is None:
                notes.append(f"{run.name}: no per-user test ranks ({why})")
            else:
                ranks.setdefault(m.label, {})[seed] = got
    # the most-popular list, on the test users of each LML run (all runs share the data in a sweep)
    popular: dict[Any, UserRanks] = {}
    reference = next((m for m in methods if m.loss_name == "lml"), methods[0] if methods else None)
    if reference is not None:
        for seed, run in reference.runs.items():
            got, why = most_popular_ranks_for(run, ranks.get(reference.label, {}).get(seed))
            if got is None:
                notes.append(f"{MOST_POPULAR}: {why}")
            else:
                popular[seed] = got
    popular_metrics: dict[str, Any] = {
        "why": "; ".join(n[len(MOST_POPULAR) + 2 :] for n in notes if n.startswith(MOST_POPULAR)) or "no run"
    }
    if popular:
        first = next(iter(popular.values()))
        popular_metrics = {**rank_metrics(first.ranks, [5, K]), "users": len(first.ranks)}
        ranks[MOST_POPULAR] = popular
    if not statistics:
        return [], popular_metrics

    lines = ["## Statistics", ""]
    lines += _seed_table(methods, popular_metrics)
    lines += _paired_section(methods, ranks, notes)
    lines += _pruning_section(methods, notes)
    lines += _gold_share_section(methods)
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return lines, popular_metrics


def _seed_table(methods: list[MethodRuns], popular: dict[str, Any]) -> list[str]:
    headers = ["method", "seeds"] + [f"test {m.upper()} mean ± std [95% t interval]" for m in METRICS]
    headers += [f"valid NDCG@{K} mean ± std"]
    rows = []
    for m in methods:
        cells = [m.label, str(len(m.runs))]
        for metric in [*(("test", x) for x in METRICS), ("valid", f"ndcg@{K}")]:
            values = [
                float(v)
                for r in m.runs.values()
                if isinstance(v := ((r.summary or {}).get(metric[0]) or {}).get(metric[1]), (int, float))
            ]
            if not values:
                cells.append("–")
                continue
            s = seed_summary(values)
            text = format_number(s.mean) + ("" if math.isnan(s.std) else f" ± {format_number(s.std)}")
            if metric[0] == "test" and not math.isnan(s.low):
                text += f" [{format_number(s.low)}, {format_number(s.high)}]"
            cells.append(text + (f" (n={len(values)})" if len(values) != len(m.runs) else ""))
        rows.append(cells)
    rows.append(
        [f"{MOST_POPULAR} (top-{K} by training frequency)", "–", *(format_number(popular.get(m)) for m in METRICS), "–"]
    )
    return [
        "### Each method over seeds (test at the selected epoch; std with ddof = 1; interval: t over seeds)",
        "",
        markdown_table(headers, rows),
        "",
    ]


def _paired_section(methods: list[MethodRuns], ranks: dict[str, dict[Any, UserRanks]], notes: list[str]) -> list[str]:
    lines = [
        "### Paired comparisons (per-user differences on the same test users)",
        "",
        f"Each line: mean per-user difference (first minus second) of NDCG@{K} and HR@{K}, a paired bootstrap "
        "95% interval and a paired permutation test's two-sided p-value (scipy.stats.bootstrap, "
        "permutation_test); per seed, and pooled over seeds (user-seed pairs). A difference is called "
        "distinguishable from noise when its interval excludes 0 and p < 0.05; with several comparisons, "
        "about one in twenty null differences passes that bar by chance.",
        "",
    ]
    pairs = _comparison_pairs(methods)
    if not pairs:
        return [*lines, "No pair to compare (needs two configurations).", ""]
    compared = 0
    clear: list[str] = []
    unclear: list[str] = []
    for a, b in pairs:
        ra, rb = ranks.get(a, {}), ranks.get(b, {})
        seeds = [s for s in rb if s in ra]
        if not seeds:
            notes.append(f"{a} vs {b}: no seed with per-user test ranks for both")
            continue
        per_seed: list[str] = []
        pooled: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
        for s in seeds:
            ua, ub = ra[s], rb[s]
            if ua.user_ids != ub.user_ids:
                notes.append(f"{a} vs {b}, seed {s}: the two runs were tested on different users; left out")
                continue
            xa, xb = ua.per_user(), ub.per_user()
            diffs = {m: paired_difference(xa[m], xb[m], seed=int(s) if isinstance(s, int) else 0) for m in METRICS}
            per_seed.append("  - " + _describe(f"seed {s}", diffs, "one seed"))
            for m in METRICS:
                pooled[m].append(xa[m] - xb[m])
        if not per_seed:
            continue
        compared += 1
        d = {m: paired_difference(np.concatenate(pooled[m]), np.zeros(sum(len(x) for x in pooled[m]))) for m in METRICS}
        lines.append(f"- **{a} vs {b}**: " + _describe("pooled", d, f"over {len(per_seed)} seed(s)"))
        lines += per_seed
        ndcg = d[METRICS[0]]
        (clear if ndcg.distinguishable else unclear).append(f"{a} vs {b} ({ndcg.mean_diff:+.4f})")
    if not compared:
        lines.append("No pair had per-user test ranks for both sides (see the notes).")
        return [*lines, ""]
    summary = [
        "In plain words (pooled over seeds, NDCG@10): "
        + (
            f"distinguishable from noise: {'; '.join(clear)}. "
            if clear
            else "no difference is distinguishable from noise. "
        )
        + (f"Not distinguishable from noise: {'; '.join(unclear)}." if unclear else ""),
        "",
    ]
    return [*lines, "", *summary]


def _counts(analysis: dict[str, Any]) -> tuple[int, int, int] | None:
    """(top-B positives, pruned, pruned violating) of an analysis.json, None when a count is missing."""
    values = [analysis.get(k) for k in ("topb_positives", "pruned", "pruned_violating")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    positives, pruned, violating = values
    return (positives, pruned, violating) if violating <= pruned <= positives else None


def _pruning_section(methods: list[MethodRuns], notes: list[str]) -> list[str]:
    rows = []
    for m in methods:
        counted = []
        for run in m.runs.values():
            if run.analysis is None:
                continue
            c = _counts(run.analysis)
            if c is None:
                notes.append(
                    f"{run.name}: analysis.json lacks consistent topb_positives/pruned/pruned_violating counts"
                )
            else:
                counted.append((run, c))
        if not counted:
            rows.append([m.label, "0", "no analysis with counts", "–", "n = 0", "n = 0"])
            continue
        users = sum(int(r.analysis.get("users") or 0) for r, _ in counted)
        share = wilson_interval(sum(c[1] for _, c in counted), sum(c[0] for _, c in counted))
        violating = wilson_interval(sum(c[2] for _, c in counted), sum(c[1] for _, c in counted))
        rows.append(
            [
                m.label,
                str(len(counted)),
                f"{users:,}",
                " / ".join(f"{c[1]}/{c[0]}" for _, c in counted),
                _share_text(share),
                _share_text(violating),
            ]
        )
    if not rows:
        return []
    headers = ["method", "runs", "users analysed", "pruned / top-B positives per run"]
    headers += ["pruned share, pooled [Wilson 95%]", "per-token condition violated (of pruned) [Wilson 95%]"]
    return ["### Pruning analysis with counts (analysis.json)", "", markdown_table(headers, rows), ""]


def _share_text(share: Any) -> str:
    if share.n == 0:
        return "n = 0"
    return f"{share.k}/{share.n} = {100 * share.share:.1f}% [{100 * share.low:.1f}%, {100 * share.high:.1f}%]"


def _gold_share_section(methods: list[MethodRuns]) -> list[str]:
    rows = []
    for m in methods:
        series = [
            [
                float(r["frac_outside_topb"])
                for r in run.train_log
                if isinstance(r.get("frac_outside_topb"), (int, float))
            ]
            for run in m.runs.values()
        ]
        series = [s for s in series if any(math.isfinite(v) for v in s)]
        if not series:
            rows.append([m.label, "0", "–", "–"])
            continue
        cells = [m.label, str(len(series))]
        for last in (False, True):
            s = window_mean_over_seeds(series, STEP_WINDOW, last=last)
            cells.append(format_number(s.mean) + ("" if math.isnan(s.std) else f" ± {format_number(s.std)}"))
        rows.append(cells)
    if not rows:
        return []
    headers = ["method", "runs", f"first {STEP_WINDOW} steps, mean ± std over seeds", f"last {STEP_WINDOW} steps"]
    return [
        "### Share of gold tokens outside the top-B next tokens (train_log.jsonl frac_outside_topb)",
        "",
        markdown_table(headers, rows),
        "",
    ]


__all__ = ["MOST_POPULAR", "evidence_sections", "most_popular_ranks_for", "test_ranks"]
