"""Grid sweeps over dotted config keys: expansion, idempotent running or job scripts, aggregation.

A sweep file is a normal config plus a `sweep:` section; the other sections are the base every
point starts from (or `sweep.base` names a config file to start from instead):

    defaults: [../office/bear.yaml]
    output_dir: runs/sweeps/office_ablation
    sweep:
      grid: {loss.lam: [0.1, 0.25], train.seed: [1, 2]}

Sweep folder (`output_dir`):
    sweep.yaml                the sweep config as run (base + grid)
    base.yaml                 the resolved config every point starts from (a rerun must match it)
    points.json               [{"name", "overrides"}] in grid order
    point_configs/NAME.yaml   each point's resolved config (what a job script trains)
    NAME/                     each point's run folder (docs/architecture.md, "Run folder")
    jobs/NAME.sh, submit_all.sh   scripts mode only
    results.csv               one row per point; results_by_config.csv: mean/std/n over seeds
    results.md                the same as Markdown tables (rewritten with plots by `report`)

A two-stage sweep (`sweep.stage1`: each point starts from its own seed's stage-1 model) is
bear_ds/two_stage.py's; it runs its stage-1 sweep in output_dir/stage1 first.

A point is done when its summary.json exists; rerunning the sweep skips it. Every point runs with
train.resume=auto, so a point that crashed continues from its newest checkpoint.

Several `bear-ds sweep` processes on the same config share the work: each point is claimed with a
lock (`.claims/NAME/.lock`, dropped by the kernel when its process ends), a process skips points
another live one holds, takes over before it ends any point whose holder has died meanwhile, and
whichever finds every point done at its end writes the aggregate. On
a machine with C cores, N processes with OMP_NUM_THREADS=C/N each use small models' cores better
than one process with C threads.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from bear_ds.config import (
    Config,
    ConfigError,
    SweepConfig,
    build_config,
    has_control_character,
    load_config,
    override_value,
    with_overrides,
)
from bear_ds.errors import RunStateError
from bear_ds.locks import RunFolderBusyError, RunFolderLock
from bear_ds.outputs import write_json_atomic, write_text_atomic
from bear_ds.reports.sweep_results import aggregate
from bear_ds.runs import CLAIMS, POINT_CONFIGS, SWEEP_CONFIG, SWEEP_MANIFEST, flatten, read_config_yaml
from bear_ds.training.loss_table import loss_spec

logger = logging.getLogger(__name__)

_RESERVED_TOP = ("output_dir", "sweep")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_MAX_NAME = 200  # file names are limited to 255 bytes on common file systems
BASE_CONFIG = "base.yaml"


class SweepError(RunStateError):
    """A sweep could not continue; the message names the point and the folder."""


def _name_part(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = override_value(value)
    elif isinstance(value, float):
        text = repr(value)  # shortest round-trip form: 0.5, 1e-05
    elif isinstance(value, (list, tuple)):
        text = "-".join(_name_part(v) for v in value)
    else:
        text = str(value)
    return _UNSAFE.sub("_", text)


def point_name(assignment: dict[str, Any]) -> str:
    """`loss.name=bear__loss.lam=0.5__train.seed=3`: grid order, filesystem-safe, stable."""
    return "__".join(f"{key}={_name_part(value)}" for key, value in assignment.items())


def expand_grid(sweep_cfg: SweepConfig, base: Config | None = None) -> list[tuple[str, list[str]]]:
    """[(point name, ["key=value", ...])] for the cartesian product of `sweep_cfg.grid`.

    Keys keep the grid's order, the last key varies fastest; `sweep_cfg.only_when` leaves a key out
    of the points where its condition fails (those points collapse into one). Every point is validated against the
    schema (on `base`, default: the default Config); all problems are reported in one ConfigError.
    """
    grid = sweep_cfg.grid
    if not grid:
        raise ConfigError(
            "sweep.grid is empty: give at least one dotted key with a list of values, e.g. loss.lam: [0.1, 0.5]"
        )
    base = base if base is not None else Config()
    problems: list[str] = []
    for key, values in grid.items():
        if key.split(".")[0] in _RESERVED_TOP:
            problems.append(f"sweep.grid.{key}: cannot be swept (the sweep sets output_dir per point and owns sweep.*)")
            continue
        if not values:
            problems.append(f"sweep.grid.{key}: empty list of values")
            continue
        for i, value in enumerate(values):
            if value in values[:i]:
                problems.append(f"sweep.grid.{key}: duplicate value {value!r}")
        if key in sweep_cfg.only_when:
            continue  # valid only beside its conditions' values (train.self_play): checked on its points below
        try:
            with_overrides(base, [f"{key}={override_value(values[0])}"])
        except ConfigError as err:
            problems.append(f"sweep.grid.{key}: {err}")
    for key, conditions in sweep_cfg.only_when.items():
        if key not in grid:
            problems.append(f"sweep.only_when.{key}: not a key of sweep.grid")
        for other in conditions:
            if other not in grid or other == key:
                problems.append(f"sweep.only_when.{key}.{other}: must be another key of sweep.grid")
    if problems:
        raise ConfigError("invalid sweep grid:\n  " + "\n  ".join(problems))

    points: list[tuple[str, list[str]]] = []
    seen: dict[str, dict[str, Any]] = {}
    keys = list(grid)
    for combo in product(*(grid[k] for k in keys)):
        full = dict(zip(keys, combo, strict=True))
        # keys whose only_when condition fails keep the base value; the points that differ only in
        # those keys collapse into one
        assignment = {
            k: v
            for k, v in full.items()
            if all(full[other] in allowed for other, allowed in sweep_cfg.only_when.get(k, {}).items())
        }
        name = point_name(assignment)
        if name in seen:
            if seen[name] != assignment:
                problems.append(f"points {seen[name]} and {assignment} get the same folder name {name!r}")
            continue
        if len(name.encode()) > _MAX_NAME:
            problems.append(f"point name too long for a folder ({len(name)} characters): {name}")
            continue
        seen[name] = assignment
        overrides = [f"{k}={override_value(v)}" for k, v in assignment.items()]
        try:
            loss_spec(with_overrides(base, overrides).loss.name)  # a name in the table of losses
        except ConfigError as err:
            problems.append(f"point {name}: {err}")
            continue
        points.append((name, overrides))
    if problems:
        raise ConfigError("invalid sweep grid:\n  " + "\n  ".join(problems))
    return points


def sweep_base(cfg: Config, base_overrides: Sequence[str] = ()) -> Config:
    """The config every point starts from: `sweep.base` if set, else the sweep config itself,
    with the sweep section reset (a point is a plain run), output_dir = the sweep folder, and then
    `base_overrides` (what the caller fixes for every point, e.g. the prepared data folder)."""
    if cfg.sweep.base is None:
        raw = cfg.model_dump()
    else:
        # with a base file, a section set in the sweep file too would be ambiguous (which wins?)
        defaults = flatten(Config().model_dump())
        extra = sorted(
            k
            for k, v in flatten(cfg.model_dump()).items()
            if k.split(".")[0] not in _RESERVED_TOP and defaults.get(k) != v
        )
        if extra:
            raise ConfigError(
                f"sweep.base={cfg.sweep.base} is set, but the sweep config also sets {', '.join(extra)}; "
                "put those in the base file, or drop sweep.base and compose with `defaults:`"
            )
        raw = load_config(cfg.sweep.base).model_dump()
    raw["sweep"] = SweepConfig().model_dump()
    raw["output_dir"] = cfg.output_dir
    base = build_config(raw, origin=f"sweep base ({cfg.sweep.base or 'the sweep config'})")
    return with_overrides(base, list(base_overrides)) if base_overrides else base


def point_config(base: Config, sweep_dir: Path, name: str, overrides: list[str]) -> Config:
    return with_overrides(
        base, [*overrides, f"output_dir={override_value(str(sweep_dir / name))}", "train.resume=auto"]
    )


@dataclass
class SweepOutcome:
    sweep_dir: Path
    points: list[str]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    running_elsewhere: list[str] = field(default_factory=list)
    scripts: list[Path] = field(default_factory=list)
    complete: bool = False  # run mode: every point done when this process ended


def _check_same_base(sweep_dir: Path, base: Config) -> None:
    """A sweep folder resumed with a different base config would mix results silently; the
    resolved base is stored (base.yaml), so an edited `sweep.base` file is caught too."""
    previous, why = read_config_yaml(sweep_dir / BASE_CONFIG)
    if previous is None:
        if (sweep_dir / BASE_CONFIG).exists():
            raise SweepError(f"cannot compare with the previous sweep's base config: {why}")
        return
    old, new = flatten(previous), flatten(base.model_dump())
    # a key the saved base lacks was added to bear_ds since (with a default that keeps the old
    # behaviour): at its default it is no change, so upgrading does not orphan a running sweep
    defaults = flatten(Config().model_dump())
    old.update({k: defaults[k] for k in new if k not in old and k in defaults})
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]
    if changed:
        raise SweepError(
            f"{sweep_dir} holds a sweep with a different base config ({'; '.join(changed)}); "
            "use a new output_dir, or remove the folder to start over"
        )


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def _job_script(name: str, overrides: list[str], point_dir: Path, config_path: Path, launcher: str | None) -> str:
    launch = ["accelerate", "launch"]
    if launcher:
        launch += ["--config_file", launcher]
    launch += ["-m", "bear_ds.train", "--config", str(config_path)]
    done = shlex.quote(str(point_dir / "summary.json"))
    # everything that reaches the shell is quoted, comments included; a control character in any of
    # it could end a line early, so none gets through (override_value never writes one)
    parts = [name, *overrides, str(point_dir), str(config_path), str(launcher or ""), str(Path.cwd())]
    bad = next((p for p in parts if has_control_character(p)), None)
    if bad is not None:
        raise SweepError(f"sweep point {name!r}: control character in {bad!r}: refused in a job script")
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# bear-ds sweep point {shlex.quote(name)}",
            f"# overrides: {shlex.join(overrides)}",
            "# Exits at once when the point is done (summary.json exists); a crashed point resumes",
            "# from its newest checkpoint (train.resume=auto in its config).",
            "set -euo pipefail",
            f"cd {shlex.quote(str(Path.cwd()))}  # relative paths in the config are relative to here",
            f"if [ -f {done} ]; then echo {shlex.quote('done already: ' + name)}; exit 0; fi",
            ("" if launcher else "# no sweep.launcher: accelerate uses its default config\n")
            + "exec "
            + shlex.join(launch),
            "",
        ]
    )


def _write_scripts(
    sweep_dir: Path, outcome: SweepOutcome, overrides_of: dict[str, list[str]], launcher: str | None
) -> None:
    jobs_dir = sweep_dir.resolve() / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    pending: list[Path] = []
    for name in outcome.points:
        point_dir = sweep_dir.resolve() / name
        script = jobs_dir / f"{name}.sh"
        write_text_atomic(
            script,
            _job_script(
                name, overrides_of[name], point_dir, sweep_dir.resolve() / POINT_CONFIGS / f"{name}.yaml", launcher
            ),
        )
        script.chmod(0o755)
        outcome.scripts.append(script)
        if has_summary(point_dir):  # the job scripts test the same file
            outcome.skipped.append(name)
        else:
            pending.append(script)
    submit = sweep_dir / "submit_all.sh"
    write_text_atomic(
        submit,
        "\n".join(
            [
                "#!/usr/bin/env bash",
                f"# Submits the {len(pending)} of {len(outcome.points)} points of this sweep that were not done when it was written.",
                "# SUBMIT says how: default `bash` runs them one after another here; e.g. SUBMIT=sbatch ./submit_all.sh",
                "set -euo pipefail",
                'SUBMIT="${SUBMIT:-bash}"',
                *(f"$SUBMIT {shlex.quote(str(s))}" for s in pending),
                "",
            ]
        ),
    )
    submit.chmod(0o755)


def has_summary(point_dir: Path) -> bool:
    return (point_dir / "summary.json").is_file()


def run_sweep(
    cfg: Config,
    run_point: Callable[[Config, Path], None],
    is_done: Callable[[Path], bool] = has_summary,
    base_overrides: Sequence[str] = (),
    resolve: Callable[[Config], Config] | None = None,
) -> SweepOutcome:
    """Run every point not done yet (`run_point(point_cfg, point_dir)` must leave point_dir done:
    by default, with a summary.json; `is_done` can ask for more, e.g. an analysis too), or in
    `sweep.mode: scripts` write jobs/NAME.sh and submit_all.sh instead.

    Stops at the first failing point (the failure is re-raised; rerunning resumes from there).
    In run mode the results are aggregated at the end (results.csv, results.md).
    `base_overrides` apply to the base of every point (see `sweep_base`); `resolve` turns each
    point's config into the one it runs with (a two-stage sweep's `{stage1}` paths: bear_ds.two_stage).
    """
    sweep_dir = Path(cfg.output_dir)
    base = sweep_base(cfg, base_overrides)
    points = expand_grid(cfg.sweep, base)
    point_cfgs = {name: point_config(base, sweep_dir, name, overrides) for name, overrides in points}
    if resolve is not None:
        point_cfgs = {name: resolve(pcfg) for name, pcfg in point_cfgs.items()}
    _check_same_base(sweep_dir, base)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_yaml(sweep_dir / SWEEP_CONFIG, cfg.model_dump())
    _write_yaml(sweep_dir / BASE_CONFIG, base.model_dump())
    manifest = {"grid": list(cfg.sweep.grid), "points": [{"name": n, "overrides": o} for n, o in points]}
    write_json_atomic(sweep_dir / SWEEP_MANIFEST, manifest, indent=1)
    for name, pcfg in point_cfgs.items():
        _write_yaml(sweep_dir / POINT_CONFIGS / f"{name}.yaml", pcfg.model_dump())

    outcome = SweepOutcome(sweep_dir=sweep_dir, points=[n for n, _ in points])
    if cfg.sweep.mode == "scripts":
        _write_scripts(sweep_dir, outcome, dict(points), cfg.sweep.launcher)
        logger.info("wrote %d job scripts and %s", len(outcome.scripts), sweep_dir / "submit_all.sh")
        return outcome

    order = {name: i for i, name in enumerate(point_cfgs, start=1)}
    todo, first_pass = list(point_cfgs), True
    while todo:
        held_elsewhere: list[str] = []
        ran_before = len(outcome.ran)
        for name in todo:
            pcfg, i = point_cfgs[name], order[name]
            point_dir = sweep_dir / name
            if is_done(point_dir):
                outcome.skipped.append(name)
                logger.info("[%d/%d] %s: done already, skipped", i, len(points), name)
                continue
            claim = RunFolderLock(sweep_dir / CLAIMS / name)
            try:
                claim.acquire()
            except RunFolderBusyError as busy:
                held_elsewhere.append(name)
                logger.info("[%d/%d] %s: skipped, %s", i, len(points), name, busy.owner)
                continue
            try:
                if is_done(point_dir):  # finished by another process between the two checks
                    outcome.skipped.append(name)
                    continue
                logger.info("[%d/%d] %s: %s", i, len(points), name, "resuming" if point_dir.exists() else "starting")
                point_dir.mkdir(parents=True, exist_ok=True)
                try:
                    run_point(pcfg, point_dir)
                except BaseException:
                    logger.error(
                        "sweep point %s failed; its folder %s is kept, rerun the sweep to resume it", name, point_dir
                    )
                    raise
            finally:
                claim.release()
            if not is_done(point_dir):
                raise SweepError(f"sweep point {name} returned without finishing {point_dir} (no summary.json?)")
            outcome.ran.append(name)
        # a process that dies holding a point leaves it unfinished, with its claim free again (the
        # kernel drops the flock): look at the points seen held once more and take over any whose
        # owner has ended since; stop when a pass runs nothing (all still held by live processes)
        outcome.running_elsewhere = held_elsewhere
        todo = held_elsewhere if first_pass or len(outcome.ran) > ran_before else []
        first_pass = False
    left = [n for n in outcome.points if not is_done(sweep_dir / n)]
    outcome.complete = not left
    if outcome.complete:
        aggregate(sweep_dir)
    else:
        logger.info(
            "%d point(s) still running in other processes (%s): the last process to finish writes the aggregate",
            len(left),
            ", ".join(left),
        )
    return outcome
