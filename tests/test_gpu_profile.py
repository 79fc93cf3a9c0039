"""benchmarks/gpu_profile.sh and its helper: the parts that run without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_profile_help_names_its_settings():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_profile.sh"), "--help"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for word in ("--prepare", "DEV=cpu", "LAYERS", "STEPS", "MATRIX", "all-gathers", "MFU"):
        assert word in proc.stdout, word
    assert "set -uo" not in proc.stdout


def test_profile_table_from_result_lines(tmp_path):
    row = {"label": "zero3_ckpt-false_b8", "zero_stage": 3, "gradient_checkpointing": False, "micro_batch": 8,
           "tokens_per_s": 12345.6, "mfu": 0.4123, "padded_frac": 0.05, "peak_gib": 61.23,
           "all_gathers_per_micro_step": 1.0, "host_syncs_per_micro_step": 2.5}  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(row) + "\n" + json.dumps({**row, "mfu": None, "peak_gib": None}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_profile.py"), "table", str(results)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[2] == "| zero3_ckpt-false_b8 | 3 | off | 8 | 12,346 | 41.2% | 5.0% | 61.2 | 1.0 | 2.5 |"
    assert lines[3] == "| zero3_ckpt-false_b8 | 3 | off | 8 | 12,346 | - | 5.0% | - | 1.0 | 2.5 |"
