"""The trainer's run-folder ownership and launch checks, end to end on a tiny single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_data import write_prepared

from bear_ds.cli import main
from bear_ds.config import ConfigError, load_config
from bear_ds.locks import RunFolderLock
from bear_ds.training import train
from bear_ds.training.run_folder import RESUMES_FILE, TOKENIZER_RECORD

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}", f"output_dir={out}", "train.zero_stage=0", "train.global_batch=16",
        "train.micro_batch=16", "model.hidden_size=32", "model.intermediate_size=64", "tokenizer.vocab_size=300",
        "train.max_steps=2", "train.eval_max_users=4", "eval.max_users=4", "eval.num_beams=3", "eval.top_k=[1,3]",
        "train.select_metric=ndcg@3", *extra,
    ]  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "data", rows=64)


def test_two_trainings_into_one_folder_exactly_one_is_refused(tmp_path, data):
    """Alone guards: two processes racing for one run folder: the lock lets exactly one train."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bear_ds.cli", "train", *_args(data, out, "train.max_steps=3")]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(err for code, err in results if code != 0)
    assert "is in use by another run (pid" in refused and "Traceback" not in refused
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_refused_launch_and_refused_resume_write_nothing(tmp_path, data, capsys):
    out = tmp_path / "run"
    train(load_config(None, _args(data, out, "loss.name=bear")))
    saved = (out / "config.yaml").read_text()
    # checkpoints exist, no resume: refused in one line, config.yaml untouched
    assert main(["train", *_args(data, out, "train.lr=0.5")]) == 2  # a user error: exit 2
    err = capsys.readouterr().err
    assert "add train.resume=auto" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == saved
    # resume with a changed loss and lr: refused listing the keys, nothing written
    with pytest.raises(ConfigError, match=r"loss.name: 'bear' -> 'lml'; train.lr: 0.001 -> 0.5"):
        train(load_config(None, _args(data, out, "train.resume=auto", "loss.name=lml", "train.lr=0.5")))
    assert (out / "config.yaml").read_text() == saved and not (out / RESUMES_FILE).exists()
    # raising max_steps and another logging cadence: allowed, recorded
    summary = train(load_config(None, _args(data, out, "train.resume=auto", "train.max_steps=3", "train.log_every=2")))
    assert summary["steps"] == 3
    changed = json.loads((out / RESUMES_FILE).read_text())["changed"]
    assert set(changed) == {"train.max_steps", "train.log_every", "train.resume"}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3
    # the lock was released when each run ended, refused ones included
    with RunFolderLock(out):
        pass


def test_finished_run_rerun_keeps_the_final_model_label(tmp_path, data):
    out = tmp_path / "run"
    args = _args(data, out, "train.resume=auto")  # 2 steps of a 4-step epoch: no epoch is evaluated
    first = train(load_config(None, args))
    assert first["model"]["is"].startswith("final model")
    again = train(load_config(None, args))  # nothing left to train
    assert again["model"] == first["model"] and "selected_epoch" not in again
    assert not (out / "model_final").exists()


def test_leftover_tokenizer_is_retrained_or_refused(tmp_path, data):
    out = tmp_path / "run"
    train(load_config(None, _args(data, out, "tokenizer.vocab_size=320")))
    record = json.loads((out / "tokenizer" / TOKENIZER_RECORD).read_text())
    assert record["vocab_size"] == 320 and len(record["texts_sha256"]) == 64
    # a fresh run (no checkpoints) into a folder with another run's tokenizer: retrained, not reused
    for name in ("checkpoints", "model", "summary.json"):
        path = out / name
        subprocess.run(["rm", "-rf", str(path)], check=True)
    train(load_config(None, _args(data, out, "tokenizer.vocab_size=300")))
    assert json.loads((out / "tokenizer" / TOKENIZER_RECORD).read_text())["vocab_size"] == 300
    # a resume whose tokenizer was trained from other texts: refused, naming the folder
    tampered = {**json.loads((out / "tokenizer" / TOKENIZER_RECORD).read_text()), "texts_sha256": "0" * 64}
    (out / "tokenizer" / TOKENIZER_RECORD).write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=r"tokenizer does not match this run: it was trained on other texts"):
        train(load_config(None, _args(data, out, "tokenizer.vocab_size=300", "train.resume=auto", "train.max_steps=3")))
