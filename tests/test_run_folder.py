"""Run-folder ownership and resume checks (bear_ds/training/run_folder.py), unit level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bear_ds.config import ConfigError, load_config, save_config
from bear_ds.locks import RunFolderBusyError, RunFolderLock
from bear_ds.training.run_folder import (
    RESUMES_FILE,
    check_launch,
    classify_resume_changes,
    model_is_selected_epoch,
    record_resume,
    tokenizer_mismatch,
    tokenizer_record,
)

REPO = Path(__file__).resolve().parents[1]


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from bear_ds.locks import RunFolderLock; "
        f"RunFolderLock({str(folder)!r}).acquire(); print('held', flush=True); time.sleep(120)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_and_a_dead_owners_lock_is_free(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusyError, match=rf"in use by another run \(pid {holder.pid} on "):
            RunFolderLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel releases the lock
        holder.wait()
    assert (tmp_path / "run" / ".lock").is_file()  # the stale file stays ...
    lock = RunFolderLock(tmp_path / "run").acquire()  # ... and is taken over
    assert lock.held and json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderBusyError):  # one owner, even within one process (a second open file)
        RunFolderLock(tmp_path / "run").acquire()
    lock.release()
    with RunFolderLock(tmp_path / "run") as again:
        assert again.held


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_classify_resume_changes():
    old = _cfg("x", "train.epochs=2", "loss.name=bear").model_dump()
    new = _cfg(
        "y", "train.epochs=3", "loss.name=lml", "train.lr=0.01", "train.log_every=5", "eval.num_beams=20",
        "train.max_steps=50",
    ).model_dump()  # fmt: skip
    allowed, refused = classify_resume_changes(old, new)
    assert set(allowed) == {"train.epochs", "train.log_every", "eval.num_beams", "output_dir"}
    assert set(refused) == {"loss.name", "train.lr", "train.max_steps"}  # None -> 50 caps the run: refused
    allowed, refused = classify_resume_changes(
        _cfg("x", "train.max_steps=10").model_dump(), _cfg("x", "train.max_steps=40").model_dump()
    )
    assert allowed == {"train.max_steps": (10, 40)} and refused == {}
    _, refused = classify_resume_changes(_cfg("x", "train.epochs=3").model_dump(), _cfg("x").model_dump())
    assert refused == {"train.epochs": (3, 1)}  # lowering


def test_check_launch_refuses_before_writing(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_4"
    save_config(_cfg(tmp_path, "loss.name=bear"), tmp_path)
    assert check_launch(tmp_path, _cfg(tmp_path), None) == {}  # no checkpoint: a fresh run
    with pytest.raises(FileExistsError, match="add train.resume=auto"):
        check_launch(tmp_path, _cfg(tmp_path), ckpt)
    with pytest.raises(ConfigError) as err:
        check_launch(tmp_path, _cfg(tmp_path, "train.resume=auto", "loss.name=lml", "train.lr=0.5"), ckpt)
    assert "loss.name: 'bear' -> 'lml'" in str(err.value) and "train.lr: 0.001 -> 0.5" in str(err.value)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["name"] == "bear"  # untouched
    allowed = check_launch(tmp_path, _cfg(tmp_path, "train.resume=auto", "train.epochs=5"), ckpt)
    assert allowed == {"train.epochs": (1, 5), "train.resume": ("none", "auto")}
    record_resume(tmp_path, 4, allowed)
    line = json.loads((tmp_path / RESUMES_FILE).read_text())
    assert line["from_step"] == 4 and line["changed"]["train.epochs"] == {"old": 1, "new": 5}


def test_tokenizer_record_and_mismatch():
    texts = ["Pen", "Paper", "### Instruction: ..."]
    rec = tokenizer_record(texts, 2000)
    assert rec == tokenizer_record(iter(texts), 2000) and rec["texts"] == 3
    assert tokenizer_mismatch(rec, rec) is None
    assert "vocabulary size 2000" in tokenizer_mismatch(rec, tokenizer_record(texts, 3000))
    assert "other texts" in tokenizer_mismatch(rec, tokenizer_record(["PenPaper", "### Instruction: ..."], 2000))
    assert "no trained_from.json" in tokenizer_mismatch(None, rec)


def test_model_is_selected_epoch():
    assert model_is_selected_epoch({"epoch": 1, "step": 8, "selected_by": "ndcg@10"})
    assert not model_is_selected_epoch({"step": 8, "selected_by": None})
    assert not model_is_selected_epoch({})


def test_lock_released_when_the_process_exits_by_an_exception(tmp_path):
    code = f"from bear_ds.locks import RunFolderLock; RunFolderLock({str(tmp_path)!r}).acquire(); raise SystemExit(3)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 3
    started = time.time()
    with RunFolderLock(tmp_path):
        assert time.time() - started < 5
