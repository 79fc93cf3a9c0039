"""Two-stage sweeps: every point of a stage-2 sweep starts from its own seed's stage-1 model.

    defaults: [ml100k_evidence.yaml]
    model: {name: hf, path: "{stage1}/model", reference_path: "{stage1}/model"}
    sweep:
      stage1: configs/sweeps/ml100k_evidence.yaml    # the stage-1 sweep
      stage1_grid: {loss.name: [lml]}                # which of its points (one per seed)
      grid: {loss.name: [lml, msl, bear], train.seed: [1, 2, 3]}

`bear-ds sweep` on such a file first runs the stage-1 sweep in OUT/stage1 (its points not done yet,
shared with other processes through the usual claims), with the command's overrides (except
output_dir and sweep.*) and the stage-2 grid's train.seed values. In each stage-2 point's config,
`{stage1}` in model.path and model.reference_path becomes the folder of the stage-1 point with the
point's train.seed. A stage-2 point whose stage-1 point is still running in another process waits
for it, and runs it itself when that process has died.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bear_ds.config import Config, ConfigError, build_config, load_config, override_value, with_overrides
from bear_ds.locks import RunFolderLock
from bear_ds.runs import CLAIMS, POINT_CONFIGS, STAGE1_DIR, read_config_yaml
from bear_ds.sweeps import SweepError, expand_grid, sweep_base

PLACEHOLDER = "{stage1}"
LINKED_KEYS = ("path", "reference_path")  # of the model section


@dataclass(frozen=True)
class StageOne:
    """The stage-1 sweep of a two-stage sweep and its point for each stage-2 seed."""

    cfg: Config  # the stage-1 sweep config, output_dir = OUT/stage1
    point_of_seed: dict[Any, str]  # train.seed -> stage-1 point name

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output_dir)

    def link(self, point: Config) -> Config:
        """`point` with `{stage1}` in model.path / model.reference_path replaced by its seed's stage-1 point."""
        name = self.point_of_seed.get(point.train.seed)
        if name is None:
            raise ConfigError(f"train.seed={point.train.seed}: no stage-1 point in {self.folder} for this seed")
        values = {key: getattr(point.model, key) for key in LINKED_KEYS}
        linked = [
            f"model.{key}={override_value(value.replace(PLACEHOLDER, str(self.folder / name)))}"
            for key, value in values.items()
            if isinstance(value, str) and PLACEHOLDER in value
        ]
        return with_overrides(point, linked)

    def wait_for(self, seed: Any, run_point: Callable[[Config, Path], None], is_done: Callable[[Path], bool]) -> None:
        """Return when the stage-1 point of `seed` is done: at once, after the process running it
        finishes, or after running it here (its holder died, or nobody ran it yet)."""
        name = self.point_of_seed[seed]
        point_dir = self.folder / name
        if is_done(point_dir):
            return
        with RunFolderLock(self.folder / CLAIMS / name).acquire(wait=True):
            if is_done(point_dir):
                return
            raw, why = read_config_yaml(self.folder / POINT_CONFIGS / f"{name}.yaml")
            if raw is None:
                raise SweepError(f"stage-1 point {name}: {why}")
            run_point(build_config(raw, origin=f"stage-1 point {name}"), point_dir)
        if not is_done(point_dir):
            raise SweepError(f"stage-1 point {name} returned without finishing {point_dir}")


def _passed_on(overrides: Sequence[str]) -> list[str]:
    """The command-line overrides that apply to stage 1 too: all but output_dir and sweep.*."""
    keys = [item.split("=", 1)[0].strip().lstrip("-") for item in overrides]
    return [
        item for key, item in zip(keys, overrides, strict=True) if key != "output_dir" and key.split(".")[0] != "sweep"
    ]


def stage_one(cfg: Config, overrides: Sequence[str] = ()) -> StageOne | None:
    """The stage-1 sweep of `cfg` (None when `sweep.stage1` is unset), its config checked and its
    point for each of `cfg`'s seeds found; `overrides`: the command line's, applied to both stages."""
    base = sweep_base(cfg)
    uses = [f"model.{k}" for k in LINKED_KEYS if PLACEHOLDER in str(getattr(base.model, k) or "")]
    if cfg.sweep.stage1 is None:
        if uses:
            raise ConfigError(f"{', '.join(uses)} holds {PLACEHOLDER} but sweep.stage1 (the stage-1 sweep) is not set")
        return None
    if "model.path" not in uses:
        raise ConfigError(
            f"sweep.stage1={cfg.sweep.stage1} is set but model.path does not hold {PLACEHOLDER} "
            f'(e.g. model.path: "{PLACEHOLDER}/model"): the points would not start from stage 1'
        )
    seeds = cfg.sweep.grid.get("train.seed", [base.train.seed])
    first = load_config(
        cfg.sweep.stage1,
        [
            *_passed_on(overrides),
            f"output_dir={override_value(str(Path(cfg.output_dir) / STAGE1_DIR))}",
            f"sweep.grid.train.seed={override_value(list(seeds))}",
            *(f"sweep.grid.{k}={override_value(v)}" for k, v in cfg.sweep.stage1_grid.items()),
        ],
    )
    if first.sweep.stage1 is not None:
        raise ConfigError(f"sweep.stage1={cfg.sweep.stage1} is a two-stage sweep itself: stage 1 must be a plain sweep")
    first_base = sweep_base(first)
    by_seed: dict[Any, list[str]] = {}
    for name, point_overrides in expand_grid(first.sweep, first_base):
        by_seed.setdefault(with_overrides(first_base, point_overrides).train.seed, []).append(name)
    wrong = {seed: names for seed, names in by_seed.items() if len(names) != 1}
    if wrong:
        raise ConfigError(
            f"sweep.stage1={cfg.sweep.stage1} with sweep.stage1_grid={cfg.sweep.stage1_grid}: each train.seed needs "
            f"exactly one stage-1 point, got {wrong}; narrow it with sweep.stage1_grid (e.g. loss.name: [lml])"
        )
    return StageOne(first, {seed: names[0] for seed, names in by_seed.items()})
