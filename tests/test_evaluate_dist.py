"""Two-process evaluation (torchrun, gloo): sharding without loss or duplicates; replicated vs ZeRO-3."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from eval_fixtures import write_model_folder, write_prepared
from launching import launch_env

from bear_ds.config import load_config
from bear_ds.distributed import free_port, torchrun_command
from bear_ds.evaluation.evaluate import evaluate

pytestmark = pytest.mark.slow

# 13 users, 3 per batch: rank 0 decodes 7 users (3 batches), rank 1 six (2 batches)
OVERRIDES = ["eval.num_beams=5", "eval.top_k=[1,5]", "eval.batch_users=3", "eval.timeout_s=40"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    titles = write_prepared(root / "data", num_items=30, num_users=13)
    write_model_folder(root / "model", titles)
    base = [f"data.path={root}/data", "data.source=prepared", f"model.path={root}/model", *OVERRIDES]
    evaluate(load_config(None, [f"output_dir={root}/single", *base]))
    return root, base


def _torchrun(root: Path, out: str, base: list[str], *extra: str) -> None:
    cmd = torchrun_command(2, "-m", "bear_ds.cli", "evaluate", f"output_dir={root}/{out}", *base, *extra)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# both ZeRO-3 gatherings in one launch (a launch is the costly part): two evaluations in one process.
# The second joins its process group through a store of its own (a port the test chose): torch
# resets its group counter when a group is destroyed, so a second group on torchrun's shared store
# could read the first one's rendezvous keys (seen: a rank waiting for a peer that had moved on).
BOTH_GATHERINGS = """
import os, sys
from bear_ds.config import load_config
from bear_ds.evaluation.evaluate import evaluate
root, second_port, base = sys.argv[1], sys.argv[2], sys.argv[3:]
for gather in ("once", "per_step"):
    evaluate(load_config(None, [f"output_dir={root}/zero3_{gather}", *base, "eval.weights=zero3", f"eval.gather={gather}"]))
    os.environ.update(MASTER_PORT=second_port, TORCHELASTIC_USE_AGENT_STORE="False")
"""


def _read(root: Path, out: str):
    rows = [json.loads(line) for line in (root / out / "predictions.jsonl").read_text().splitlines()]
    return rows, json.loads((root / out / "metrics.json").read_text())


def _assert_same_predictions(a, b):
    assert [r["user_id"] for r in a] == [r["user_id"] for r in b]
    for x, y in zip(a, b, strict=False):
        assert x["predictions"] == y["predictions"] and x["target_rank"] == y["target_rank"]
        assert max((abs(p - q) for p, q in zip(x["scores"], y["scores"], strict=False)), default=0.0) < 1e-5


def test_two_ranks_replicated_equal_one(folders):
    """Alone guards: users sharded over 2 ranks that each decode their own share, unsynced (3
    batches vs 2), gathered at the end: none lost, none duplicated, the same predictions and metrics."""
    root, base = folders
    _torchrun(root, "replicated", base)
    single, m1 = _read(root, "single")
    two, m2 = _read(root, "replicated")
    assert len(two) == 13 and len({r["user_id"] for r in two}) == 13  # none lost, none duplicated
    _assert_same_predictions(single, two)
    assert m2["decoding"]["world_size"] == 2 and m2["hr@5"] == m1["hr@5"] and m2["ndcg@5"] == m1["ndcg@5"]


def test_two_ranks_zero3_equal_replicated_gathered_once_or_per_step(folders):
    """Alone guards: weights partitioned across 2 ranks, gathered once for the evaluation (each rank
    then decodes on its own) or at every forward (from both ranks; the rank with fewer batches keeps
    stepping with the other), give the predictions of one process with a full model."""
    root, base = folders
    (root / "both_gatherings.py").write_text(BOTH_GATHERINGS)
    cmd = torchrun_command(2, str(root / "both_gatherings.py"), str(root), str(free_port()), *base)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, _ = _read(root, "single")
    for gather, synced in (("once", False), ("per_step", True)):
        zero3, m3 = _read(root, f"zero3_{gather}")
        decoding = m3["decoding"]
        assert decoding["zero3_partitioned"] and decoding["world_size"] == 2 and decoding["weights"] == "zero3"
        assert (decoding["gather"], decoding["synced"]) == (gather, synced)
        _assert_same_predictions(single, zero3)


def test_two_ranks_analysis_equals_one(folders, tmp_path):
    """Alone guards: the exhaustive analysis sharded over 2 ranks and gathered equals one process."""
    from bear_ds.evaluation.analysis import analyze

    root, base = folders
    common = [*base, "eval.mask=after", "analyze.batch_items=6"]
    analyze(load_config(None, [f"output_dir={tmp_path}/single", *common]))
    env = launch_env()
    cmd = torchrun_command(2, "-m", "bear_ds.cli", "analyze", f"output_dir={tmp_path}/two", *common)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / d / "analysis.jsonl").read_text().splitlines()]
                for d in ("single", "two"))  # fmt: skip
    assert len(two) == 13 and [r["user_id"] for r in two] == [r["user_id"] for r in one]  # 7 + 6 users
    for a, b in zip(one, two, strict=True):
        assert (a["exhaustive_top"], a["beam_top"], a["global_rank"]) == (
            b["exhaustive_top"], b["beam_top"], b["global_rank"]), (a, b)  # fmt: skip


def test_two_ranks_refuse_a_training_run_folder_together(folders):
    """Rank 0's refusal of the output_dir reaches rank 1 before either decodes: both exit non-zero
    at once, each with its own message (torchrun kills a rank left waiting at a collective when the
    other fails, so the message is what tells), and nothing is written."""
    root, base = folders
    run = root / "a_training_run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("")
    env = launch_env()
    cmd = torchrun_command(2, "-m", "bear_ds.cli", "evaluate", f"output_dir={run}", *base, "eval.timeout_s=600")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=55)
    assert proc.returncode != 0
    assert "is a training run's folder" in proc.stdout + proc.stderr  # rank 0
    assert "was refused (see rank 0)" in proc.stdout + proc.stderr  # rank 1 left on its own, not killed
    assert sorted(p.name for p in run.iterdir()) == ["train_log.jsonl"]
