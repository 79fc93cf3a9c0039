"""Model FLOPs utilisation: the FLOP count, the peak table, and the `mfu` of train_log.jsonl / summary.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.training.mfu import FlopModel, mean_mfu, mfu, peak_flops


def test_flop_count_of_a_step():
    model = FlopModel(body_params=1000, body_trainable=1000, layers=2, hidden=8, vocab=50, head_trainable=True)
    lengths = np.array([3, 5])
    # 6 N tokens + 6 layers hidden sum(l^2) + 6 V hidden responses
    assert model.step_flops(lengths, 4) == 6 * 1000 * 8 + 6 * 2 * 8 * (9 + 25) + 6 * 50 * 8 * 4
    lora = FlopModel(body_params=1000, body_trainable=10, layers=2, hidden=8, vocab=50, head_trainable=False)
    # frozen weights: forward and input gradient only (4 N), the adapters also their weight gradient
    assert lora.step_flops(lengths, 4) == (4 * 1000 + 2 * 10) * 8 + 6 * 2 * 8 * 34 + 4 * 50 * 8 * 4


def test_mfu_and_peak():
    assert mfu(2e12, 2.0, 4, 1e12) == 0.25
    assert mfu(2e12, 2.0, 4, None) is None
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16") is None and peak_flops(cpu, "fp32", 5e12) == 5e12
    assert mean_mfu([{"mfu": 0.2}, {"mfu": None}, {"mfu": 0.4}, {}]) == pytest.approx(0.3)
    assert mean_mfu([{"mfu": None}]) is None


def test_peak_table_names_the_specific_card_first(monkeypatch):
    names = {"NVIDIA H100 PCIe": 756e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12}  # fmt: skip
    for name, flops in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0), "bf16") == flops, name
        assert peak_flops(torch.device("cuda", 0), "fp32") is None  # the table is of bf16 peaks
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0), "bf16") is None


def test_flop_model_of_a_tiny_llama_counts_the_body_without_embeddings():
    from bear_ds.config import ModelConfig
    from bear_ds.models import build_model

    class Vocab:  # what build_model reads of a tokenizer
        def __len__(self):
            return 64

        pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    model = build_model(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32), Vocab())
    flop_model = FlopModel.of(model)
    embeddings = model.get_input_embeddings().weight.numel()  # tied: also the lm_head
    assert flop_model.body_params == sum(p.numel() for p in model.parameters()) - embeddings
    assert (flop_model.layers, flop_model.hidden, flop_model.head_trainable) == (2, 16, True)


@pytest.mark.slow
def test_train_log_reports_mfu_from_the_set_peak(tmp_path):
    from bear_ds.training.batching import epoch_schedule
    from bear_ds.training.trainer import Trainer

    prepared = write_prepared(tmp_path / "data", varied_titles=True)
    cfg = load_config(None, [
        f"data.path={prepared}", f"output_dir={tmp_path / 'run'}", "train.zero_stage=0", "train.max_steps=2",
        "train.global_batch=16", "train.micro_batch=8", "train.eval_every_epoch=false", "train.peak_flops=1e9",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.run_epochs()
        summary = trainer.finish()
    finally:
        trainer.release()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    examples, model = trainer.data.examples, trainer.model
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    steps = epoch_schedule(examples.lengths, global_batch=16, micro_batch=8, seed=cfg.train.seed, epoch=0).steps
    for record, step in zip(log, steps, strict=False):
        rows = np.concatenate(step)
        lengths = examples.lengths[rows].astype(float)
        responses = sum(sum(1 for t in examples.labels[i] if t != -100) for i in rows)
        hidden, layers, vocab = model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size
        flops = 6 * body * lengths.sum() + 6 * layers * hidden * (lengths**2).sum() + 6 * vocab * hidden * responses
        assert record["mfu"] == pytest.approx(flops / (record["step_time_s"] * 1e9), rel=1e-9)
    assert summary["mfu_mean"] == pytest.approx(np.mean([r["mfu"] for r in log]))
