"""Sweep expansion, idempotent running, job scripts and aggregation over synthetic run folders."""

from __future__ import annotations

import json
import math
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from report_fakes import write_summary

from bear_ds.config import Config, ConfigError, SweepConfig, load_config, save_config, with_overrides
from bear_ds.reports import report
from bear_ds.sweeps import SweepError, aggregate, expand_grid, run_sweep


def sweep_cfg(tmp_path: Path, grid: dict, **sweep: object) -> Config:
    raw = {"output_dir": str(tmp_path / "sweep"), "sweep": {"grid": grid, **sweep}}
    return Config.model_validate(raw)


class FakeTrainer:
    """run_point stand-in: records calls, writes the trainer's config.yaml and summary.json."""

    def __init__(self, fail_on: str | None = None, write_summary: bool = True) -> None:
        self.calls: list[tuple[Config, Path]] = []
        self.fail_on = fail_on
        self.write = write_summary

    def __call__(self, cfg: Config, out: Path) -> None:
        self.calls.append((cfg, out))
        save_config(cfg, out)
        if self.fail_on and self.fail_on in out.name:
            raise RuntimeError(f"simulated crash in {out.name}")
        if self.write:
            write_summary(out, 0.1 * cfg.train.seed)


def test_expand_grid_names_order_and_overrides() -> None:
    grid = {"loss.name": ["lml", "bear"], "loss.lam": [0.5, 1e-05], "train.seed": [1, 2]}
    points = expand_grid(SweepConfig(grid=grid))
    assert len(points) == 8
    names = [n for n, _ in points]
    assert names[0] == "loss.name=lml__loss.lam=0.5__train.seed=1"
    assert names[1] == "loss.name=lml__loss.lam=0.5__train.seed=2"  # last key varies fastest
    assert names[-1] == "loss.name=bear__loss.lam=1e-05__train.seed=2"
    # YAML 1.1 reads "1e-05" as a string: the override is written so that it parses back to a float
    assert points[-1][1] == ["loss.name=bear", "loss.lam=1.0e-05", "train.seed=2"]
    assert len(set(names)) == 8
    # overrides parse back to the grid values
    cfg = with_overrides(Config(), points[-1][1])
    assert (cfg.loss.name, cfg.loss.lam, cfg.train.seed) == ("bear", 1e-05, 2)
    # stable: the same grid gives the same names
    assert expand_grid(SweepConfig(grid=grid)) == points


def test_expand_grid_filesystem_safe_and_typed_values() -> None:
    grid = {
        "prompt.instruction": ["office products", "a/b"],
        "train.eval_max_users": [None],
        "model.lora.enabled": [True],
    }
    points = expand_grid(SweepConfig(grid=grid))
    assert points[0][0] == "prompt.instruction=office_products__train.eval_max_users=null__model.lora.enabled=true"
    assert points[1][0].startswith("prompt.instruction=a_b__")
    cfg = with_overrides(Config(), points[0][1])
    assert cfg.prompt.instruction == "office products" and cfg.train.eval_max_users is None and cfg.model.lora.enabled


def test_expand_grid_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        expand_grid(SweepConfig(grid={"loss.lamb": [0.1], "train.seed": [1]}))
    assert "loss.lamb" in str(err.value) and "lam" in str(err.value)


def test_expand_grid_rejects_bad_values_duplicates_and_reserved_keys() -> None:
    with pytest.raises(ConfigError, match="loss.name=foo"):
        expand_grid(SweepConfig(grid={"train.seed": [1], "loss.name": ["bear", "foo"]}))
    with pytest.raises(ConfigError, match="duplicate value 0.5"):
        expand_grid(SweepConfig(grid={"loss.lam": [0.5, 0.5]}))
    with pytest.raises(ConfigError, match="same folder name"):
        expand_grid(SweepConfig(grid={"prompt.instruction": ["a/b", "a_b"]}))
    with pytest.raises(ConfigError, match="output_dir"):
        expand_grid(SweepConfig(grid={"output_dir": ["x", "y"]}))
    with pytest.raises(ConfigError, match="empty"):
        expand_grid(SweepConfig(grid={}))
    with pytest.raises(ConfigError, match=r"sweep.only_when.loss.xi.loss.nam"):
        expand_grid(SweepConfig(grid={"loss.xi": [1.0]}, only_when={"loss.xi": {"loss.nam": ["bear"]}}))


def test_expand_grid_only_when_collapses_irrelevant_points() -> None:
    grid = {"loss.name": ["lml", "msl", "bear"], "loss.lam": [0.1, 0.5], "loss.xi": [1.0, 2.75], "train.seed": [1, 2]}
    only = {"loss.lam": {"loss.name": ["bear"]}, "loss.xi": {"loss.name": ["bear"]}}
    points = expand_grid(SweepConfig(grid=grid, only_when=only))
    assert len(points) == (1 + 1 + 2 * 2) * 2
    assert points[0] == ("loss.name=lml__train.seed=1", ["loss.name=lml", "train.seed=1"])
    assert "loss.name=bear__loss.lam=0.5__loss.xi=2.75__train.seed=2" in [n for n, _ in points]


def test_run_sweep_is_idempotent_and_reruns_unfinished_points(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"loss.lam": [0.1, 0.5], "train.seed": [1, 2]})
    trainer = FakeTrainer()
    outcome = run_sweep(cfg, trainer)
    assert len(trainer.calls) == 4 and len(outcome.ran) == 4
    point_cfg, out = trainer.calls[0]
    assert out == tmp_path / "sweep" / "loss.lam=0.1__train.seed=1"
    assert point_cfg.output_dir == str(out) and point_cfg.train.resume == "auto"
    assert point_cfg.loss.lam == 0.1 and point_cfg.sweep.grid == {}  # a point is a plain run
    # the sweep records what it ran
    saved = yaml.safe_load((tmp_path / "sweep" / "sweep.yaml").read_text())
    assert saved["sweep"]["grid"] == {"loss.lam": [0.1, 0.5], "train.seed": [1, 2]}
    assert (tmp_path / "sweep" / "results.csv").is_file()

    again = FakeTrainer()
    outcome = run_sweep(cfg, again)
    assert again.calls == [] and len(outcome.skipped) == 4

    (tmp_path / "sweep" / "loss.lam=0.5__train.seed=1" / "summary.json").unlink()
    third = FakeTrainer()
    run_sweep(cfg, third)
    assert [o.name for _, o in third.calls] == ["loss.lam=0.5__train.seed=1"]


def test_two_sweep_processes_share_the_points_and_the_last_one_aggregates(tmp_path: Path) -> None:
    # another live process holds point seed=2 (its claim lock): this one runs the others, leaves
    # seed=2 alone and writes no aggregate; once seed=2 is done, a rerun aggregates everything
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2, 3]})
    claim_dir = tmp_path / "sweep" / ".claims" / "train.seed=2"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from bear_ds.locks import RunFolderLock; "
            f"RunFolderLock({str(claim_dir)!r}).acquire(); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        trainer = FakeTrainer()
        outcome = run_sweep(cfg, trainer)
        assert [o.name for _, o in trainer.calls] == ["train.seed=1", "train.seed=3"]
        assert outcome.running_elsewhere == ["train.seed=2"] and not outcome.complete
        assert not (tmp_path / "sweep" / "results.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without finishing: its claim is free, so the point runs here
    finisher = FakeTrainer()
    outcome = run_sweep(cfg, finisher)
    assert [o.name for _, o in finisher.calls] == ["train.seed=2"] and outcome.complete
    assert len(pd.read_csv(tmp_path / "sweep" / "results.csv")) == 3
    (tmp_path / "sweep" / "stray").mkdir()
    aggregate(tmp_path / "sweep")
    text = (tmp_path / "sweep" / "results.md").read_text()
    assert "stray is not a point" in text and ".claims" not in text  # the claims folder is the sweep's own


def test_a_point_whose_holder_dies_after_it_was_passed_is_taken_over(tmp_path: Path) -> None:
    # another process holds seed=2 when this one passes it, and is killed (SIGKILL) while this one
    # runs seed=3: before ending, this process finds seed=2's claim free, runs it and aggregates
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2, 3]})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from bear_ds.locks import RunFolderLock; "
            f"RunFolderLock({str(tmp_path / 'sweep' / '.claims' / 'train.seed=2')!r}).acquire(); "
            "print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    trainer = FakeTrainer()

    def kill_holder_during_seed_3(point_cfg: Config, out: Path) -> None:
        if out.name == "train.seed=3":
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        trainer(point_cfg, out)

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        outcome = run_sweep(cfg, kill_holder_during_seed_3)
    finally:
        holder.kill()
        holder.wait()
    assert [o.name for _, o in trainer.calls] == ["train.seed=1", "train.seed=3", "train.seed=2"]
    assert outcome.complete and outcome.running_elsewhere == [] and sorted(outcome.ran) == sorted(outcome.points)
    assert len(pd.read_csv(tmp_path / "sweep" / "results.csv")) == 3


def test_run_sweep_crash_stops_and_restart_resumes(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2, 3]})
    crashing = FakeTrainer(fail_on="seed=2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sweep(cfg, crashing)
    assert len(crashing.calls) == 2
    assert not (tmp_path / "sweep" / "train.seed=2" / "summary.json").exists()
    assert (tmp_path / "sweep" / "train.seed=2" / "config.yaml").exists()  # partial folder kept for resume
    restart = FakeTrainer()
    run_sweep(cfg, restart)
    assert [o.name for _, o in restart.calls] == ["train.seed=2", "train.seed=3"]
    assert restart.calls[0][0].train.resume == "auto"


def test_run_sweep_custom_completion_test(tmp_path: Path) -> None:
    # a pipeline point is done only once analysed: a summary alone is not enough to skip it
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2]})
    analysed = lambda d: (d / "summary.json").is_file() and (d / "analysis.json").is_file()  # noqa: E731
    with pytest.raises(SweepError, match="without finishing"):
        run_sweep(cfg, FakeTrainer(), is_done=analysed)
    (tmp_path / "sweep" / "train.seed=1" / "analysis.json").write_text("{}")
    trainer = FakeTrainer()
    with pytest.raises(SweepError):  # seed 1 is skipped; seed 2 still lacks its analysis
        run_sweep(cfg, trainer, is_done=analysed)
    assert [o.name for _, o in trainer.calls] == ["train.seed=2"]


def test_run_sweep_requires_summary_and_same_base(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"train.seed": [1]})
    with pytest.raises(SweepError, match="summary.json"):
        run_sweep(cfg, FakeTrainer(write_summary=False))
    changed = with_overrides(cfg, ["loss.tau=2.0"])
    with pytest.raises(SweepError, match=r"loss.tau: 1.0 -> 2.0"):
        run_sweep(changed, FakeTrainer())


def test_a_key_added_since_the_sweep_started_is_no_change_at_its_default(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"train.seed": [1]})
    run_sweep(cfg, FakeTrainer())
    base = tmp_path / "sweep" / "base.yaml"
    saved = yaml.safe_load(base.read_text())
    del saved["data"]["valid_from"]  # as written by a bear_ds without that key
    base.write_text(yaml.safe_dump(saved))
    assert run_sweep(cfg, FakeTrainer()).complete
    with pytest.raises(SweepError, match=r"data.valid_from: 'train_tail' -> 'test_users'"):
        run_sweep(with_overrides(cfg, ["data.valid_from=test_users"]), FakeTrainer())


def test_sweep_base_file(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("loss: {name: msl, tau: 3.0}\n")
    cfg = sweep_cfg(tmp_path, {"train.seed": [1]}, base=str(base))
    trainer = FakeTrainer()
    run_sweep(cfg, trainer)
    assert trainer.calls[0][0].loss.tau == 3.0 and trainer.calls[0][0].loss.name == "msl"
    both = with_overrides(cfg, ["train.epochs=4"])
    with pytest.raises(ConfigError, match="train.epochs"):
        run_sweep(both, FakeTrainer())


def test_scripts_mode_writes_jobs_instead_of_running(tmp_path: Path) -> None:
    launcher = "launchers/accelerate/zero3.yaml"
    cfg = sweep_cfg(tmp_path, {"loss.name": ["msl", "bear"], "train.seed": [7]}, mode="scripts", launcher=launcher)
    done_dir = tmp_path / "sweep" / "loss.name=bear__train.seed=7"
    write_summary(done_dir, 0.2)
    trainer = FakeTrainer()
    outcome = run_sweep(cfg, trainer)
    assert trainer.calls == []
    sweep_dir = (tmp_path / "sweep").resolve()
    assert [s.name for s in outcome.scripts] == ["loss.name=msl__train.seed=7.sh", "loss.name=bear__train.seed=7.sh"]
    job = outcome.scripts[0].read_text()
    point_yaml = sweep_dir / "point_configs" / "loss.name=msl__train.seed=7.yaml"
    assert f"accelerate launch --config_file {launcher} -m bear_ds.train --config {shlex.quote(str(point_yaml))}" in job
    assert "summary.json" in job
    point = load_config(point_yaml)
    assert point.loss.name == "msl" and point.train.seed == 7 and point.train.resume == "auto"
    assert point.output_dir == str(tmp_path / "sweep" / "loss.name=msl__train.seed=7")
    submit = (tmp_path / "sweep" / "submit_all.sh").read_text()
    assert "loss.name=msl__train.seed=7.sh" in submit and "loss.name=bear__train.seed=7.sh" not in submit
    for script in [*outcome.scripts, tmp_path / "sweep" / "submit_all.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid bash


def test_aggregate_mean_std_over_seeds(tmp_path: Path) -> None:
    grid = {"loss.name": ["lml", "bear"], "train.seed": [1, 2, 3]}
    cfg = sweep_cfg(tmp_path, grid, mode="scripts")
    run_sweep(cfg, FakeTrainer())  # writes the manifest and point configs only
    sweep_dir = tmp_path / "sweep"
    # bear: seeds 1..3 with test NDCG@10 0.1, 0.2, 0.4; lml: seeds 1, 2 done, seed 3 pending
    for seed, value in ((1, 0.1), (2, 0.2), (3, 0.4)):
        write_summary(sweep_dir / f"loss.name=bear__train.seed={seed}", value, train_time_s=10.0 * seed)
    for seed, value in ((1, 0.3), (2, 0.5)):
        write_summary(sweep_dir / f"loss.name=lml__train.seed={seed}", value)

    points = aggregate(sweep_dir)
    assert len(points) == 6
    assert list(points["status"]) == ["done", "done", "pending", "done", "done", "done"]
    assert points.loc[3, "test.ndcg@10"] == pytest.approx(0.1) and points.loc[3, "train.seed"] == 1

    grouped = pd.read_csv(sweep_dir / "results_by_config.csv")
    bear = grouped[grouped["loss.name"] == "bear"].iloc[0]
    # by hand: mean(0.1, 0.2, 0.4) = 0.23333; deviations -0.13333, -0.03333, 0.16667,
    # squares sum 0.046667, / (n-1) = 0.023333, sqrt = 0.152753
    assert bear["n"] == 3
    assert bear["test.ndcg@10 mean"] == pytest.approx(0.233333, abs=1e-5)
    assert bear["test.ndcg@10 std"] == pytest.approx(0.152753, abs=1e-5)
    assert bear["train_time_s mean"] == pytest.approx(20.0) and bear["train_time_s std"] == pytest.approx(10.0)
    lml = grouped[grouped["loss.name"] == "lml"].iloc[0]
    assert lml["n"] == 2 and lml["test.ndcg@10 mean"] == pytest.approx(0.4)
    assert lml["test.ndcg@10 std"] == pytest.approx(math.sqrt(0.02))

    md = (sweep_dir / "results.md").read_text()
    assert "0.2333 ± 0.1528" in md and "5 of 6 points done" in md
    assert "point loss.name=lml__train.seed=3: not done" in md
    per_point = pd.read_csv(sweep_dir / "results.csv")
    assert len(per_point) == 6 and "test.hr@10" in per_point.columns


def test_aggregate_shows_only_when_keys_as_not_applicable(tmp_path: Path) -> None:
    grid = {"loss.name": ["lml", "bear"], "loss.lam": [0.1, 0.5], "train.seed": [1]}
    cfg = sweep_cfg(tmp_path, grid, mode="scripts", only_when={"loss.lam": {"loss.name": ["bear"]}})
    run_sweep(cfg, FakeTrainer())
    manifest = json.loads((tmp_path / "sweep" / "points.json").read_text())
    for point in manifest["points"]:
        write_summary(tmp_path / "sweep" / point["name"], 0.1)
    points = aggregate(tmp_path / "sweep")
    assert points["loss.lam"].isna().tolist() == [True, False, False]
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "| lml | – | 1 |" in md


def test_edited_base_file_is_caught_on_rerun(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("loss: {tau: 3.0}\n")
    cfg = sweep_cfg(tmp_path, {"train.seed": [1]}, base=str(base))
    run_sweep(cfg, FakeTrainer())
    base.write_text("loss: {tau: 4.0}\n")
    with pytest.raises(SweepError, match=r"loss.tau: 3.0 -> 4.0"):
        run_sweep(cfg, FakeTrainer())


def test_pipeline_sweep_with_a_base_file_prepares_the_base_data(tmp_path: Path) -> None:
    from train_data import write_prepared

    from bear_ds.pipeline import sweep

    prepared = write_prepared(tmp_path / "prepared")
    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{source: prepared, path: {prepared}}}\nloss: {{name: msl}}\n")
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2]}, base=str(base), mode="scripts")
    sweep(cfg)  # before the fix: ConfigError (data.path set in both) after preparing the default dataset
    for seed in (1, 2):
        point = load_config(tmp_path / "sweep" / "point_configs" / f"train.seed={seed}.yaml")
        assert (point.data.source, point.data.path, point.loss.name) == ("prepared", str(prepared), "msl")


def test_aggregate_groups_a_list_valued_grid_key(tmp_path: Path) -> None:
    modules = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"]]
    cfg = sweep_cfg(tmp_path, {"model.lora.target_modules": modules, "train.seed": [1, 2]}, mode="scripts")
    outcome = run_sweep(cfg, FakeTrainer())
    for i, name in enumerate(outcome.points):
        write_summary(tmp_path / "sweep" / name, 0.1 * (i + 1))
    aggregate(tmp_path / "sweep")  # before the fix: TypeError, unhashable type: 'list'
    grouped = pd.read_csv(tmp_path / "sweep" / "results_by_config.csv")
    assert list(grouped["model.lora.target_modules"]) == ["[q_proj, v_proj]", "[q_proj, k_proj, v_proj]"]
    assert list(grouped["n"]) == [2, 2]


def test_aggregate_counts_a_metric_some_points_lack(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2, 3]}, mode="scripts")
    outcome = run_sweep(cfg, FakeTrainer())
    for name in outcome.points:
        write_summary(tmp_path / "sweep" / name, 0.2)
    summary_path = tmp_path / "sweep" / outcome.points[2] / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["test"]  # e.g. a run whose test was never decoded
    summary_path.write_text(json.dumps(summary))
    aggregate(tmp_path / "sweep")
    grouped = pd.read_csv(tmp_path / "sweep" / "results_by_config.csv")
    assert grouped.loc[0, "n"] == 3 and grouped.loc[0, "test.ndcg@10 n"] == 2
    assert "valid.ndcg@10 n" not in grouped.columns  # every point has it
    assert "0.2000 ± 0.0000 (n=2)" in (tmp_path / "sweep" / "results.md").read_text()


def test_a_non_finite_metric_is_left_out_of_the_means_with_a_note(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, {"train.seed": [1, 2, 3]}, mode="scripts")
    outcome = run_sweep(cfg, FakeTrainer())
    for name, value in zip(outcome.points, (0.1, 0.2, 0.4), strict=True):
        write_summary(tmp_path / "sweep" / name, value)
    for name, split, metric, bad in (
        (outcome.points[0], "test", "ndcg@10", math.inf),
        (outcome.points[1], "valid", "hr@5", math.nan),
    ):
        summary_path = tmp_path / "sweep" / name / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary[split][metric] = bad
        summary_path.write_text(json.dumps(summary))  # Infinity / NaN, as json writes them
    aggregate(tmp_path / "sweep")
    grouped = pd.read_csv(tmp_path / "sweep" / "results_by_config.csv")
    assert grouped.loc[0, "test.ndcg@10 mean"] == pytest.approx(0.3) and grouped.loc[0, "test.ndcg@10 n"] == 2
    assert grouped.loc[0, "valid.hr@5 n"] == 2 and math.isfinite(grouped.loc[0, "valid.hr@5 mean"])
    md = (tmp_path / "sweep" / "results.md").read_text()
    assert "0.3000 ± 0.1414 (n=2)" in md
    assert "point train.seed=1: test.ndcg@10 = inf in " in md and "left out of the mean and std over seeds" in md
    assert "point train.seed=2: valid.hr@5 = nan in " in md
    assert math.isinf(pd.read_csv(tmp_path / "sweep" / "results.csv").loc[0, "test.ndcg@10"])  # kept as read
    # the report's statistics leave it out of the seed table's mean too, and say so
    text = report(tmp_path / "sweep").read_text()
    assert "train.seed=1: test ndcg@10 is inf in summary.json; left out of the mean" in text
    assert "point train.seed=1: test.ndcg@10 = inf is not finite; left out" in text  # and of the NDCG-vs-λ plot
    assert re.search(r"\| loss.name=bear \| 3 \| 0\.3000 ± 0\.1414 \[[^]]+\] \(n=2\) \|", text), text


def test_job_scripts_quote_everything_and_a_newline_in_a_value_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"x\ntouch {marker}\n# "
    grid = {"prompt.instruction": [evil, "plain; touch " + str(marker)], "train.seed": [7]}
    cfg = sweep_cfg(tmp_path, grid, mode="scripts")
    outcome = run_sweep(cfg, FakeTrainer())
    for script in outcome.scripts:
        text = script.read_text()
        assert not any(line.startswith("touch") for line in text.splitlines())
        # run the script with a stub `accelerate` on PATH: only it may run, nothing from the values
        stub = tmp_path / "bin"
        stub.mkdir(exist_ok=True)
        (stub / "accelerate").write_text("#!/usr/bin/env bash\nexit 0\n")
        (stub / "accelerate").chmod(0o755)
        env = {"PATH": f"{stub}:/usr/bin:/bin"}
        subprocess.run(["bash", str(script)], check=True, env=env, cwd=tmp_path)
        assert not marker.exists()
    # the value survives the trip through the point config
    point = load_config(tmp_path / "sweep" / "point_configs" / f"{outcome.points[0]}.yaml")
    assert point.prompt.instruction == evil


@pytest.mark.parametrize("item", ["prompt.instruction=a\nb", "train.seed=1\x1b", "prompt.template=\x00"])
def test_control_characters_in_overrides_are_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="control character"):
        with_overrides(Config(), [item])
    assert with_overrides(Config(), ['prompt.instruction="a\\nb"']).prompt.instruction == "a\nb"  # YAML escape
