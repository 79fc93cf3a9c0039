"""Every epoch draws its own batch order, and a run killed anywhere resumes to the same losses.

The contract: `bear-ds train data.path=PREPARED model.name=tiny train.epochs=3
train.eval_every_epoch=false output_dir=OUT` logs `positions` per step; SIGKILL in the second and
third epoch, then `train.resume=auto`, gives the per-step losses of the uninterrupted run, in one
process (DeepSpeed ZeRO-3, the default) and with 2 ZeRO-3 ranks. The titles have 1 to 4 words, so
a step's `positions` (response tokens) tells which examples it held.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launching import BIN, REPO, kill_after_checkpoint, logged, run_ok
from train_data import write_prepared

from bear_ds.distributed import free_port

pytestmark = pytest.mark.slow

SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "tokenizer.vocab_size=300",
         "train.global_batch=8", "train.micro_batch=4", "train.schedule=constant", "train.pg_timeout_s=30"]  # fmt: skip


def _bear_ds_train(prepared: Path, out: Path, *extra: str) -> list[str]:
    contract = ["model.name=tiny", "train.epochs=3", "train.eval_every_epoch=false"]
    return [str(BIN / "bear-ds"), "train", f"data.path={prepared}", *contract, f"output_dir={out}", *SMALL, *extra]


def _accelerate_train(prepared: Path, out: Path, *extra: str) -> list[str]:
    yaml = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"
    return [str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "--main_process_port", str(free_port()),
            "-m", "bear_ds.train", f"data.path={prepared}", "model.name=tiny", "train.epochs=3",
            "train.eval_every_epoch=false", f"output_dir={out}", *SMALL, *extra]  # fmt: skip


def _per_epoch(values: list, steps_per_epoch: int) -> list[list]:
    return [values[e * steps_per_epoch : (e + 1) * steps_per_epoch] for e in range(len(values) // steps_per_epoch)]


def _kill_twice_and_resume(command, prepared: Path, out: Path, steps_per_epoch: int) -> None:
    """SIGKILL inside the second epoch, resume, SIGKILL inside the third, resume to the end."""
    for epoch in (1, 2):
        first, last = epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch - 1  # inside the epoch
        killed_at = kill_after_checkpoint(command(prepared, out, "train.save_every=1", "train.resume=auto"), out, first)
        assert first <= killed_at <= last, f"killed at step {killed_at}, not inside epoch {epoch}"
        assert not (out / "model").exists()
    run_ok(command(prepared, out, "train.save_every=1", "train.resume=auto"))


def test_one_process_epochs_differ_and_kills_resume_to_the_same_losses(tmp_path):
    """The contract in one process (subprocesses, since SIGKILL ends the whole process): epochs draw
    their own order, and a run killed mid-epoch resumes to the same positions and losses."""
    prepared = write_prepared(tmp_path / "data", rows=48, varied_titles=True)  # 6 steps per epoch
    reference = tmp_path / "reference"
    run_ok(_bear_ds_train(prepared, reference))
    positions = logged(reference, "positions")
    assert len(positions) == 18 and all(p > 0 for p in positions)
    epochs = _per_epoch(positions, 6)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2], epochs
    assert sorted(logged(reference, "zero_stage")) == [3] * 18  # the default: DeepSpeed ZeRO-3 in one process

    out = tmp_path / "killed"
    _kill_twice_and_resume(_bear_ds_train, prepared, out, 6)
    assert logged(out, "positions") == positions
    resumed, ref = logged(out, "loss"), logged(reference, "loss")
    assert max(abs(a - b) for a, b in zip(resumed, ref, strict=True)) < 1e-6, (resumed, ref)


def test_two_zero3_ranks_kills_resume_to_the_same_losses(tmp_path):
    """Alone guards: a 2-rank ZeRO-3 run killed (launcher and ranks) twice mid-epoch resumes from
    per-rank checkpoint shards to the same losses, and exports the model at the end; the only
    2-rank kill-and-resume test (it covers the accelerate-launched resume of the training contract)."""
    prepared = write_prepared(tmp_path / "data", rows=32, varied_titles=True)  # 4 steps per epoch
    reference = tmp_path / "reference"
    run_ok(_accelerate_train(prepared, reference))
    assert set(logged(reference, "world_size")) == {2}
    epochs = _per_epoch(logged(reference, "positions"), 4)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2], epochs

    out = tmp_path / "killed"
    _kill_twice_and_resume(_accelerate_train, prepared, out, 4)
    resumed, ref = logged(out, "loss"), logged(reference, "loss")
    assert len(resumed) == 12
    assert max(abs(a - b) for a, b in zip(resumed, ref, strict=True)) < 1e-6, (resumed, ref)
    assert (out / "model" / "model.safetensors").is_file()  # the resumed run exports, gathered from 2 ranks


def test_a_registered_loss_gets_prompts_setup_state_and_logs_extra_metrics(tmp_path, monkeypatch):
    import contextlib

    from bear_ds.catalog import IGNORE_INDEX
    from bear_ds.config import load_config
    from bear_ds.training import train
    from bear_ds.training.loss_table import LOSSES, register_loss
    from bear_ds.training.loss_token import token_loss

    calls = {"setup": 0, "micro_batches": 0}

    def setup(model, ctx):
        calls["setup"] += 1
        return "reference log-probs"

    @contextlib.contextmanager
    def with_extras(model, batch, ctx):
        assert ctx.loss_state == "reference log-probs"
        for row, prompt in enumerate(batch.prompt_ids()):  # the prompt, then the labelled response
            assert batch.labels[row, : len(prompt)].eq(IGNORE_INDEX).all() and batch.labels[row, len(prompt)] >= 0
            assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        calls["micro_batches"] += 1
        with token_loss(model, batch, ctx) as out:
            rows = torch.tensor(float(len(batch.indices)))
            out.extras = {"positions_per_example": (out.sums.positions, rows), "never": (rows * 0, rows * 0)}
            yield out

    monkeypatch.setitem(LOSSES, "bear", LOSSES["bear"])  # restored after the test
    register_loss("bear", with_extras, extra_metrics=("positions_per_example", "never"), setup=setup)
    prepared = write_prepared(tmp_path / "data", rows=48, varied_titles=True)
    cfg = load_config(None, [f"data.path={prepared}", f"output_dir={tmp_path / 'run'}", "train.zero_stage=0",
                             "train.max_steps=3", "train.eval_every_epoch=false", *SMALL])  # fmt: skip
    train(cfg)
    assert calls == {"setup": 1, "micro_batches": 6}  # 3 steps x 2 micro-batches
    positions = logged(tmp_path / "run", "positions")
    # summed over both micro-batches of each step, then divided: positions / global batch
    assert logged(tmp_path / "run", "positions_per_example") == [p / 8 for p in positions]
    assert logged(tmp_path / "run", "never") == ["nan"] * 3  # 0 / 0: no value, not a made-up 0
