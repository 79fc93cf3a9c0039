"""data.train_sample applies to an already-prepared data.path too: the same seeded windows preparing
with it keeps, and the run records what it trained on."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from train_data import write_prepared

from bear_ds.cli import main
from bear_ds.config import load_config
from bear_ds.data import load_split, load_stats, load_train_split
from bear_ds.training import train


@pytest.fixture
def data(tmp_path):
    return write_prepared(tmp_path / "data", rows=64)


def test_a_prepared_folder_is_sampled_as_preparing_with_the_sample_would(tmp_path, data, capsys):
    full = load_split(data, "train")
    cfg = load_config(None, [f"data.path={data}", "data.train_sample=10", "data.sample_seed=3"])
    rows, used = load_train_split(data, cfg.data)
    assert len(rows) == 10 and used == {
        "prepared": str(data), "train_windows": 10, "sampled_from": 64, "train_sample": 10, "sample_seed": 3,
    }  # fmt: skip
    users = rows["user_id"]
    assert users == [u for u in full["user_id"] if u in set(users)]  # kept in their original order
    # `bear-ds prepare` from the prepared folder with the sample writes exactly those windows
    assert main(["prepare", f"data.path={data}", "data.train_sample=10", "data.sample_seed=3",
                 f"output_dir={tmp_path / 'sampled'}"]) == 0  # fmt: skip
    assert pq.read_table(tmp_path / "sampled" / "train.parquet").column("user_id").to_pylist() == users
    stats = load_stats(tmp_path / "sampled")
    assert stats["rows"]["train"] == 10 and stats["train_windows_before_sample"] == 64
    assert len(load_split(tmp_path / "sampled", "valid")) == 16  # the other splits whole
    # a sample as large as the split (or none) keeps every window
    whole, used = load_train_split(data, load_config(None, ["data.train_sample=64"]).data)
    assert len(whole) == 64 and "sampled_from" not in used
    assert main(["prepare", f"data.path={data}", "data.train_sample=10", f"output_dir={data}"]) == 2
    assert "own train split (64 windows) in place" in capsys.readouterr().err
    assert len(load_split(data, "train")) == 64


@pytest.mark.slow
def test_training_on_a_prepared_folder_uses_the_sample_and_records_it(tmp_path, data):
    out = tmp_path / "run"
    summary = train(load_config(None, [
        f"data.path={data}", f"output_dir={out}", "data.train_sample=16", "train.zero_stage=0",
        "train.global_batch=16", "train.micro_batch=16", "model.hidden_size=32", "model.intermediate_size=64",
        "tokenizer.vocab_size=300", "train.epochs=1", "train.eval_every_epoch=false",
    ]))  # fmt: skip
    assert summary["steps"] == 1  # one epoch of 16 windows, not of all 64
    saved = json.loads((out / "summary.json").read_text())
    assert saved["data"] == {
        "prepared": str(data), "train_windows": 16, "sampled_from": 64, "train_sample": 16, "sample_seed": 42,
    }  # fmt: skip
