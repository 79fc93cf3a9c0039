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
