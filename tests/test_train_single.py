"""Single-process training (no launcher, no DeepSpeed): the path `bear-ds demo` and sweeps take on one machine."""

from __future__ import annotations

import json

import pytest
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.training import train


@pytest.mark.slow
def test_on_improvement_decodes_test_only_after_better_epochs(tmp_path):
    prepared = write_prepared(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"data.path={prepared}", f"output_dir={out}", "train.zero_stage=0", "train.epochs=3",
        "train.global_batch=32", "train.eval_test=on_improvement", "train.eval_max_users=8",
        "eval.num_beams=5", "eval.top_k=[1,5]", "train.select_metric=ndcg@5",
    ])  # fmt: skip
    summary = train(cfg)
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    best_so_far = float("-inf")
    for record in epochs:  # test is decoded exactly when valid improves (strictly)
        improved = record["valid"]["ndcg@5"] > best_so_far
        best_so_far = max(best_so_far, record["valid"]["ndcg@5"])
        assert bool(record["test"]) == improved, record
    best = max(epochs, key=lambda r: r["valid"]["ndcg@5"])
    assert summary["selected_epoch"] == best["epoch"] and summary["test"] == best["test"]
    assert summary["test"]["users"] == 16
    assert "test_max_over_epochs" not in summary  # the released figure needs every epoch's test
    assert 0 < summary["optim_time_s"] <= summary["train_time_s"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, summary["steps"] + 1))
    assert all(r["world_size"] == 1 and r["zero_stage"] == 0 and r["step_time_s"] > 0 for r in log)
