"""Unit tests of the training pieces that need no process group: batching, DeepSpeed config,
example encoding, LoRA merge, checkpoint discovery, logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama_kwargs

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.config import load_config
from bear_ds.errors import RunStateError
from bear_ds.training.accelerator import DS_CONFIG_DIR, batch_plan, deepspeed_config
from bear_ds.training.batching import collate, epoch_schedule, padded_fraction, rank_micro_batches
from bear_ds.training.checkpoints import STATE_FILE, latest_checkpoint
from bear_ds.training.export import merge_lora_state_dict
from bear_ds.training.train_log import JsonlLog


def _train(*overrides: str):
    return load_config(None, list(overrides)).train


def test_batch_plan_derives_accumulation_and_names_keys():
    plan = batch_plan(_train("train.global_batch=32", "train.micro_batch=4"), world_size=2)
    assert (plan.accumulation, plan.micro_batches_per_step) == (4, 8)
    assert batch_plan(_train("train.global_batch=32", "train.micro_batch=4"), world_size=8).accumulation == 1
    with pytest.raises(ValueError, match=r"train.global_batch=32 .* train.micro_batch=4 x world size 3"):
        batch_plan(_train("train.global_batch=32", "train.micro_batch=4"), world_size=3)


def test_epoch_schedule_is_a_function_of_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(20, 200, size=203)
    kw = dict(global_batch=16, micro_batch=4, seed=7, length_bucket=4)
    a, b = epoch_schedule(lengths, epoch=0, **kw), epoch_schedule(lengths, epoch=0, **kw)
    c = epoch_schedule(lengths, epoch=1, **kw)
    assert all(
        np.array_equal(x, y) for sa, sb in zip(a.steps, b.steps, strict=True) for x, y in zip(sa, sb, strict=True)
    )
    assert not all(
        np.array_equal(x, y) for sa, sc in zip(a.steps, c.steps, strict=True) for x, y in zip(sa, sc, strict=True)
    )
    assert len(a.steps) == 203 // 16 and a.left_out == 203 % 16
    used = np.concatenate([m for step in a.steps for m in step])
    assert len(used) == len(set(used.tolist())) == 16 * len(a.steps)  # no example twice in an epoch
    assert all(len(step) == 4 and all(len(m) == 4 for m in step) for step in a.steps)


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(20, 400, size=2048)
    grouped = epoch_schedule(lengths, global_batch=32, micro_batch=8, seed=0, epoch=0, length_bucket=16)
    rng = np.random.default_rng(0)
    shuffled = [np.split(rng.permutation(2048)[i * 32 : (i + 1) * 32], 4) for i in range(64)]
    pad_grouped = np.mean([padded_fraction(lengths, s) for s in grouped.steps])
    pad_random = np.mean([padded_fraction(lengths, s) for s in shuffled])
    assert pad_grouped < 0.5 * pad_random, (pad_grouped, pad_random)


def test_micro_batches_do_not_depend_on_world_size():
    step = [np.array([i]) for i in range(8)]
    for world in (1, 2, 4, 8):
        runs = [rank_micro_batches(step, r, world) for r in range(world)]
        assert sorted(int(m[0]) for run in runs for m in run) == list(range(8))
        assert all(len(run) == 8 // world for run in runs)


def test_collate_right_pads_with_ignore_labels():
    batch = collate([[1, 2, 3], [4, 5]], [[-100, 2, 3], [-100, 5]], np.array([0, 1]), pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_deepspeed_config_fills_auto_values(tmp_path):
    train = _train("train.global_batch=32", "train.micro_batch=4", "train.precision=bf16", "train.grad_clip=0.5")
    plan = batch_plan(train, 2)
    for name in ("zero2.json", "zero3.json", "zero3_offload.json", "zero3_cpu.json"):
        config = deepspeed_config(DS_CONFIG_DIR / name, train, plan)
        assert "auto" not in json.dumps(config), name
        assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (32, 4)
        assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
        assert config["bf16"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="optimizer/scheduler block"):
        deepspeed_config(bad, train, plan)
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8"):
        deepspeed_config(fixed, train, plan)


def test_merge_lora_state_dict_equals_peft_merge():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bear_ds.training.export import _lora_scalings

    torch.manual_seed(0)
    cfg = LlamaConfig(**tiny_llama_kwargs(64, 32, num_attention_heads=4))
    peft_model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = merge_lora_state_dict(dict(peft_model.state_dict()), _lora_scalings(peft_model))
    reference = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], msg=key)


class _Builder:
    def prompt(self, titles):
        return "history: " + ", ".join(f'"{t}"' for t in titles) + "\n"

    @staticmethod
    def response(title):
        return f'"{title}"'


def _catalog():
    from bear_ds.catalog import Catalog
    from bear_ds.tokenization import train_bpe_tokenizer

    titles = {f"i{k}": f"item number {k}" for k in range(6)}
    tok = train_bpe_tokenizer([*titles.values(), "history: "] * 20, 300)
    return titles, tok, Catalog.build(titles, tok, _Builder())


def test_encode_examples_truncates_oldest_history_and_counts():
    from bear_ds.training.examples import encode_training_examples

    titles, tok, catalog = _catalog()
    histories, targets = [["i0", "i1", "i2", "i3"], ["i4"]], ["i5", "i0"]
    full = encode_training_examples(histories, targets, titles, catalog, tok, _Builder(), max_length=10**6,
                                    truncate_history=True)  # fmt: skip
    assert full.truncated_examples == 0
    ids, labels = full.input_ids[0], full.labels[0]
    response = catalog.group_token_ids[catalog.group_of_item("i5")]
    assert ids[-len(response) :] == response and labels[-len(response) :] == response
    assert set(labels[: -len(response)]) == {IGNORE_INDEX}
    limit = int(full.lengths[0]) - 1  # one token too many for row 0 only
    cut = encode_training_examples(histories, targets, titles, catalog, tok, _Builder(), max_length=limit,
                                   truncate_history=True)  # fmt: skip
    assert cut.truncated_examples == 1 and cut.truncated_items >= 1 and cut.lengths[0] <= limit
    assert cut.input_ids[1] == full.input_ids[1]
    with pytest.raises(ValueError, match=r"train row 0: .*train.truncate_history"):
        encode_training_examples(histories, targets, titles, catalog, tok, _Builder(), max_length=limit,
                                 truncate_history=False)  # fmt: skip
    with pytest.raises(ValueError, match="target item 'nope' is not in the catalog"):
        encode_training_examples([["i0"]], ["nope"], titles, catalog, tok, _Builder(), max_length=10**6,
                                 truncate_history=True)  # fmt: skip


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_4", True), ("step_12", True), ("step_16", False), ("tmp-step_20", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert latest_checkpoint(tmp_path) == root / "step_12"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_jsonl_log_truncates_lines_past_the_checkpoint(tmp_path):
    log = JsonlLog(tmp_path / "train_log.jsonl", enabled=True)
    for step in range(1, 6):
        log.write({"step": step, "loss": float("nan") if step == 5 else 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_jsonl_log_survives_a_line_cut_by_a_crash_and_names_other_bad_lines(tmp_path):
    path = tmp_path / "train_log.jsonl"
    log = JsonlLog(path, enabled=True)
    for step in range(1, 4):
        log.write({"step": step, "loss": 1.0})
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write: no newline
    log.truncate_after(2)  # what a resume does: must not fail on the cut line
    assert [r["step"] for r in log.read()] == [1, 2] and path.read_text().endswith("}\n")
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunStateError, match=r"train_log.jsonl line 2: not valid JSON"):
        log.read()


def test_select_metric_that_evaluation_cannot_compute_fails_before_training(tmp_path):
    from train_data import write_prepared

    from bear_ds.config import ConfigError, load_config
    from bear_ds.training import train

    prepared = write_prepared(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(None, [f"data.path={prepared}", "data.source=prepared", f"output_dir={out}", "train.zero_stage=0",
                             "train.max_steps=1", "eval.num_beams=5", "train.select_metric=ndcg@10"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.select_metric='ndcg@10'.*hr@1, hr@5, ndcg@1, ndcg@5"):
        train(cfg)
    assert not out.exists()  # nothing trained


def test_a_failed_checkpoint_deletion_is_reported(tmp_path, monkeypatch, caplog):
    import logging
    import shutil
    from types import SimpleNamespace

    from bear_ds.training import checkpoints

    def save_state(folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "weights.bin").write_bytes(b"0")

    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)
    real_rmtree = shutil.rmtree

    def failing_rmtree(path, *args, **kwargs):
        if Path(path).name == "step_1":
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", failing_rmtree)
    with caplog.at_level(logging.WARNING, logger="bear_ds.training.checkpoints"):
        for step in (1, 2, 3):
            checkpoints.save_checkpoint(accelerator, tmp_path, step, {"epoch": 0}, keep_last=2)
    old = tmp_path / "checkpoints" / "step_1"
    assert f"could not delete the old checkpoint {old}" in caplog.text and "Permission denied" in caplog.text
    # the half-deleted folder is not a complete checkpoint any more: never resumed from
    assert [step for step, _ in checkpoints.complete_checkpoints(tmp_path)] == [2, 3]
