"""Synthetic run folders in the documented layout (docs/architecture.md, "Run folder"), shared by
tests/test_reports.py and tests/test_sweep.py. No tests here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bear_ds.config import Config, save_config, with_overrides


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def metrics(hr10: float, ndcg10: float) -> dict[str, float]:
    return {
        "hr@1": hr10 / 4,
        "ndcg@1": hr10 / 4,
        "hr@5": hr10 / 2,
        "ndcg@5": ndcg10 / 2,
        "hr@10": hr10,
        "ndcg@10": ndcg10,
    }


def write_summary(folder: Path, test_ndcg10: float, *, selected_epoch: int = 2, train_time_s: float = 12.5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "loss": "bear",
        "selected_epoch": selected_epoch,
        "select_metric": "ndcg@10",
        "valid": metrics(0.3, 0.2),
        "test": metrics(2 * test_ndcg10, test_ndcg10),
        "test_max_over_epochs": metrics(2 * test_ndcg10 + 0.01, test_ndcg10 + 0.01),
        "train_time_s": train_time_s,
        "optim_time_s": train_time_s * 0.8,
        "steps": 40,
        "world_size": 1,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))


def write_run(
    folder: Path,
    overrides: list[str],
    *,
    steps: int = 12,
    epochs: int = 3,
    test_ndcg10: float = 0.1,
    pruned_share: float | None = 0.8,
    with_train_log: bool = True,
    with_analysis: bool = True,
) -> Path:
    """A finished run: config.yaml, train_log.jsonl, epochs.jsonl, summary.json, eval/metrics.json,
    analysis/analysis.json (the last two in subfolders, as `evaluate`/`analyze` output_dir)."""
    cfg = with_overrides(Config(), [*overrides, f"output_dir={folder}"])
    save_config(cfg, folder)
    if with_train_log:
        write_jsonl(
            folder / "train_log.jsonl",
            [
                {
                    "step": s,
                    "epoch": (s - 1) * epochs // steps,
                    "loss": 5.0 / s,
                    "ce": 5.0 / s,
                    "reg": 0.0,
                    "weight_mean": 1.0,
                    "frac_outside_topb": 0.6 / s,
                    "lr": 1e-3,
                    "grad_norm": 1.5,
                    "tokens_per_s": 900.0,
                    "padded_frac": 0.2,
                    "world_size": 1,
                    "zero_stage": 0,
                    "elapsed_s": 0.5 * s,
                }
                for s in range(1, steps + 1)
            ],
        )
    write_jsonl(
        folder / "epochs.jsonl",
        [
            {
                "epoch": e,
                "step": e * steps // epochs,
                "valid": metrics(0.1 * e, 0.05 * e),
                "test": metrics(0.1 * e, 0.05 * e),
            }
            for e in range(1, epochs + 1)
        ],
    )
    write_summary(folder, test_ndcg10, selected_epoch=epochs)
    (folder / "eval").mkdir(exist_ok=True)
    eval_metrics = {**metrics(2 * test_ndcg10, test_ndcg10), "users": 100, "targets_not_in_catalog": 0}
    eval_metrics.update({"decoding": {"num_beams": 10, "mask": "after"}, "elapsed_s": 3.0, "users_per_second": 33.3})
    (folder / "eval" / "metrics.json").write_text(json.dumps(eval_metrics))
    if with_analysis:
        (folder / "analysis").mkdir(exist_ok=True)
        analysis: dict[str, Any] = {
            "num_beams": 10,
            "users": 100,
            "topb_positives": 40,
            "pruned": 32,
            "pruned_violating": 24,
            "pruned_violating_share": 0.75,
            "exhaustive": {"hr@10": 0.4},
            "beam": {"hr@10": 0.08},
        }
        if pruned_share is not None:
            analysis["pruned_share"] = pruned_share
        (folder / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    return folder
