"""Two ZeRO-3 ranks launched into a run folder another run holds: every rank leaves, none waits."""

from __future__ import annotations

import subprocess

import pytest
from launching import BIN, REPO, launch_env
from train_data import write_prepared

from bear_ds.distributed import free_port
from bear_ds.locks import RunFolderLock

pytestmark = pytest.mark.slow
YAML = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"


def test_busy_folder_refused_by_every_rank_without_a_hang(tmp_path):
    """Alone guards: a refusal decided by rank 0 reaches the other rank of a real launch, so both
    leave at once instead of one waiting at a collective until the process-group timeout."""
    data = write_prepared(tmp_path / "data", rows=64)
    out = tmp_path / "run"
    cmd = [
        str(BIN / "accelerate"), "launch", "--config_file", str(YAML), "--main_process_port", str(free_port()),
        "-m", "bear_ds.train", f"data.path={data}", f"output_dir={out}", "model.hidden_size=32",
        "model.intermediate_size=64", "tokenizer.vocab_size=300", "train.global_batch=8", "train.micro_batch=4",
        "train.max_steps=2", "train.eval_every_epoch=false", "train.pg_timeout_s=600",
    ]  # fmt: skip
    with RunFolderLock(out):  # another run holds the folder
        # a rank left waiting would hang for the 600 s process-group timeout, past the outer timeout
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "is in use by another run" in proc.stderr
    assert not (out / "config.yaml").exists() and not (out / "train_log.jsonl").exists()
