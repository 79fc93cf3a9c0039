"""Decoding with ZeRO-3 partitioned weights: the choice between gathering them once and per step,
and `bear-ds evaluate eval.weights=zero3` in one process both ways (the 2-rank runs are in
test_evaluate_dist.py and test_beamsim_zero3.py; benchmarks/zero3_decode.py counts the all-gathers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_fixtures import tiny_llama, write_model_folder, write_prepared
from transformers import AutoModelForCausalLM

from bear_ds.config import load_config
from bear_ds.evaluation.evaluate import evaluate, saved_dtype, zero3_eval_config
from bear_ds.generation import zero3_gather
from bear_ds.generation.zero3_gather import choose_gather, decoding_weights, full_model_bytes


def test_full_model_bytes_counts_a_partition_as_its_whole_tensor():
    model = tiny_llama(50)
    whole = sum(p.numel() * 4 for p in model.parameters())
    assert full_model_bytes(model) == whole
    partition = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
    partition.ds_numel = 1000  # what DeepSpeed records on a ZeRO-3 parameter whose storage is elsewhere
    module = torch.nn.Module()
    module.w = partition
    assert full_model_bytes(module) == 2000


def test_auto_gathers_once_only_when_the_model_takes_at_most_half_the_free_memory(monkeypatch):
    model = tiny_llama(50)
    need = full_model_bytes(model)
    monkeypatch.setattr(zero3_gather, "free_memory_bytes", lambda device: 2 * need)
    assert choose_gather("auto", model, torch.device("cpu")) == "once"
    monkeypatch.setattr(zero3_gather, "free_memory_bytes", lambda device: 2 * need - 1)
    assert choose_gather("auto", model, torch.device("cpu")) == "per_step"
    assert choose_gather("once", model, torch.device("cpu")) == "once"  # asked for: no memory check
    assert choose_gather("per_step", model, torch.device("cpu")) == "per_step"
    with pytest.raises(ValueError, match="eval.gather='twice'"):
        choose_gather("twice", model, torch.device("cpu"))


def test_a_full_model_has_nothing_to_gather():
    model = tiny_llama(50)
    with decoding_weights(model, "once", torch.device("cpu")) as gather:
        assert gather is None


def test_zero3_config_keeps_the_saved_precision():
    assert zero3_eval_config(torch.bfloat16)["bf16"] == {"enabled": True}
    assert zero3_eval_config(torch.float32)["bf16"] == {"enabled": False}
    assert zero3_eval_config(torch.float16)["fp16"] == {"enabled": True}


@pytest.mark.slow
def test_zero3_evaluation_in_bf16_gathers_once_or_per_step_with_the_same_lists(tmp_path: Path):
    titles = write_prepared(tmp_path / "data", num_items=30, num_users=7)
    write_model_folder(tmp_path / "model", titles)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")  # what a bf16 training exports
    assert saved_dtype(tmp_path / "model") == torch.bfloat16
    base = [f"data.path={tmp_path / 'data'}", "data.source=prepared", f"model.path={tmp_path / 'model'}",
            "eval.num_beams=5", "eval.top_k=[1,5]", "eval.batch_users=3"]  # fmt: skip
    lists = {}
    for name, extra in (("replicated", []), ("once", ["eval.weights=zero3", "eval.gather=once"]),
                        ("per_step", ["eval.weights=zero3", "eval.gather=per_step"])):  # fmt: skip
        metrics = evaluate(load_config(None, [f"output_dir={tmp_path / name}", *base, *extra]))
        saved = json.loads((tmp_path / name / "metrics.json").read_text())["decoding"]
        assert saved["gather"] == metrics["decoding"]["gather"] == (None if name == "replicated" else name)
        assert saved["dtype"] == "bfloat16"  # partitions and gathers in the training precision, not fp32
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        lists[name] = [json.loads(line)["predictions"] for line in lines]
    assert lists["once"] == lists["replicated"] and lists["per_step"] == lists["replicated"]
