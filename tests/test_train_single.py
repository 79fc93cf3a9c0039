"""Single-process training (no launcher, no DeepSpeed): the path `bear-ds demo` and sweeps take on one machine."""

from __future__ import annotations

import json

import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.evaluation.metrics import rank_metrics
from bear_ds.training import train


@pytest.mark.slow
def test_on_improvement_decodes_test_only_after_better_epochs(tmp_path, monkeypatch):
    from bear_ds.training import trainer

    # the tiny data's valid ndcg@5 settles in the first epoch (the marginal is learnt at once), so a real
    # run never improves later: the validation metric is scripted (worse, better, worse) to take every branch
    scripted = iter([0.2, 0.5, 0.4])
    evaluate_epoch = trainer.EpochEvaluator.__call__

    def scripted_valid(self, accelerator, model, tokenizer, catalog, splits=("valid", "test")):
        results = evaluate_epoch(self, accelerator, model, tokenizer, catalog, splits)
        if "valid" in splits:
            results["valid"]["ndcg@5"] = next(scripted)
        return results

    monkeypatch.setattr(trainer.EpochEvaluator, "__call__", scripted_valid)
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
    assert [bool(r["test"]) for r in epochs] == [True, True, False]  # improved at 0 and 1, not at 2
    assert json.loads((out / "model" / "export_info.json").read_text())["epoch"] == 1
    best = max(epochs, key=lambda r: r["valid"]["ndcg@5"])
    assert summary["selected_epoch"] == best["epoch"] and summary["test"] == best["test"]
    assert summary["test"]["users"] == 16
    # the selected epoch's per-user test ranks, which give back its test metrics
    ranks = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert len(ranks) == 16 and {r["epoch"] for r in ranks} == {summary["selected_epoch"]}
    assert rank_metrics([r["target_rank"] for r in ranks], [1, 5]) == {
        k: v for k, v in summary["test"].items() if k.startswith(("hr@", "ndcg@"))
    }
    assert "test_max_over_epochs" not in summary  # the released figure needs every epoch's test
    assert 0 < summary["optim_time_s"] <= summary["train_time_s"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, summary["steps"] + 1))
    assert all(r["world_size"] == 1 and r["zero_stage"] == 0 and r["step_time_s"] > 0 for r in log)


@pytest.mark.slow
def test_nonfinite_micro_batches_are_skipped_or_stop_the_run(tmp_path):
    from safetensors.torch import load_file, save_file

    from bear_ds.training.trainer import NonFiniteLossError

    prepared = write_prepared(tmp_path / "data")
    common = [f"data.path={prepared}", "train.zero_stage=0", "train.global_batch=16", "train.micro_batch=8",
              "train.eval_every_epoch=false"]  # fmt: skip
    train(load_config(None, [*common, f"output_dir={tmp_path / 'base'}", "train.max_steps=1"]))
    poisoned = tmp_path / "poisoned"
    (tmp_path / "base" / "model").rename(poisoned)
    weights = load_file(poisoned / "model.safetensors")
    norm = next(k for k in weights if k.endswith("model.norm.weight"))
    weights[norm] = torch.full_like(weights[norm], float("nan"))  # every hidden state becomes NaN
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    on_poisoned = [*common, "model.name=hf", f"model.path={poisoned}", "train.max_steps=2"]

    out = tmp_path / "skip"
    summary = train(load_config(None, [*on_poisoned, f"output_dir={out}", "train.on_nonfinite=skip"]))
    assert summary["counters"]["skipped_micro_batches"] == 4  # 2 steps x 2 micro-batches
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == ["nan", "nan"]  # nothing finite to average, not a made-up 0
    assert [r["skipped_micro_batches"] for r in log] == [2, 4]

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 1 \(epoch 0.*accumulation round 0"):
        train(load_config(None, [*on_poisoned, f"output_dir={tmp_path / 'stop'}"]))
    assert not (tmp_path / "stop" / "model").exists()  # the stopped job exports nothing


@pytest.mark.slow
def test_summary_flags_an_exported_model_that_is_not_the_selected_epoch(tmp_path):
    # a crash between an epoch's export and its checkpoint can leave OUT/model from a discarded
    # continuation; the summary must not silently pair it with the selected epoch's metrics
    prepared = write_prepared(tmp_path / "data")
    out = tmp_path / "run"
    overrides = [f"data.path={prepared}", f"output_dir={out}", "train.zero_stage=0", "train.epochs=2",
                 "train.global_batch=32", "train.eval_max_users=8", "eval.num_beams=5", "eval.top_k=[1,5]",
                 "train.select_metric=ndcg@5"]  # fmt: skip
    summary = train(load_config(None, overrides))
    assert "mismatch" not in summary["model"]
    info_path = out / "model" / "export_info.json"
    info = json.loads(info_path.read_text())
    info["epoch"] = summary["selected_epoch"] + 7  # as if a later, discarded epoch had been exported
    info_path.write_text(json.dumps(info))
    resumed = train(load_config(None, [*overrides, "train.resume=auto"]))  # the finished run: only the summary
    assert f"holds epoch {info['epoch']}" in resumed["model"]["mismatch"]
    assert f"selected epoch is {summary['selected_epoch']}" in resumed["model"]["mismatch"]


@pytest.mark.slow
def test_lora_adapter_export_is_loadable_by_evaluate(tmp_path):
    from bear_ds.evaluation.evaluate import evaluate

    prepared = write_prepared(tmp_path / "data")
    out = tmp_path / "run"
    train(load_config(None, [
        f"data.path={prepared}", f"output_dir={out}", "train.zero_stage=0", "train.max_steps=1",
        "train.global_batch=16", "train.eval_every_epoch=false", "model.lora.enabled=true",
        "model.lora.export=adapter",
    ]))  # fmt: skip
    model = out / "model"
    assert json.loads((model / "export_info.json").read_text())["kind"] == "lora_merged+adapter"
    assert (model / "config.json").is_file() and (model / "adapter" / "adapter_config.json").is_file()
    metrics = evaluate(load_config(None, [
        f"model.path={model}", f"data.path={prepared}", "data.source=prepared", f"output_dir={tmp_path / 'eval'}",
        "eval.max_users=4", "eval.num_beams=5", "eval.top_k=[1,5]",
    ]))  # fmt: skip
    assert metrics["users"] == 4


@pytest.mark.slow
def test_report_to_tensorboard_writes_step_and_epoch_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prepared = write_prepared(tmp_path / "data")
    out = tmp_path / "run"
    summary = train(load_config(None, [
        f"data.path={prepared}", f"output_dir={out}", "train.zero_stage=0", "train.epochs=2",
        "train.global_batch=32", "train.eval_max_users=4", "eval.max_users=4", "eval.num_beams=5",
        "eval.top_k=[1,5]", "train.select_metric=ndcg@5", "train.report_to=tensorboard",
    ]))  # fmt: skip
    (events,) = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "valid/ndcg@5", "valid/hr@1", "test/ndcg@5", "test/users"} <= tags, tags
    assert len(scalars.Scalars("train/loss")) == summary["steps"]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in scalars.Scalars("valid/ndcg@5")]
    assert logged == [(r["step"], pytest.approx(r["valid"]["ndcg@5"])) for r in epochs] and len(logged) == 2


def test_report_to_a_tracker_that_is_not_installed_is_an_error(monkeypatch):
    import importlib.util

    from bear_ds.config import ConfigError
    from bear_ds.training.accelerator import _tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to=wandb but wandb is not installed.*bear_ds\[wandb\]"):
        _tracker("wandb")
    assert _tracker("none") is None and _tracker("tensorboard") == "tensorboard"
