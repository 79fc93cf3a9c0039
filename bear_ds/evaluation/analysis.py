"""`bear-ds analyze`: the pruning analysis (`bear_ds.evaluation.pruning`) of a model's beam search
against the exhaustive ranking of the whole catalog (`bear_ds.evaluation.exhaustive`), users sharded
across ranks; writes analysis.jsonl (one record per user, with the prefixes of a pruned target and
of the beam that beat it as text) and analysis.json (aggregates).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from bear_ds.config import save_config
from bear_ds.distributed import end_distributed, make_accelerator
from bear_ds.evaluation.evaluate import (
    check_output_folder_together,
    choose_mask,
    holds_output_lock,
    load_eval_inputs,
    load_eval_model,
    shard_indices,
)
from bear_ds.evaluation.pruning import aggregate_pruning, analyze_users
from bear_ds.outputs import open_atomic, write_json_atomic

logger = logging.getLogger(__name__)


@holds_output_lock
def analyze(cfg) -> dict[str, Any]:
    """`bear-ds analyze`: pruning analysis of the model in `model.path` on `eval.split`.

    Writes output_dir/analysis.json (aggregates) and analysis.jsonl (one record per user). Always
    uses a full model copy per rank (eval.weights is ignored); users are sharded across ranks, as
    `evaluate` does, on the same Accelerate machinery.
    """
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(None, timeout_s=cfg.eval.timeout_s)
    check_output_folder_together(accelerator, out, "analyze")  # before the exhaustive ranking, not after
    inputs = load_eval_inputs(cfg, accelerator)
    model = load_eval_model(Path(cfg.model.path), accelerator)
    ks = inputs.ks
    catalog = inputs.catalog
    mask, mask_reason = choose_mask(cfg.eval.mask, Path(cfg.model.path), cfg.loss.name)
    num_users = min(len(inputs.prompt_ids), cfg.analyze.max_users)  # the exhaustive ranking is costly
    mine = shard_indices(num_users, accelerator.process_index, accelerator.num_processes)
    mine.sort(key=lambda i: -len(inputs.prompt_ids[i]))
    bar = tqdm(total=len(mine), desc="analyze", unit="user", disable=not accelerator.is_main_process)
    local = analyze_users(
        model,
        [inputs.prompt_ids[i] for i in mine],
        [inputs.target_groups[i] for i in mine],
        catalog.group_token_ids,
        catalog.trie,
        num_beams=cfg.eval.num_beams,
        eos_token_id=catalog.eos_token_id,
        pad_token_id=inputs.pad_token_id,
        mask=mask,
        length_penalty=cfg.eval.length_penalty,
        batch_items=cfg.analyze.batch_items,
        batch_users=cfg.eval.batch_users,
        progress=bar,
        rank_cap=max([*ks, cfg.eval.num_beams]),  # HR@K of the exhaustive ranking needs ranks below max K only
    )
    bar.close()
    records: list[dict[str, Any]] = [None] * num_users  # type: ignore[list-item]
    for i, rec in gather_object(list(zip(mine, local, strict=True))):  # every rank's, on every rank
        records[i] = rec
    summary = aggregate_pruning(records, ks)
    summary.update(
        num_beams=cfg.eval.num_beams,
        mask=mask,
        mask_reason=mask_reason,
        length_penalty=cfg.eval.length_penalty,
        split=cfg.eval.split,
        global_rank_by="total log-probability (not length-normalised)",
        global_rank_exact_below=max([*ks, cfg.eval.num_beams]),  # beyond: a lower bound (analysis.jsonl)
        elapsed_s=time.perf_counter() - started,
    )
    if accelerator.is_main_process:
        # analysis.json is written last: a folder holding it holds the matching per-user records
        (out / "analysis.json").unlink(missing_ok=True)
        with open_atomic(out / "analysis.jsonl") as fh:
            for i, rec in enumerate(records):
                row = {"user_id": inputs.user_ids[i], "target": inputs.target_titles[i], **rec}
                row["exhaustive_top"] = [catalog.group_titles[g] for g in rec["exhaustive_top"]]
                row["beam_top"] = [catalog.group_titles[g] for g in rec["beam_top"]]
                row.update(_pruned_prefix_texts(rec, catalog.group_token_ids, inputs.tokenizer))
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        save_config(cfg, out)
        write_json_atomic(out / "analysis.json", summary)
        logger.info("analysis written to %s", out / "analysis.json")
    end_distributed(accelerator)
    return summary


def _pruned_prefix_texts(record: dict[str, Any], group_token_ids: Any, tokenizer: Any) -> dict[str, str | None]:
    """A pruned record's two prefixes as text (what the report shows, so nothing is re-decoded):
    the target's first pruned_step + 1 tokens, and the B-th live beam that beat it."""
    if not record.get("pruned"):
        return {}
    target_ids = list(group_token_ids[record["target_group"]])[: record["pruned_step"] + 1]
    cutoff_ids = record.get("beam_cutoff_ids")
    return {
        "pruned_prefix": tokenizer.decode(target_ids, skip_special_tokens=True),
        "beam_cutoff_prefix": None if cutoff_ids is None else tokenizer.decode(cutoff_ids, skip_special_tokens=True),
    }
