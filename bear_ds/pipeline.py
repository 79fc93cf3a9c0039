"""Thin orchestration of whole experiments: one run point, the embedded demo, sweeps.

A run point = train (with per-epoch validation and test, epoch selected on valid) -> pruning
analysis of the exported model on the test split -> summary. Points whose `summary.json` and
`analysis/analysis.json` exist are skipped, so a crashed demo or sweep restarts where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from bear_ds.config import Config, ConfigError, with_overrides
from bear_ds.data import resolve_prepared
from bear_ds.evaluation.analysis import analyze
from bear_ds.folders import check_output_dir
from bear_ds.locks import RunFolderLock
from bear_ds.outputs import check_writable_folder, write_json_atomic, write_text_atomic
from bear_ds.reports import report
from bear_ds.sweeps import CLAIMS, run_sweep, sweep_base
from bear_ds.training import train
from bear_ds.two_stage import stage_one

METHODS = ("lml", "msl", "bear")
DEMO_CONFIG = "demo.yaml"  # the resolved config of the demo, in its folder


def point_finished(out_dir: Path) -> bool:
    return (out_dir / "summary.json").is_file() and (out_dir / "analysis" / "analysis.json").is_file()


def run_point(cfg: Config, out_dir: Path) -> None:
    """Train one configuration into `out_dir`, then run the pruning analysis on its test users."""
    out_dir = Path(out_dir)
    point = with_overrides(cfg, [f"output_dir={out_dir}"])
    if not (out_dir / "summary.json").is_file():
        # resume=auto: a point that crashed mid-training continues from its last checkpoint
        train(with_overrides(point, ["train.resume=auto"]))
    analysis_cfg = with_overrides(
        point,
        [
            f"model.path={out_dir / 'model'}",
            f"output_dir={out_dir / 'analysis'}",
            "eval.split=test",  # analyze.max_users caps the (costly) exhaustive ranking
        ],
    )
    analyze(analysis_cfg)


def demo(cfg: Config) -> Path:
    """The embedded default: LML, MSL and BEAR on the same data and seed, then results.md and plots."""
    out = check_output_dir(cfg.output_dir, "demo")
    started = time.perf_counter()
    # the demo's resolved config; it also tells a demo folder (bear_ds.folders) from the start
    write_text_atomic(check_writable_folder(out) / DEMO_CONFIG, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    data_dir = resolve_prepared(cfg, out / "data")  # once: every method sees the same splits
    for method in METHODS:
        point_dir = out / method
        if point_finished(point_dir):
            print(f"[demo] {method}: already finished in {point_dir}, skipped")
            continue
        print(f"[demo] {method}: training into {point_dir}")
        point = with_overrides(cfg, [f"loss.name={method}", f"data.path={data_dir}", "data.source=prepared"])
        run_point(point, point_dir)
    print(report(out).read_text())
    write_json_atomic(out / "demo_time.json", {"wall_s": round(time.perf_counter() - started, 1)})
    return out


def sweep(cfg: Config, overrides: Sequence[str] = ()) -> Path:
    """Run (or write job scripts for) every grid point of `cfg.sweep`, then aggregate and report.

    A two-stage sweep (`sweep.stage1`, bear_ds/two_stage.py) runs its stage-1 sweep first, in
    OUT/stage1, with `overrides` (the command line's) applied there too."""
    out = check_output_dir(cfg.output_dir, "sweep")
    first = stage_one(cfg, overrides)
    if first is not None:
        if cfg.sweep.mode == "scripts":
            raise ConfigError("sweep.mode=scripts does not run two-stage sweeps (sweep.stage1): use sweep.mode=run")
        sweep(first.cfg)  # the stage-1 points no other process holds; the rest are waited for below
    # once, from the data the points use (a sweep.base file's, if set): every point sees the same
    # splits; a second process on the same sweep waits for the first one's preparation
    with RunFolderLock(out / CLAIMS / "data").acquire(wait=True):
        data_dir = resolve_prepared(sweep_base(cfg), out / "data")
    prepared = [f"data.path={data_dir}", "data.source=prepared"]
    if first is None:
        outcome = run_sweep(cfg, run_point, is_done=point_finished, base_overrides=prepared)
    else:

        def after_stage_one(point: Config, point_dir: Path) -> None:
            first.wait_for(point.train.seed, run_point, point_finished)
            run_point(point, point_dir)

        outcome = run_sweep(cfg, after_stage_one, point_finished, prepared, resolve=first.link)
        if outcome.complete:
            sweep(first.cfg)  # every stage-1 point is done: its aggregate and report
    if outcome.complete:  # run mode, every point done (by this process or others): the report
        report(out)
    return out
