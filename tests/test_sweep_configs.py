"""Every YAML under configs/ (recursively, including files added later) validates against the
schema; sweep files also expand into valid points, and each runs as its header documents it
(`bear-ds sweep --config FILE`) on a tiny budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bear_ds.config import load_config
from bear_ds.sweeps import expand_grid, override_value, sweep_base

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_YAML = sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")])


def test_the_walk_finds_nested_configs() -> None:
    found = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    assert {"sweeps/office_ablation.yaml", "sweeps/demo_methods.yaml"} <= found


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_validates(path: Path) -> None:
    cfg = load_config(path)
    if cfg.sweep.grid:
        points = expand_grid(cfg.sweep, sweep_base(cfg))
        assert len({name for name, _ in points}) == len(points) > 0


def test_example_sweeps_expand_as_documented() -> None:
    office = load_config(CONFIGS / "sweeps" / "office_ablation.yaml")
    points = expand_grid(office.sweep, sweep_base(office))
    assert len(points) == (1 + 1 + 3 * 2) * 3  # as stated in the file's header
    assert sweep_base(office).data.source == "bear_csv" and sweep_base(office).model.name == "tiny"
    demo = load_config(CONFIGS / "sweeps" / "demo_methods.yaml")
    assert [n for n, _ in expand_grid(demo.sweep, sweep_base(demo))] == [
        "loss.name=lml__train.seed=42",
        "loss.name=msl__train.seed=42",
        "loss.name=bear__train.seed=42",
    ]
    assert sweep_base(demo).data.source == "ml100k"


SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
# a tiny budget: every stage of a point runs (prepare, tokenizer, train with per-epoch evaluation,
# export, analysis, aggregate, report), each on a few examples
TINY = [
    "train.max_steps=2", "train.epochs=1", "train.global_batch=8", "train.micro_batch=8",
    "train.eval_max_users=3", "train.select_metric=ndcg@3", "eval.max_users=3", "eval.num_beams=3",
    "eval.top_k=[1,3]", "analyze.max_users=2", "data.train_sample=32", "model.hidden_size=32",
    "model.intermediate_size=64", "model.num_layers=1", "tokenizer.vocab_size=300",
]  # fmt: skip


def _two_points(cfg) -> list[str]:
    """Grid overrides keeping two values of the first key and one of every other: two points, the
    second trained in the process the first one trained and was analysed in."""
    return [
        f"sweep.grid.{key}={override_value(values[: 2 if i == 0 else 1])}"
        for i, (key, values) in enumerate(cfg.sweep.grid.items())
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_each_sweep_config_runs_as_documented(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg = load_config(path)
    if "shared/data" in str(sweep_base(cfg).data.path or ""):
        request.getfixturevalue("shared_data")  # skips when the BEAR CSVs are not beside the checkout
    out = tmp_path / path.stem
    cmd = [sys.executable, "-m", "bear_ds.cli", "sweep", "--config", str(path), f"output_dir={out}", *TINY]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *_two_points(cfg)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = (out / "results.csv").read_text().splitlines()
    assert len(results) == 3  # header + both points
    assert (out / "results.md").is_file()
    assert len(list(out.glob("*/analysis/analysis.json"))) == 2
