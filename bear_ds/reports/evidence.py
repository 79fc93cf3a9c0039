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
from bear_ds.reports.pruned_examples import pruned_examples_section
from bear_ds.reports.stats import (
    PairedDifference,
    is_rank,
    paired_difference,
    per_user_metrics,
    seed_summary,
    user_level_difference,
    wilson_interval,
    window_mean_over_seeds,
)
from bear_ds.reports.tables import format_number, is_finite_number, markdown_table
from bear_ds.runs import RunData, find_output, read_jsonl

DEFAULT_K = 10  # K of the statistics when no run says which K it evaluated
MOST_POPULAR = "most-popular"
STEP_WINDOW = 50  # steps averaged at the start and the end of training for the gold-token share


@dataclass
class UserRanks:
    """One run's (or the most-popular list's) test ranks, user by user in split order."""

    user_ids: list[str]
    ranks: list[int | None]
    source: str

    def per_user(self, k: int) -> dict[str, np.ndarray]:
        return per_user_metrics(self.ranks, k)


@dataclass
class MethodRuns:
    """A group of runs (one configuration, its seeds): seed -> run."""

    label: str
    loss_name: str | None
    runs: dict[Any, RunData] = field(default_factory=dict)


def _metrics(k: int) -> tuple[str, str]:
    """The statistics' metrics at K: NDCG@K first (the headline), then HR@K."""
    return (f"ndcg@{k}", f"hr@{k}")


def _ks_of(metrics: Any) -> set[int]:
    """The K values of a metrics dict's hr@K / ndcg@K keys."""
    if not isinstance(metrics, dict):
        return set()
    return {
        int(key.split("@")[1]) for key in metrics if key.startswith(("hr@", "ndcg@")) and key.split("@")[1].isdigit()
    }


def statistics_k(runs: list[RunData]) -> tuple[int, str | None]:
    """(K of the statistics' HR@K and NDCG@K, a note when it is not the runs' selection metric's K).

    The K of the selection metric (summary.json select_metric) when the runs agree on it and every
    run evaluated it; else the largest K that every run evaluated (its test metrics, K capped at
    its eval.num_beams: beam search returns num_beams items, so a larger K is not measured)."""
    evaluated: list[set[int]] = []
    selected: set[int] = set()
    for run in runs:
        summary = run.summary or {}
        ks = _ks_of(summary.get("test")) or _ks_of(run.eval_metrics)
        beams = run.config_value("eval.num_beams")
        if isinstance(beams, int) and not isinstance(beams, bool):
            ks = {k for k in ks if k <= beams}
        if ks:
            evaluated.append(ks)
        chosen = summary.get("select_metric")
        if isinstance(chosen, str) and chosen.partition("@")[2].isdigit():
            selected.add(int(chosen.partition("@")[2]))
    common = set.intersection(*evaluated) if evaluated else set()
    if len(selected) == 1 and (not evaluated or selected <= common):
        return next(iter(selected)), None
    if common:
        why = (
            f"the runs select epochs on metrics at different K ({', '.join(map(str, sorted(selected)))})"
            if len(selected) > 1
            else "no selection metric that every run evaluated"
        )
        return max(common), f"statistics at K = {max(common)}, the largest K every run evaluated: {why}"
    if evaluated:
        return DEFAULT_K, f"statistics at K = {DEFAULT_K}: the runs evaluated no K in common"
    return DEFAULT_K, None


def rank_row_problem(record: dict[str, Any]) -> str | None:
    """What makes a per-user prediction row unusable for the statistics, or None. The writers
    (the trainer's test_predictions.jsonl, evaluate's predictions.jsonl) give each row a user_id and
    the target's 0-based rank in the returned list, null when it is not there; the trainer's rows
    also an epoch, evaluate's that list ("predictions"), which the rank must point into."""
    user = record.get("user_id")
    if not isinstance(user, (str, int)) or isinstance(user, bool):
        return f"user_id {json.dumps(user)} is not a string or an integer"
    if "target_rank" not in record:
        return "no target_rank"
    rank = record["target_rank"]
    if rank is not None and not is_rank(rank):
        return f"target_rank {json.dumps(rank)} is not null or an integer >= 0 (the 0-based rank of the target)"
    epoch = record.get("epoch")  # the trainer's rows name the epoch they are from
    if "epoch" in record and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        return f"epoch {json.dumps(epoch)} is not an integer"
    if "predictions" in record:
        listed = record["predictions"]
        if not isinstance(listed, list):
            return f"predictions is {type(listed).__name__}, not a list"
        if rank is not None and rank >= len(listed):
            return f"target_rank {rank} is past the end of its {len(listed)} predictions"
    return None


def test_ranks(run: RunData) -> tuple[UserRanks | None, str | None]:
    """The selected epoch's per-user test ranks of a run, or (None, why)."""
    path = run.folder / "test_predictions.jsonl"
    selected = (run.summary or {}).get("selected_epoch")
    if path.is_file():
        records, notes = read_jsonl(path, rank_row_problem)
        if notes:
            return None, "; ".join(notes)
        epochs = {r.get("epoch") for r in records}
        if selected is not None and epochs != {selected}:
            return None, f"{path} holds epoch(s) {sorted(epochs, key=str)}, not the selected epoch {selected}"
        return UserRanks([str(r["user_id"]) for r in records], [r["target_rank"] for r in records], path.name), None
    found, why = find_output(run.folder, "predictions.jsonl")
    if found is None:
        return None, f"no test_predictions.jsonl and {why}"
    records, notes = read_jsonl(found, rank_row_problem)
    if notes:
        return None, "; ".join(notes)
    return UserRanks([str(r["user_id"]) for r in records], [r["target_rank"] for r in records], str(found)), None


def _prepared_folder(run: RunData) -> Path | None:
    if run.config_value("data.source") == "prepared" and run.config_value("data.path"):
        return Path(str(run.config_value("data.path")))
    return run.folder / "data" if (run.folder / "data" / "train.parquet").is_file() else None


def most_popular_ranks_for(
    run: RunData, users: UserRanks | None, k: int = DEFAULT_K
) -> tuple[UserRanks | None, str | None]:
    """The top-k most-popular list scored on the run's test users (the same users, in the same order):
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
    ranks = most_popular_ranks(order, [item_group.get(str(t)) for t in test["target"]], k)
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


def _comparison_pairs(
    methods: list[MethodRuns], control: str | None = None, stage1: str | None = None
) -> list[tuple[str, str]]:
    """(a, b) labels: every other method against each LML configuration, and BEAR against MSL; in a
    folder with neither (an ablation of one method, e.g. BEAR over lam), every configuration and
    most-popular against the first configuration. A two-stage sweep: every method against the
    `control` (continue-LML) and against `stage1`, and BEAR against MSL."""
    by_loss: dict[str | None, list[str]] = {}
    for m in methods:
        if m.label != stage1:
            by_loss.setdefault(m.loss_name, []).append(m.label)
    pairs = []
    if control is not None:
        pairs += [(m.label, control) for m in methods if m.label not in (control, stage1)]
        pairs += [(MOST_POPULAR, control)]
        pairs += [(m.label, stage1) for m in methods if stage1 is not None and m.label != stage1]
        by_loss.pop("lml", None)
    for ref in by_loss.get("lml", []):
        pairs += [(m.label, ref) for m in methods if m.label != ref and m.loss_name != "lml"]
        pairs += [(MOST_POPULAR, ref)]
    for msl in by_loss.get("msl", []):
        pairs += [(bear, msl) for bear in by_loss.get("bear", [])]
    if not pairs and len(methods) > 1:
        first = methods[0].label
        pairs = [(m.label, first) for m in methods[1:]] + [(MOST_POPULAR, first)]
    return pairs


def _seed_level(pooled: dict[str, list[tuple[list[str], np.ndarray]]], k: int) -> str:
    """The seed-level view: each seed's mean difference and their spread (mean ± std, t interval)."""
    parts = []
    for m in _metrics(k):
        means = [float(diffs.mean()) for _, diffs in pooled[m]]
        s = seed_summary(means)
        spread = (
            "" if math.isnan(s.std) else f"; mean {s.mean:+.4f} ± {s.std:.4f} [t interval {s.low:+.4f}, {s.high:+.4f}]"
        )
        parts.append(f"{m.upper()} {' / '.join(f'{v:+.4f}' for v in means)}{spread}")
    return "  - seed level (each seed's mean difference): " + "; ".join(parts)


def _verdict(d: PairedDifference) -> str:
    if d.distinguishable:
        return "distinguishable from noise"
    why = "the interval includes 0" if d.low <= 0.0 <= d.high else f"p = {_fmt_p(d.p_value)} >= 0.05"
    return f"not distinguishable from noise ({why})"


def _describe(label: str, d: dict[str, PairedDifference], pooled_over: str, k: int) -> str:
    ndcg, hr = (d[m] for m in _metrics(k))
    return (
        f"{label}, {pooled_over} ({ndcg.n:,} users): NDCG@{k} difference {_fmt_diff(ndcg)}; "
        f"HR@{k} difference {_fmt_diff(hr)}. NDCG@{k}: {_verdict(ndcg)}; HR@{k}: {_verdict(hr)}"
    )


def evidence_sections(
    runs: dict[str, RunData], groups: dict[str, list[str]], *, statistics: bool = True, stage1: str | None = None
) -> tuple[list[str], dict[str, Any]]:
    """(Markdown lines, the most-popular metrics) for results.md; the metrics hold only "why" when
    the most-popular list could not be scored. statistics=False: the most-popular metrics only.
    `stage1`: the label of a two-stage sweep's stage-1 group (its other LML group is the control)."""
    methods = method_groups(runs, groups)
    k, why_k = statistics_k(list(runs.values()))
    notes: list[str] = [why_k] if why_k else []
    ranks: dict[str, dict[Any, UserRanks]] = {}
    for m in methods:
        for seed, run in m.runs.items():
            got, why = test_ranks(run)
            if got is None:
                notes.append(f"{run.name}: no per-user test ranks ({why})")
            else:
                ranks.setdefault(m.label, {})[seed] = got
    # the most-popular list, on the test users of each LML run (all runs share the data in a sweep);
    # in a two-stage sweep from stage 1's training windows (stage 2 may train on a sample of them)
    popular: dict[Any, UserRanks] = {}
    reference = next(
        (m for m in methods if (m.label == stage1 if stage1 is not None else m.loss_name == "lml")),
        methods[0] if methods else None,
    )
    if reference is not None:
        for seed, run in reference.runs.items():
            got, why = most_popular_ranks_for(run, ranks.get(reference.label, {}).get(seed), k)
            if got is None:
                notes.append(f"{MOST_POPULAR}: {why}")
            else:
                popular[seed] = got
    popular_metrics: dict[str, Any] = {
        "why": "; ".join(n[len(MOST_POPULAR) + 2 :] for n in notes if n.startswith(MOST_POPULAR)) or "no run"
    }
    if popular:
        first = next(iter(popular.values()))
        popular_metrics = {
            **rank_metrics(first.ranks, sorted({x for x in (5, k) if x <= k})),
            "users": len(first.ranks),
            "from": "stage 1's training windows" if stage1 is not None and reference.label == stage1 else None,
        }
        ranks[MOST_POPULAR] = popular
    if not statistics:
        return [], popular_metrics

    lines = ["## Statistics", ""]
    lines += _seed_table(methods, popular_metrics, notes, k)
    lines += _paired_section(methods, ranks, notes, k, stage1)
    lines += _pruning_section(methods, notes, k)
    lines += pruned_examples_section(methods, notes)
    lines += _gold_share_section(methods)
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return lines, popular_metrics


def _seed_table(methods: list[MethodRuns], popular: dict[str, Any], notes: list[str], k: int) -> list[str]:
    headers = ["method", "seeds"] + [f"test {m.upper()} mean ± std [95% t interval]" for m in _metrics(k)]
    headers += [f"valid NDCG@{k} mean ± std"]
    rows = []
    for m in methods:
        cells = [m.label, str(len(m.runs))]
        for metric in [*(("test", x) for x in _metrics(k)), ("valid", f"ndcg@{k}")]:
            values = []
            for r in m.runs.values():
                v = ((r.summary or {}).get(metric[0]) or {}).get(metric[1])
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if not math.isfinite(v):  # one inf would make the mean inf and the interval meaningless
                    notes.append(f"{r.name}: {metric[0]} {metric[1]} is {v} in summary.json; left out of the mean")
                    continue
                values.append(float(v))
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
        [
            f"{MOST_POPULAR} (top-{k} by training frequency"
            + (f" in {popular['from']})" if popular.get("from") else ")"),
            "–",
            *(format_number(popular.get(m)) for m in _metrics(k)),
            "–",
        ]
    )
    return [
        "### Each method over seeds (test at the selected epoch; std with ddof = 1; interval: t over seeds)",
        "",
        markdown_table(headers, rows),
        "",
    ]


def _valid_mean(m: MethodRuns, k: int) -> float:
    """Mean valid NDCG@k over a configuration's seeds (-inf when no run has it)."""
    values = [((r.summary or {}).get("valid") or {}).get(f"ndcg@{k}") for r in m.runs.values()]
    finite = [float(v) for v in values if is_finite_number(v)]
    return float(np.mean(finite)) if finite else -math.inf


def choose_on_valid(methods: list[MethodRuns], key: str, k: int) -> tuple[list[MethodRuns], list[str]]:
    """(the configurations kept, one line per choice): among configurations whose labels differ only
    in `key=...` (e.g. train.lr), the one with the highest mean valid NDCG@k over seeds."""
    families: dict[str, list[MethodRuns]] = {}
    for m in methods:
        family = ", ".join(part for part in m.label.split(", ") if not part.startswith(f"{key}="))
        families.setdefault(family, []).append(m)
    kept: set[int] = set()
    lines = []
    for family, members in families.items():
        chosen = max(members, key=lambda m: _valid_mean(m, k))
        kept.add(id(chosen))
        if len(members) > 1:
            tried = "; ".join(f"{_value_in_label(m.label, key)}: {_valid_mean(m, k):.4f}" for m in members)
            lines.append(f"- {family}: {_value_in_label(chosen.label, key)} (valid NDCG@{k} {tried})")
    return [m for m in methods if id(m) in kept], lines


def _value_in_label(label: str, key: str) -> str:
    return next((part for part in label.split(", ") if part.startswith(f"{key}=")), f"{key} unset")


TUNED_ON_VALID = "train.lr"  # a two-stage sweep's stage-2 learning rate, chosen per configuration


def _paired_section(
    methods: list[MethodRuns],
    ranks: dict[str, dict[Any, UserRanks]],
    notes: list[str],
    k: int,
    stage1: str | None = None,
) -> list[str]:
    lines = [
        "### Paired comparisons (per-user differences on the same test users)",
        "",
        f"Each line: mean per-user difference (first minus second) of NDCG@{k} and HR@{k}, a paired bootstrap "
        "95% interval and a paired permutation test's two-sided p-value (scipy.stats.bootstrap, "
        "permutation_test); pooled over seeds by user: each user's difference averaged over its test windows "
        "and the seeds, then users resampled (the same users under several seeds are not independent samples), "
        "with each seed's own comparison, its mean difference and their spread below (one seed of one test "
        "window per user: the pooled line is that seed's comparison). A difference is called "
        "distinguishable from noise when its interval excludes 0 and p < 0.05; with several comparisons, "
        "about one in twenty null differences passes that bar by chance.",
        "",
    ]
    if stage1 is not None:  # a two-stage sweep: each configuration at its learning rate chosen on valid
        methods, choices = choose_on_valid(methods, TUNED_ON_VALID, k)
        control = next((m.label for m in methods if m.loss_name == "lml" and m.label != stage1), None)
        lines += [
            f"Two-stage sweep: every method against the control {control or '(no continue-LML run)'} and against "
            f"{stage1}, each configuration at its {TUNED_ON_VALID} with the highest mean valid NDCG@{k} over seeds:",
            "",
            *(choices or [f"- no configuration was run at several values of {TUNED_ON_VALID}"]),
            "",
        ]
        pairs = _comparison_pairs(methods, control, stage1)
    else:
        pairs = _comparison_pairs(methods)
    if not pairs:
        return [*lines, "No pair to compare (needs two configurations).", ""]
    compared = 0
    clear: list[str] = []
    unclear: list[str] = []
    pooling_rows: list[list[str]] = []
    for a, b in pairs:
        ra, rb = ranks.get(a, {}), ranks.get(b, {})
        seeds = [s for s in rb if s in ra]
        if not seeds:
            notes.append(f"{a} vs {b}: no seed with per-user test ranks for both")
            continue
        per_seed: list[str] = []
        pooled: dict[str, list[tuple[list[str], np.ndarray]]] = {m: [] for m in _metrics(k)}
        for s in seeds:
            ua, ub = ra[s], rb[s]
            if ua.user_ids != ub.user_ids:
                notes.append(f"{a} vs {b}, seed {s}: the two runs were tested on different users; left out")
                continue
            xa, xb = ua.per_user(k), ub.per_user(k)
            # one seed of one test window per user: the pooled line below is this seed's comparison
            if len(seeds) > 1 or len(set(ua.user_ids)) < len(ua.user_ids):
                seed = int(s) if isinstance(s, int) else 0
                diffs = {m: paired_difference(xa[m], xb[m], seed=seed) for m in _metrics(k)}
                per_seed.append("  - " + _describe(f"seed {s}", diffs, "one seed", k))
            for m in _metrics(k):
                pooled[m].append((ua.user_ids, xa[m] - xb[m]))
        seeds_used = len(pooled[_metrics(k)[0]])  # the seeds tested on the same users on both sides
        if not seeds_used:
            continue
        compared += 1
        d = {m: user_level_difference(pooled[m]) for m in _metrics(k)}
        lines.append(f"- **{a} vs {b}**: " + _describe("pooled", d, f"over {seeds_used} seed(s)", k))
        if per_seed:
            lines += [*per_seed, _seed_level(pooled, k)]
        ndcg = d[_metrics(k)[0]]
        (clear if ndcg.distinguishable else unclear).append(f"{a} vs {b} ({ndcg.mean_diff:+.4f})")
        if seeds_used > 1:
            pooling_rows.append(_pooling_row(f"{a} vs {b}", ndcg, pooled[_metrics(k)[0]]))
    if not compared:
        lines.append("No pair had per-user test ranks for both sides (see the notes).")
        return [*lines, ""]
    summary = [
        f"In plain words (pooled over seeds, NDCG@{k}): "
        + (
            f"distinguishable from noise: {'; '.join(clear)}. "
            if clear
            else "no difference is distinguishable from noise. "
        )
        + (f"Not distinguishable from noise: {'; '.join(unclear)}." if unclear else ""),
        "",
    ]
    return [*lines, "", *summary, *_pooling_table(pooling_rows, k)]


def _pooling_row(pair: str, by_user: PairedDifference, per_seed: list[tuple[list[str], np.ndarray]]) -> list[str]:
    """One comparison pooled by user (as above) and as user-seed pairs taken for independent samples."""
    diffs = np.concatenate([d for _, d in per_seed])
    by_pair = paired_difference(diffs, np.zeros_like(diffs))
    ratio = (by_user.high - by_user.low) / (by_pair.high - by_pair.low) if by_pair.high > by_pair.low else math.nan
    changed = "yes" if by_user.distinguishable != by_pair.distinguishable else "no"
    return [
        pair,
        f"{_fmt_diff(by_user)}, n = {by_user.n}",
        f"{_fmt_diff(by_pair)}, n = {by_pair.n}",
        f"{ratio:.2f}",
        changed,
    ]


def _pooling_table(rows: list[list[str]], k: int) -> list[str]:
    if not rows:
        return []
    headers = [
        "pair",
        f"NDCG@{k} by user (above)",
        "user-seed pairs as independent samples",
        "interval width, by user / by pair",
        "distinguishable from noise changes",
    ]
    return [
        "Pooling over seeds by user against pooling user-seed pairs (which counts a user whose outcome repeats "
        "across seeds once per seed, so its intervals are too narrow and its p-values too small):",
        "",
        markdown_table(headers, rows),
        "",
    ]


def _counts(analysis: dict[str, Any]) -> tuple[int, int, int] | None:
    """(top-B positives, pruned, pruned violating) of an analysis.json, None when a count is missing."""
    values = [analysis.get(k) for k in ("topb_positives", "pruned", "pruned_violating")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    positives, pruned, violating = values
    return (positives, pruned, violating) if violating <= pruned <= positives else None


def _pruning_section(methods: list[MethodRuns], notes: list[str], k: int) -> list[str]:
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
        hits = [((r.summary or {}).get("test") or {}).get(f"hr@{k}") for r in m.runs.values()]
        hits = [float(h) for h in hits if is_finite_number(h)]
        beam_hr = format_number(float(np.mean(hits))) if hits else "–"
        if not counted:
            rows.append([m.label, "0", "no analysis with counts", "–", "0", beam_hr, "n = 0", "n = 0"])
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
                str(sum(c[0] for _, c in counted)),
                beam_hr,
                _share_text(share),
                _share_text(violating),
            ]
        )
    if not rows:
        return []
    # the positives and beam HR beside the share: a share can fall because the exhaustive top-B
    # changes (fewer positives), not only because beam search keeps more of them
    headers = ["method", "runs", "users analysed", "pruned / top-B positives per run", "top-B positives"]
    headers += [f"test HR@{k} (beam), mean over runs"]
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


__all__ = ["MOST_POPULAR", "choose_on_valid", "evidence_sections", "most_popular_ranks_for", "test_ranks"]
