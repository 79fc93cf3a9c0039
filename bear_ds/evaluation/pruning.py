"""The beam-search pruning analysis: beam search (width B) against the exhaustive ranking
(`bear_ds.evaluation.exhaustive`), per user:

- the target's global rank (by total log-probability, ties counted in the target's favour);
- whether beam search returns it;
- for targets in the global top-B that beam search misses, the decoding step at which the target's
  prefix left the live beams, that prefix's log p and the B-th live beam that beat it (the paper's
  Figure 1), and whether the per-token condition (the gold token ranks within the top-B trie-valid
  next tokens given the gold prefix, the relaxed condition BEAR trains for) fails at or before that
  step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from bear_ds.evaluation.exhaustive import CatalogTargets, ExhaustiveScores, PruneBound, exhaustive_scores_batch
from bear_ds.evaluation.metrics import rank_metrics
from bear_ds.generation.beam import BeamResult, constrained_beam_search, left_pad
from bear_ds.trie import TokenTrie


def _path_states(token_ids: Sequence[int], trie: TokenTrie) -> list[int]:
    """Trie state after each prefix (1..T tokens) of a title."""
    states, cur = [], torch.zeros(1, dtype=torch.int64, device=trie.device)
    for tok in token_ids:
        cur = trie.advance(cur, torch.tensor([tok], device=trie.device))
        states.append(int(cur))
    return states


def user_pruning_record(
    target_group: int | None,
    scores: ExhaustiveScores,
    beam: BeamResult,
    user: int,
    catalog_token_ids: Sequence[Sequence[int]],
    trie: TokenTrie,
    num_beams: int,
) -> dict[str, Any]:
    """Pruning facts for one user (`user` indexes the rows of `beam`, run with `return_trace=True`)."""
    order = torch.argsort(scores.total_logp, descending=True, stable=True)
    returned = [g for g in beam.groups[user].tolist() if g >= 0]
    rec: dict[str, Any] = {
        "target_group": target_group,
        "exhaustive_top": order[:num_beams].tolist(),
        "exhaustive_logp": scores.total_logp[order[:num_beams]].tolist(),
        "beam_top": returned,
        "beam_rank": returned.index(target_group) if target_group in returned else None,
    }
    if target_group is None:
        rec.update(global_rank=None, in_top_b=False, condition_holds=None, pruned=None)
        return rec
    target_total = scores.total_logp[target_group]
    global_rank = int((scores.total_logp > target_total).sum())
    length = int(scores.lengths[target_group])
    fails = (scores.token_rank[target_group, :length] >= num_beams).tolist()  # per-token condition violated
    rec.update(
        global_rank=global_rank,
        in_top_b=global_rank < num_beams,
        target_logp=float(target_total),
        condition_holds=not any(fails),
        condition_fail_steps=[t for t, f in enumerate(fails) if f],
    )
    pruned = rec["in_top_b"] and rec["beam_rank"] is None
    rec["pruned"] = pruned
    if pruned:
        path = _path_states(catalog_token_ids[target_group], trie)
        steps_run = int(beam.steps[user])
        if beam.live_states is None:
            raise ValueError("the beam search must be run with return_trace=True for the pruning analysis")
        pruned_step, reason = length - 1, "finished_but_not_returned"
        for step in range(length - 1):  # the last step emits EOS: the item finishes, it is not a live beam
            if step >= steps_run:
                pruned_step, reason = step, "search_stopped"
                break
            if path[step] not in beam.live_states[step][user].tolist():
                pruned_step, reason = step, "pruned"
                break
        rec.update(
            pruned_step=pruned_step,
            prune_reason=reason,
            violated_at_or_before=any(fails[: pruned_step + 1]),
            pruned_prefix_logp=float(scores.token_logp[target_group, : pruned_step + 1].sum()),
            **_beam_cutoff(beam, user, pruned_step if reason == "pruned" else None, trie),
        )
    return rec


def _beam_cutoff(beam: BeamResult, user: int, step: int | None, trie: TokenTrie) -> dict[str, Any]:
    """The B-th (lowest kept) live beam at `step`, the prefix that beat the dropped target's: its
    cumulative log p (no length penalty) and token ids; None when no live beam was cut at that step
    (the search had stopped, or the target finished but was not returned)."""
    none = {"beam_cutoff_logp": None, "beam_cutoff_ids": None}
    if step is None or beam.live_states is None or beam.live_thresholds is None:
        return none
    live = [s for s in beam.live_states[step][user].tolist() if s >= 0]  # best first
    threshold = float(beam.live_thresholds[user, step])
    if not live or not math.isfinite(threshold):
        return none
    return {"beam_cutoff_logp": threshold, "beam_cutoff_ids": _prefix_ids(live[-1], trie)}


def _prefix_ids(state: int, trie: TokenTrie) -> list[int]:
    """Token ids from the root to trie node `state`, walking up its parent edges."""
    ids: list[int] = []
    while state != 0:  # node 0 is the root
        edge = int((trie.edge_child == state).nonzero()[0, 0])
        ids.append(int(trie.edge_token[edge]))
        state = int(trie.edge_key[edge]) // trie.vocab_size
    return ids[::-1]


def aggregate_pruning(records: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Shares of pruned top-B positives and of those violating the per-token condition; recall@K."""
    in_top = [r for r in records if r["in_top_b"]]
    pruned = [r for r in in_top if r["pruned"]]
    violating = [r for r in pruned if r["violated_at_or_before"]]
    with_target = [r for r in records if r["global_rank"] is not None]
    exh = rank_metrics([r["global_rank"] for r in records], ks)
    beam = rank_metrics([r["beam_rank"] for r in records], ks)
    reasons: dict[str, int] = {}
    for r in pruned:
        reasons[r["prune_reason"]] = reasons.get(r["prune_reason"], 0) + 1
    return {
        "users": len(records),
        "targets_not_in_catalog": len(records) - len(with_target),
        "topb_positives": len(in_top),  # targets whose total probability is in the global top-B
        "pruned": len(pruned),  # ... that beam search does not return
        "pruned_share": len(pruned) / len(in_top) if in_top else None,
        "pruned_violating": len(violating),  # ... whose per-token condition failed at or before pruning
        "pruned_violating_share": len(violating) / len(pruned) if pruned else None,
        "prune_reasons": reasons,
        "share_users_condition_holds": (
            sum(bool(r["condition_holds"]) for r in with_target) / len(with_target) if with_target else None
        ),
        "exhaustive": {f"hr@{k}": exh[f"hr@{k}"] for k in ks},  # recall@K of the exact ranking
        "beam": {f"hr@{k}": beam[f"hr@{k}"] for k in ks},  # recall@K of beam search
    }


def analyze_users(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    target_groups: Sequence[int | None],
    group_token_ids: Sequence[Sequence[int]],
    trie: TokenTrie,
    *,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    mask: str = "after",
    length_penalty: float = 1.0,
    batch_items: int = 256,
    batch_users: int = 16,
    progress: Any = None,
    bounded: bool = True,
    rank_cap: int | None = None,
    probe: bool = True,
) -> list[dict[str, Any]]:
    """Per-user pruning records (one process, full model) for the given prompts, in input order.

    bounded: skip trie subtrees that cannot change a record (`PruneBound`: a probe walk finds the
    first top-B estimate; `probe=False`: beam search's B groups, teacher-forced, are that estimate);
    False walks the whole trie. All give the same records.
    batch_users: users per beam search and per exhaustive walk (`exhaustive_scores_batch`: their
    trie nodes share forwards of at most `batch_items` rows).
    rank_cap (bounded only): global ranks are exact below it; a record at or beyond it has
    `global_rank_exact: false` and a global_rank that is a lower bound (>= rank_cap)."""
    if rank_cap is not None and (not bounded or rank_cap < num_beams):
        raise ValueError(f"rank_cap needs bounded=True and rank_cap >= num_beams ({num_beams}), got {rank_cap}")
    device = next(model.parameters()).device
    trie_dev = trie.to(device)
    targets = CatalogTargets.build(group_token_ids, trie)
    records: list[dict[str, Any]] = []
    for start in range(0, len(prompt_ids), batch_users):
        chunk = prompt_ids[start : start + batch_users]
        input_ids, attention_mask = left_pad(chunk, pad_token_id, device)
        beam = constrained_beam_search(
            model,
            input_ids,
            attention_mask,
            trie_dev,
            num_beams=num_beams,
            eos_token_id=eos_token_id,
            mask=mask,
            length_penalty=length_penalty,
            return_trace=True,
            return_thresholds=True,  # the B-th live beam's log p at each step: what beat a dropped target
        )
        beam = BeamResult(
            beam.groups.cpu(),
            beam.scores.cpu(),
            beam.steps.cpu(),
            [s.cpu() for s in beam.live_states or []],
            live_thresholds=beam.live_thresholds.cpu() if beam.live_thresholds is not None else None,
        )
        # the bounded walk's first top-B estimate: its probe's groups, or beam search's
        candidates = [[] if probe else [g for g in beam.groups[j].tolist() if g >= 0] for j in range(len(chunk))]
        bounds = [
            PruneBound(target_groups[start + j], candidates[j], num_beams, rank_cap=rank_cap) if bounded else None
            for j in range(len(chunk))
        ]
        batch_scores = exhaustive_scores_batch(
            model, chunk, targets, trie_dev, mask=mask, batch_items=batch_items, bounds=bounds, probe=probe
        )
        for j, scores in enumerate(batch_scores):
            record = user_pruning_record(target_groups[start + j], scores, beam, j, group_token_ids, trie, num_beams)
            if rank_cap is not None and record["global_rank"] is not None:
                record["global_rank_exact"] = record["global_rank"] < rank_cap
            records.append(record)
            if progress is not None:
                progress.update(1)
    return records
