"""`bear-ds demo` with two worker processes (demo.workers): its six tasks (three trainings, then
their analyses) each run once, the report covers every method, and a rerun skips what is done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launching import run_ok

from bear_ds.config import ConfigError, load_config
from bear_ds.pipeline import DEMO_TASKS, METHODS, demo_workers

# the demo at a tiny budget: MovieLens-100k from the recbole wheel, one epoch of 2 optimiser steps per method
TINY = [
    "data.train_sample=128",
    "train.eval_max_users=8",
    "eval.max_users=12",
    "analyze.max_users=4",
]


def _demo(out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "bear_ds.cli", "demo", f"output_dir={out}", *TINY, *extra]
    # two threads to share: the worker left alone takes both when the other one has finished
    return run_ok(cmd, timeout=600, OMP_NUM_THREADS="2").stdout


def test_two_workers_run_each_task_once_and_report_every_method(tmp_path: Path) -> None:
    pytest.importorskip("recbole", reason="the demo reads MovieLens-100k from the recbole wheel (scripts/setup.sh)")
    out = tmp_path / "demo"
    stdout = _demo(out, "demo.workers=2")
    assert "[demo] 2 worker processes, 1 torch thread(s) each" in stdout
    assert stdout.count("[demo] a worker finished: 1 other(s) now use 2 torch threads") == 1, stdout
    for method in METHODS:
        assert stdout.count(f"[demo] {method}: training into {out / method}") == 1, stdout
        assert stdout.count(f"[demo] {method}: analysing {out / method}") == 1, stdout
        assert (out / method / "summary.json").is_file()
        assert json.loads((out / method / "analysis" / "analysis.json").read_text())["users"] == 4
    results = (out / "results.md").read_text()
    assert all(f"| {name} |" in results for name in (*METHODS, "most-popular (12 users)")), results
    assert "has no 'test' metrics" not in results, results  # every run's test metrics were found
    assert json.loads((out / "demo_time.json").read_text())["workers"] == 2
    # a rerun finds every task done: nothing is trained or analysed again, the report is rewritten
    again = _demo(out, "demo.workers=2")
    assert "training into" not in again and "analysing" not in again
    assert all(f"[demo] {m}: already finished" in again for m in METHODS)


def test_demo_workers_key() -> None:
    assert [kind for kind, _ in DEMO_TASKS] == ["train"] * 3 + ["analyze"] * 3  # trainings first
    assert demo_workers(load_config(None, ["demo.workers=3"])) == 3
    assert 1 <= demo_workers(load_config(None, [])) <= 2  # auto
    with pytest.raises(ConfigError, match="demo.workers"):
        load_config(None, ["demo.workers=0"])
