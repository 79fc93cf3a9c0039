"""A checkpoint's trainer_state.json that is not what bear-ds writes (truncated, edited) is a
one-line error naming the file on resume, not a traceback."""

from __future__ import annotations

import json

import pytest
from train_data import write_prepared

from bear_ds.cli import main
from bear_ds.errors import UnsafeCheckpointError
from bear_ds.training.checkpoints import STATE_FILE, latest_checkpoint, load_checkpoint, read_trainer_state

GOOD = {"step": 2, "epoch": 0, "step_in_epoch": 2, "world_size": 1, "zero_stage": 0, "counters": {"elapsed_s": 1.0}}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"step": 2, "epoch"', "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "epoch"}), "'epoch' is missing"),
        (json.dumps({**GOOD, "step": "2"}), "'step' is '2', not a non-negative integer"),
        (json.dumps({**GOOD, "step_in_epoch": -1}), "'step_in_epoch' is -1"),
        (json.dumps({**GOOD, "epoch": True}), "'epoch' is True"),
        (json.dumps({**GOOD, "counters": [1]}), "'counters' is not a JSON object"),
    ],
)
def test_tampered_trainer_state_is_named_before_anything_is_loaded(tmp_path, text, why):
    folder = tmp_path / "step_2"
    folder.mkdir()
    (folder / STATE_FILE).write_text(text)
    with pytest.raises(UnsafeCheckpointError, match=f"{folder / STATE_FILE}.*{why}"):
        read_trainer_state(folder / STATE_FILE)
    with pytest.raises(UnsafeCheckpointError, match=why):
        load_checkpoint(None, folder)  # refused before the accelerator is asked to load anything
    (folder / STATE_FILE).write_text(json.dumps(GOOD))
    assert read_trainer_state(folder / STATE_FILE) == GOOD


@pytest.mark.slow
def test_resume_from_a_tampered_trainer_state_is_one_line(tmp_path, capsys):
    data = write_prepared(tmp_path / "data", rows=32)
    args = [
        "train", f"data.path={data}", f"output_dir={tmp_path / 'run'}", "train.zero_stage=0",
        "train.eval_every_epoch=false", "train.global_batch=16", "train.micro_batch=16", "model.hidden_size=32",
        "model.intermediate_size=64", "tokenizer.vocab_size=300",
    ]  # fmt: skip
    assert main([*args, "train.max_steps=1"]) == 0
    state = latest_checkpoint(tmp_path / "run") / STATE_FILE
    state.write_text(json.dumps({**json.loads(state.read_text()), "step_in_epoch": "one"}))
    capsys.readouterr()
    assert main([*args, "train.max_steps=2", "train.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bear-ds train: error: ") and f"{state}: 'step_in_epoch' is 'one'" in err[-1]
    assert not any("Traceback" in line for line in err)
