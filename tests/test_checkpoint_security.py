"""Resuming never runs code from a checkpoint: a tampered DeepSpeed/Accelerate file is refused,
naming it, and its payload (creating a file) never runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.training import train
from bear_ds.training.checkpoints import latest_checkpoint, verify_checkpoint_files, weights_only_loading

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `touch marker`, as a tampered checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _args(out: Path, data: Path, stage: int, steps: int, *extra: str) -> list[str]:
    return [
        f"data.path={data}", f"output_dir={out}", f"train.zero_stage={stage}", f"train.max_steps={steps}",
        "train.eval_every_epoch=false", "train.global_batch=16", "train.micro_batch=16", "model.hidden_size=32",
        "model.intermediate_size=64", "tokenizer.vocab_size=300", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("stage", [3])
def test_resume_refuses_a_tampered_deepspeed_checkpoint(tmp_path, stage):
    """A tampered DeepSpeed checkpoint is refused by `bear-ds train ... train.resume=auto`, run as a
    process (the refusal is one line on stderr, no traceback) whose payload never runs. That an
    untouched checkpoint passes the same checks is shown by every resume test (test_train_epochs.py:
    one process and 2 ranks, ZeRO-3 both)."""
    data = write_prepared(tmp_path / "data", rows=32)
    out = tmp_path / "run"
    train(load_config(None, _args(out, data, stage, 1)))  # in this process: it ends by leaving its process group
    ckpt = latest_checkpoint(out)
    states = sorted(ckpt.rglob("*model_states.pt"))
    assert states, sorted(p.name for p in ckpt.rglob("*"))

    target = states[0]
    marker = tmp_path / "pwned"
    original = torch.load(target, weights_only=False)
    torch.save({**original, "ds_version": Payload(marker)}, target)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([sys.executable, "-m", "bear_ds.cli", "train", *_args(out, data, stage, 2, "train.resume=auto")],
                             env=env, capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert refused.returncode != 0
    assert not marker.exists()  # the payload never ran
    assert str(target) in refused.stderr and "refused" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_verify_refuses_plain_pickles_and_unknown_globals_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "ok.pt").write_bytes(b"")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert verify_checkpoint_files(tmp_path) == 1
    with (tmp_path / "random_states_0.pkl").open("wb") as fh:
        pickle.dump({"rng": Payload(marker)}, fh)  # not even a torch.save archive
    with pytest.raises(ValueError, match=r"random_states_0.pkl is not a torch.save archive"):
        verify_checkpoint_files(tmp_path)
    (tmp_path / "random_states_0.pkl").unlink()
    torch.save({"optimizer": Payload(marker)}, tmp_path / "optim_states.pt")
    with pytest.raises(ValueError, match=r"optim_states.pt refers to posix.system"):
        verify_checkpoint_files(tmp_path)
    assert not marker.exists()


def test_weights_only_loading_overrides_an_explicit_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "f.pt")
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "f.pt", weights_only=False)  # what DeepSpeed's checkpoint engine calls
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored on exit
