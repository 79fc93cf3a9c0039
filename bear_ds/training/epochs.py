"""What happens after a training epoch: the valid/test beam-search evaluation (`EpochEvaluator`),
the test ranks of the best epoch so far, and the selected epoch's summary."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from bear_ds.catalog import fit_prompts
from bear_ds.config import Config, ConfigError
from bear_ds.data import load_split
from bear_ds.evaluation.evaluate import metric_ks, run_beam_evaluation

logger = logging.getLogger(__name__)


class EpochEvaluator:
    """Valid (first train.eval_max_users users) and test beam-search metrics after an epoch."""

    def __init__(
        self, cfg: Config, prepared: Path, titles: dict[str, str], builder, catalog, tokenizer, context: int
    ) -> None:
        self.run, self.cfg = run_beam_evaluation, cfg
        self.splits: dict[str, tuple[list[list[int]], list[int | None]]] = {}
        self.user_ids: dict[str, list[str]] = {}
        # per user of the last evaluation of each split: {"user_id", "target_rank"} (for paired statistics)
        self.last_ranks: dict[str, list[dict[str, Any]]] = {}
        for split, cap in (("valid", cfg.train.eval_max_users), ("test", cfg.eval.max_users)):
            rows = load_split(prepared, split)
            if cap is not None:
                rows = rows.select(range(min(cap, len(rows))))
            fitted = fit_prompts(
                [[titles[i] for i in h] for h in rows["history"]], tokenizer, builder,
                context - catalog.trie.max_depth,  # room for the longest title, as `bear-ds evaluate` leaves
                truncate=cfg.eval.truncate_history, what=f"{split} user", option="eval.truncate_history",
            )  # fmt: skip
            if fitted.truncated_examples:
                logger.warning("%s: %d prompts lost oldest history items to fit the context", split,
                               fitted.truncated_examples)  # fmt: skip
            self.splits[split] = (fitted.prompt_ids, [catalog.group_of_item(t) for t in rows["target"]])
            self.user_ids[split] = [str(u) for u in rows["user_id"]]

    def __call__(
        self, accelerator, model, tokenizer, catalog, splits: tuple[str, ...] = ("valid", "test")
    ) -> dict[str, dict[str, Any]]:
        results = {}
        for split in splits:
            prompts, groups = self.splits[split]
            if not prompts:  # an empty test split: nothing to report
                results[split] = {}
                continue
            predictions, metrics = self.run(
                model, tokenizer, catalog, prompts, groups, self.cfg.eval, accelerator,
                loss_name=self.cfg.loss.name, progress=accelerator.is_main_process,
            )  # fmt: skip
            results[split] = metrics
            self.last_ranks[split] = [
                {"user_id": u, "target_rank": p["target_rank"]}
                for u, p in zip(self.user_ids[split], predictions, strict=True)
            ]
        return results


def read_export_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "export_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_select_metric(cfg: Config) -> None:
    """Fail before training, not after the first epoch, when train.select_metric is not computed."""
    ks, _ = metric_ks(cfg.eval.top_k, cfg.eval.num_beams, warn=False)
    allowed = [f"{name}@{k}" for name in ("hr", "ndcg") for k in ks]
    if cfg.train.select_metric not in allowed:
        raise ConfigError(
            f"train.select_metric={cfg.train.select_metric!r} is not among the metrics the per-epoch evaluation "
            f"computes with eval.top_k={cfg.eval.top_k} and eval.num_beams={cfg.eval.num_beams}: "
            f"{', '.join(allowed) or 'none'} (K above num_beams is left out)"
        )


def write_test_ranks(path: Path, ranks: list[dict[str, Any]], epoch: int) -> None:
    """Per-user test ranks of the best epoch so far (the selected one at the end), for paired
    statistics across methods; written whole then renamed, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for row in ranks:
            fh.write(json.dumps({"epoch": epoch, **row}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def metric_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("hr@", "ndcg@")))


def selected_epoch_summary(
    records: list[dict[str, Any]], cfg: Config, model_dir: Path, model_info: dict[str, str]
) -> dict[str, Any]:
    """summary.json's part for the epoch `cfg.train.select_metric` selects among `records` (epochs.jsonl,
    rank 0); flags (in `model_info`, and in the log) a `model_dir` export that is not that epoch's."""
    metric = cfg.train.select_metric
    best = max(records, key=lambda r: r["valid"][metric])
    selection: dict[str, Any] = {
        "selected_epoch": best["epoch"], "select_metric": metric, "valid": best["valid"], "test": best["test"],
    }  # fmt: skip
    exported = read_export_info(model_dir)
    if exported.get("epoch") != best["epoch"]:
        # a crash between an epoch's export and its checkpoint, then a replay that did not improve
        # on the best: OUT/model is from a discarded continuation. Say so rather than pair them.
        why = (
            f"{model_dir} holds epoch {exported.get('epoch')} (step {exported.get('step')}) but the "
            f"selected epoch is {best['epoch']}; re-export that epoch from its checkpoint if it is still kept"
        )
        model_info["mismatch"] = why
        logger.error("%s", why)
    if cfg.train.eval_test == "every_epoch":
        selection["test_max_over_epochs"] = {
            "protocol": "released (max over epochs of TEST metrics; for comparison only, not model selection)",
            **{
                k: max(r["test"].get(k, -math.inf) for r in records)
                for k in best["test"]
                if k.startswith(("hr@", "ndcg@"))
            },  # fmt: skip
        }
    return selection
