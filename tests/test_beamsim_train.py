"""beamsim in the trainer: the contract command (2 real ZeRO-3 ranks on CPU), its model read
by `bear-ds evaluate`, and one process with accumulation 2 giving the same per-step losses."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from launching import BIN, REPO, run_ok
from train_data import write_prepared

from bear_ds.distributed import free_port

pytestmark = pytest.mark.slow

YAML = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"

STEPS = 6


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory) -> tuple[Path, Path]:
    prepared = write_prepared(tmp_path_factory.mktemp("data") / "prepared")
    out = tmp_path_factory.mktemp("beamsim")
    # the contract command, literally (plus a free port for parallel test runs)
    run_ok([str(BIN / "accelerate"), "launch", "--config_file", str(YAML), "--main_process_port", str(free_port()),
          "-m", "bear_ds.train", f"data.path={prepared}", "model.name=tiny", "loss.name=beamsim",
          "loss.beam_width=5", f"train.max_steps={STEPS}", f"output_dir={out}"], timeout=150)  # fmt: skip
    return prepared, out


def test_contract_log_and_model(contract_run, tmp_path):
    """The contract command itself, 2 ranks (the synced search across ranks is what only a launch
    runs end to end), then `bear-ds evaluate` on its export. Resume is not beamsim's own: the loss
    keeps no state, and test_train_epochs.py kills and resumes 2 ranks."""
    prepared, out = contract_run
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss"]), r
        assert 0.0 <= r["sim_pruned_frac"] <= 1.0, r
        assert 0.0 < r["search_time_frac"] < 1.0, r
        assert "frac_outside_topb" in r and "reg" in r
        assert (r["world_size"], r["zero_stage"]) == (2, 3)
    ev = tmp_path / "eval"
    run_ok([str(BIN / "bear-ds"), "evaluate", f"model.path={out / 'model'}", f"data.path={prepared}",
          f"output_dir={ev}", "eval.num_beams=5", "eval.top_k=[1,5]"])  # fmt: skip
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["decoding"]["mask"] == "before"  # eval.mask=auto: beamsim is scored like MSL/BEAR
    assert 0.0 <= metrics["hr@5"] <= 1.0


def test_one_process_with_accumulation_matches_two_ranks(contract_run, tmp_path):
    """Alone guards: beamsim's per-rank searches and all-reduced gradients over 2 ranks equal one
    process accumulating the same micro-batches (losses and pruning shares to 1e-6)."""
    prepared, reference = contract_run
    out = tmp_path / "one"
    run_ok([sys.executable, "-m", "bear_ds.train", f"data.path={prepared}", "model.name=tiny", "loss.name=beamsim",
          "loss.beam_width=5", f"train.max_steps={STEPS}", f"output_dir={out}",
          "train.ds_config=ds_configs/zero3_cpu.json"], timeout=150)  # fmt: skip
    one, two = _rows(out), _rows(reference)
    assert {(r["world_size"], r["zero_stage"]) for r in one} == {(1, 3)}
    for key in ("loss", "sim_pruned_frac", "ce", "reg"):
        a, b = [r[key] for r in one], [r[key] for r in two]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, (key, a, b)
    assert len({r["sim_pruned_frac"] for r in two}) > 1, "pruning never changed: the check would be vacuous"


def test_method_config():
    from bear_ds.config import load_config

    cfg = load_config(REPO / "configs" / "methods" / "beamsim.yaml")
    assert (cfg.loss.name, cfg.loss.beam_width, cfg.loss.masked) == ("beamsim", 10, True)
