"""Every YAML under configs/ (recursively, including files added later) validates against the
schema; sweep files also expand into valid points."""

from __future__ import annotations

from pathlib import Path

import pytest

from bear_ds.config import load_config
from bear_ds.sweeps import expand_grid, sweep_base

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
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


@pytest.mark.slow
def test_ml100k_evidence_sweep_runs_at_a_tiny_budget(tmp_path: Path) -> None:
    # issue 14's contract: `bear-ds sweep --config configs/sweeps/ml100k_evidence.yaml` runs the main
    # comparison; here the same file with one seed, 64 training windows and a few users per split
    from bear_ds.pipeline import sweep

    cfg = load_config(
        CONFIGS / "sweeps" / "ml100k_evidence.yaml",
        [
            f"output_dir={tmp_path / 'sweep'}",
            "sweep.grid.train.seed=[1]",
            "data.train_sample=64",
            "train.global_batch=32",
            "train.eval_max_users=8",
            "eval.max_users=8",
            "analyze.max_users=4",
        ],
    )
    points = [name for name, _ in expand_grid(cfg.sweep, sweep_base(cfg))]
    assert points == [
        "loss.name=lml__train.seed=1",
        "loss.name=msl__train.seed=1",
        "loss.name=bear__loss.form=reweight__train.seed=1",
        "loss.name=bear__loss.form=regularizer__train.seed=1",
    ]
    sweep(cfg)
    text = (tmp_path / "sweep" / "results.md").read_text()
    assert "| most-popular (8 users) |" in text
    for other in ("loss.name=msl", "loss.name=bear, loss.form=reweight", "loss.name=bear, loss.form=regularizer"):
        assert f"**{other} vs loss.name=lml**: pooled, over 1 seed(s) (8 user pairs): NDCG@10 difference" in text
    assert text.count(" p = ") >= 2 * 2 * 6  # NDCG and HR, pooled and per seed: 4 pairs against LML, 2 BEAR vs MSL
