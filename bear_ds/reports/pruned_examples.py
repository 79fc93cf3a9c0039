"""The phenomenon behind the pruned share, shown the way the paper's Figure 1 does: for each method,
pruned top-B positives from `bear-ds analyze`'s per-user records (analysis.jsonl), each with its
rank by total probability, the decoding step at which beam search dropped its prefix, that prefix's
log p and the B-th surviving prefix that beat it. Everything is read from the records; nothing is
re-decoded.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

from bear_ds.runs import RunData, find_output, read_jsonl

EXAMPLES_PER_METHOD = 2


class _Method(Protocol):  # evidence.MethodRuns (not imported: evidence imports this module)
    label: str
    runs: dict[Any, RunData]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pruned_example_problem(record: dict[str, Any]) -> str | None:
    """What makes an analysis.jsonl row unusable as a pruned example, or None (rows of targets that
    were not pruned, or pruned after the search stopped, are usable: they are simply not examples)."""
    if record.get("pruned") is not True or record.get("prune_reason") != "pruned":
        return None
    for key in ("global_rank", "pruned_step"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key} {json.dumps(value)} is not an integer >= 0"
    for key in ("target_logp", "pruned_prefix_logp", "beam_cutoff_logp"):
        if not _is_number(record.get(key)):
            return f"{key} {json.dumps(record.get(key))} is not a finite number (analysis.jsonl from an older bear-ds?)"
    for key in ("target", "pruned_prefix", "beam_cutoff_prefix"):
        if not isinstance(record.get(key), str):
            return f"{key} {json.dumps(record.get(key))} is not a string (analysis.jsonl from an older bear-ds?)"
    return None


def _examples_of(run: RunData, notes: list[str]) -> list[dict[str, Any]] | None:
    """The run's pruned-at-a-live-step records, best-ranked targets first; None without analysis.jsonl."""
    path, why = find_output(run.folder, "analysis.jsonl")
    if path is None:
        notes.append(f"{run.name}: no pruned examples ({why})")
        return None
    records, problems = read_jsonl(path, pruned_example_problem)
    notes.extend(problems)
    pruned = [r for r in records if r.get("pruned") is True and r.get("prune_reason") == "pruned"]
    return sorted(pruned, key=lambda r: r["global_rank"])  # stable: file order among equal ranks


def _beams(run: RunData) -> str:
    beams = (run.analysis or {}).get("num_beams", run.config_value("eval.num_beams"))
    return str(beams) if isinstance(beams, int) and not isinstance(beams, bool) else "B"


def describe_example(record: dict[str, Any], seed: Any, beams: str) -> str:
    """One pruned positive in words (steps 1-based, as a reader counts tokens)."""
    return (
        f"seed {seed}, user {record.get('user_id')}: target {json.dumps(record['target'], ensure_ascii=False)}, "
        f"rank {record['global_rank'] + 1} of the catalog by total probability (log p {record['target_logp']:.2f}); "
        f"beam search dropped its prefix {json.dumps(record['pruned_prefix'], ensure_ascii=False)} at decoding "
        f"step {record['pruned_step'] + 1} (log p {record['pruned_prefix_logp']:.2f}), beaten by the lowest of the "
        f"{beams} surviving prefixes {json.dumps(record['beam_cutoff_prefix'], ensure_ascii=False)} "
        f"(log p {record['beam_cutoff_logp']:.2f})"
    )


def pruned_examples_section(methods: list[_Method], notes: list[str]) -> list[str]:
    """Markdown lines: EXAMPLES_PER_METHOD pruned top-B positives per method (its seeds in order)."""
    lines = [
        "### Pruned top-B positives, as in the paper's Figure 1 (analysis.jsonl)",
        "",
        "Test users whose target is among the B most probable titles of the whole catalog (exhaustive "
        "ranking by total log p) but not among beam search's B: the step at which its prefix left the B "
        "live beams, and the lowest of those B, which beat it. The best-ranked such targets of each method.",
        "",
    ]
    shown = 0
    for m in methods:
        found: list[str] = []
        analysed = False
        for seed, run in m.runs.items():
            examples = _examples_of(run, notes)
            analysed |= examples is not None
            for record in (examples or [])[: EXAMPLES_PER_METHOD - len(found)]:
                found.append("  - " + describe_example(record, seed, _beams(run)))
        if found:
            lines += [f"- **{m.label}**:", *found]
            shown += 1
        else:
            why = "no top-B positive was pruned at a live step" if analysed else "no analysis.jsonl"
            lines.append(f"- **{m.label}**: none to show ({why})")
    return [*lines, ""] if shown or methods else []
