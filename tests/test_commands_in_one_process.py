"""Commands run one after another in one process (as a sweep point does: train, then analyze)
leave no process state behind: each sets up its Accelerator and tears it down (`end_distributed`)."""

from __future__ import annotations

import json

import pytest
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.pipeline import run_point


@pytest.mark.slow
def test_zero3_training_then_analysis_and_evaluation_in_one_process(tmp_path):
    import torch.distributed as dist
    from accelerate.state import PartialState
    from transformers.integrations import is_deepspeed_zero3_enabled

    from bear_ds.evaluation.evaluate import evaluate

    prepared = write_prepared(tmp_path / "data", rows=32)
    common = [f"data.path={prepared}", "model.hidden_size=32", "model.intermediate_size=64", "train.max_steps=2",
              "train.global_batch=8", "train.micro_batch=4", "train.eval_every_epoch=false", "eval.num_beams=5",
              "eval.top_k=[1,5]", "analyze.max_users=4", "eval.max_users=4"]  # fmt: skip
    cfg = load_config(None, [*common, "train.zero_stage=3"])  # ZeRO-3 in one process: the default
    run_point(cfg, tmp_path / "point")  # trained ZeRO-3 partitioned, then analysed with a plain model
    assert json.loads((tmp_path / "point" / "summary.json").read_text())["zero_stage"] == 3
    assert json.loads((tmp_path / "point" / "analysis" / "analysis.json").read_text())["num_beams"] == 5
    assert not dist.is_initialized() and not PartialState._shared_state and not is_deepspeed_zero3_enabled()
    metrics = evaluate(load_config(None, [*common, f"model.path={tmp_path / 'point' / 'model'}",
                                          f"output_dir={tmp_path / 'eval'}", "eval.weights=zero3"]))  # fmt: skip
    assert metrics["decoding"]["zero3_partitioned"] and metrics["users"] == 4
    assert not dist.is_initialized() and not is_deepspeed_zero3_enabled()
