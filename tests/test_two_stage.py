"""Two-stage sweeps (bear_ds/two_stage.py): stage 1 first, each stage-2 point from its own seed's
stage-1 model, the command line's overrides on both stages; the reports' pooling over seeds by user
and the learning rate chosen on validation; and the contract command of configs/sweeps/ml100k_finetune.yaml."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from report_fakes import write_jsonl, write_run, write_summary

import bear_ds.pipeline as pipeline
from bear_ds.config import Config, ConfigError
from bear_ds.reports import report
from bear_ds.reports.evidence import MethodRuns, choose_on_valid
from bear_ds.reports.stats import paired_difference, user_level_difference, user_mean_differences
from bear_ds.sweeps import run_sweep
from bear_ds.two_stage import stage_one

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- pooling over seeds by user


def test_user_level_pooling_is_wider_than_pair_level_when_outcomes_repeat_across_seeds() -> None:
    # 40 users whose difference is the same under each of 3 seeds: pooling the 120 user-seed pairs
    # as independent narrows the interval and shrinks p (pseudo-replication); by user it is the one
    # seed's comparison again
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(40)]
    diffs = rng.normal(0.02, 0.1, size=40)
    seeds = [(users, diffs)] * 3
    by_user = user_level_difference(seeds)
    by_pair = paired_difference(np.concatenate([diffs] * 3), np.zeros(120))
    one_seed = paired_difference(diffs, np.zeros(40))
    assert by_user.n == 40 and by_pair.n == 120
    assert by_user.mean_diff == pytest.approx(by_pair.mean_diff)
    assert (by_user.low, by_user.high, by_user.p_value) == pytest.approx(
        (one_seed.low, one_seed.high, one_seed.p_value)
    )
    assert by_user.high - by_user.low > 1.5 * (by_pair.high - by_pair.low)
    assert by_user.p_value > by_pair.p_value


def test_user_mean_differences_average_each_user_over_the_seeds_that_hold_it() -> None:
    ids, means = user_mean_differences([(["a", "b"], [1.0, 0.0]), (["b", "c"], [1.0, -1.0]), (["a"], [0.0])])
    assert ids == ["a", "b", "c"] and means.tolist() == [0.5, 0.5, -1.0]
    # a user's several test windows in one seed are averaged first, then the seeds
    ids, means = user_mean_differences([(["a", "a", "b"], [1.0, 0.0, 2.0]), (["a"], [1.0])])
    assert ids == ["a", "b"] and means.tolist() == [0.75, 2.0]


def test_choose_on_valid_keeps_each_configurations_best_learning_rate() -> None:
    def method(label: str, *valid: float) -> MethodRuns:
        runs = {s: SimpleNamespace(summary={"valid": {"ndcg@10": v}}) for s, v in enumerate(valid)}
        return MethodRuns(label, "lml", runs)  # type: ignore[arg-type]

    methods = [
        method("loss.name=lml, train.lr=0.0001", 0.04, 0.06),
        method("loss.name=lml, train.lr=0.001", 0.03, 0.05),
        method("loss.name=msl, train.lr=0.0001", 0.01, 0.01),
        method("loss.name=msl, train.lr=0.001", 0.02, 0.01),
        method("stage 1", 0.01),
    ]
    kept, lines = choose_on_valid(methods, "train.lr", 10)
    assert [m.label for m in kept] == ["loss.name=lml, train.lr=0.0001", "loss.name=msl, train.lr=0.001", "stage 1"]
    assert (
        lines[0] == "- loss.name=lml: train.lr=0.0001 (valid NDCG@10 train.lr=0.0001: 0.0500; train.lr=0.001: 0.0400)"
    )


# ---------------------------------------------------------------- stage 1 and the links


def _two_stage(tmp_path: Path, **sweep: object) -> Config:
    stage1_file = tmp_path / "stage1.yaml"
    stage1_file.write_text(
        yaml.safe_dump({"output_dir": "elsewhere", "sweep": {"grid": {"loss.name": ["lml", "msl"], "train.seed": [7]}}})
    )
    return Config.model_validate(
        {
            "output_dir": str(tmp_path / "s2"),
            "data": {"train_sample": 50},
            "model": {"name": "hf", "path": "{stage1}/model", "reference_path": "{stage1}/model"},
            "sweep": {
                "stage1": str(stage1_file),
                "stage1_grid": {"loss.name": ["lml"]},
                "grid": {"loss.name": ["lml", "msl"], "train.seed": [1, 2]},
                **sweep,
            },
        }
    )


def test_stage_one_takes_the_seeds_the_filter_and_the_command_lines_overrides(tmp_path: Path) -> None:
    cfg = _two_stage(tmp_path)
    first = stage_one(cfg, ["data.train_sample=50", "sweep.grid.train.seed=[1,2]", "output_dir=x", "--train.lr=0.5"])
    assert first is not None
    assert first.cfg.output_dir == str(tmp_path / "s2" / "stage1")
    assert first.cfg.data.train_sample == 50 and first.cfg.train.lr == 0.5  # the command line's, both stages
    assert first.cfg.sweep.grid == {"loss.name": ["lml"], "train.seed": [1, 2]}
    assert first.point_of_seed == {1: "loss.name=lml__train.seed=1", 2: "loss.name=lml__train.seed=2"}
    point = first.link(Config.model_validate({**cfg.model_dump(), "sweep": {}, "train": {"seed": 2}}))
    linked = str(tmp_path / "s2" / "stage1" / "loss.name=lml__train.seed=2" / "model")
    assert point.model.path == point.model.reference_path == linked


def test_stage_one_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one stage-1 point"):
        stage_one(_two_stage(tmp_path, stage1_grid={}))  # LML and MSL for each seed: which one?
    unlinked = _two_stage(tmp_path).model_dump()
    unlinked["model"]["path"] = "runs/x/model"
    with pytest.raises(ConfigError, match=r"model.path does not hold \{stage1\}"):
        stage_one(Config.model_validate(unlinked))
    no_stage = _two_stage(tmp_path).model_dump()
    no_stage["sweep"]["stage1"] = None
    with pytest.raises(ConfigError, match=r"model.path, model.reference_path holds \{stage1\} but sweep.stage1"):
        stage_one(Config.model_validate(no_stage))


def test_a_two_stage_sweep_trains_stage_one_first_and_starts_each_point_from_its_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[Path, str | None, int | None]] = []

    def fake_point(cfg: Config, out: Path) -> None:
        ran.append((out, cfg.model.path, cfg.data.train_sample))
        write_summary(out, 0.1)
        (out / "analysis").mkdir(parents=True, exist_ok=True)
        (out / "analysis" / "analysis.json").write_text("{}")

    monkeypatch.setattr(pipeline, "run_point", fake_point)
    monkeypatch.setattr(pipeline, "resolve_prepared", lambda cfg, folder: folder)
    monkeypatch.setattr(pipeline, "report", lambda folder: folder)
    cfg = _two_stage(tmp_path)
    pipeline.sweep(cfg, ["data.train_sample=50"])
    stage1 = tmp_path / "s2" / "stage1"
    assert [r[0] for r in ran[:2]] == [stage1 / "loss.name=lml__train.seed=1", stage1 / "loss.name=lml__train.seed=2"]
    assert all(sample == 50 for _, _, sample in ran)  # the override reached both stages
    second = {out.name: path for out, path, _ in ran[2:]}
    assert second == {
        f"loss.name={m}__train.seed={s}": str(stage1 / f"loss.name=lml__train.seed={s}" / "model")
        for m in ("lml", "msl")
        for s in (1, 2)
    }
    saved = yaml.safe_load((tmp_path / "s2" / "point_configs" / "loss.name=msl__train.seed=2.yaml").read_text())
    assert saved["model"]["reference_path"] == str(stage1 / "loss.name=lml__train.seed=2" / "model")
    assert (stage1 / "results.csv").is_file() and (tmp_path / "s2" / "results.csv").is_file()

    ran.clear()
    pipeline.sweep(cfg, ["data.train_sample=50"])  # restartable: everything is done
    assert ran == []
    # a stage-2 point whose stage-1 point is missing (e.g. another process died on it) runs it first
    (stage1 / "loss.name=lml__train.seed=2" / "summary.json").unlink()
    (tmp_path / "s2" / "loss.name=msl__train.seed=2" / "summary.json").unlink()
    first = stage_one(cfg)
    assert first is not None
    first.wait_for(2, fake_point, pipeline.point_finished)
    assert [r[0] for r in ran] == [stage1 / "loss.name=lml__train.seed=2"]


def test_a_two_stage_report_compares_each_method_at_its_chosen_rate_with_continue_lml_and_stage_one(
    tmp_path: Path,
) -> None:
    # stage 1 hits users 0-3, continue-LML 0-7 (at lr 1e-4, its better rate on valid), MSL 0-11 at
    # lr 1e-3 (better on valid) and nobody at 1e-4; 16 users, seeds 1 and 2
    hits = {("lml", 1e-4): 8, ("lml", 1e-3): 2, ("msl", 1e-4): 0, ("msl", 1e-3): 12}
    valid = {("lml", 1e-4): 0.3, ("lml", 1e-3): 0.1, ("msl", 1e-4): 0.1, ("msl", 1e-3): 0.2}

    def fake_point(cfg: Config, out: Path) -> None:
        key = (cfg.loss.name, cfg.train.lr)
        write_run(out, [f"loss.name={cfg.loss.name}", f"train.lr={cfg.train.lr}", f"train.seed={cfg.train.seed}"])
        summary = json.loads((out / "summary.json").read_text())
        summary["valid"]["ndcg@10"] = valid.get(key, 0.0)
        (out / "summary.json").write_text(json.dumps(summary))
        ranks = [0 if i < hits.get(key, 4) else None for i in range(16)]
        write_jsonl(
            out / "test_predictions.jsonl",
            [{"epoch": 3, "user_id": f"u{i}", "target_rank": r} for i, r in enumerate(ranks)],
        )

    sweep = tmp_path / "s2"
    grid = {"train.seed": [1, 2]}
    run_sweep(Config.model_validate({"output_dir": str(sweep / "stage1"), "sweep": {"grid": grid}}), fake_point)
    grid = {"loss.name": ["lml", "msl"], "train.lr": [1e-4, 1e-3], **grid}
    run_sweep(Config.model_validate({"output_dir": str(sweep), "sweep": {"grid": grid}}), fake_point)
    text = report(sweep).read_text()
    control = "continue-LML: loss.name=lml, train.lr=0.0001"
    assert f"every method against the control {control} and against stage 1 (2 run(s) in stage1/)" in text
    assert "- loss.name=msl: train.lr=0.001 (valid NDCG@10 train.lr=0.0001: 0.1000; train.lr=0.001: 0.2000)" in text
    compared = re.findall(r"\*\*([^*]+) vs ([^*]+)\*\*: pooled, over 2 seed\(s\) \(16 users\)", text)
    stage1 = "stage 1 (2 run(s) in stage1/)"
    assert compared == [
        ("loss.name=msl, train.lr=0.001", control),  # (no prepared data here: no most-popular list)
        (control, stage1),
        ("loss.name=msl, train.lr=0.001", stage1),
    ], compared
    assert "| stage1/train.seed=1 |" in text  # stage 1's runs in the results table too
    # every user's outcome repeats across the two seeds: pooling user-seed pairs counts each user
    # twice, so its interval is about sqrt(2) narrower than the by-user one the report uses
    row = next(line for line in text.splitlines() if line.startswith(f"| loss.name=msl, train.lr=0.001 vs {control} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].endswith("n = 16") and cells[2].endswith("n = 32"), cells
    assert 1.3 < float(cells[3]) < 1.6, cells
    assert "stage1 is not a point" not in text


# ---------------------------------------------------------------- the contract command


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("BEAR_DS_LONG_TESTS") != "1",
    reason="the literal contract command trains 17 points (about 10 CPU-minutes); set BEAR_DS_LONG_TESTS=1 to "
    "run it. test_sweep_configs runs the same config, both stages, at its tiny budget in every run",
)
def test_ml100k_finetune_contract_command_runs_both_stages_and_reports_against_continue_lml(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    bear_ds = [sys.executable, "-m", "bear_ds.cli"]
    command = [
        *bear_ds, "sweep", "--config", "configs/sweeps/ml100k_finetune.yaml", "sweep.grid.train.seed=[1]",
        "data.train_sample=2000", "train.max_steps=30", "train.eval_max_users=50", "analyze.max_users=40",
        f"output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([*bear_ds, "report", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (out / "results.md").read_text()
    assert (out / "stage1" / "loss.name=lml__train.seed=1" / "analysis" / "analysis.json").is_file()
    control = re.search(r"against the control (continue-LML: loss.name=lml, train.lr=[0-9.e-]+) and", text)
    assert control, text
    methods = [
        "loss.name=msl",
        "loss.name=bear, loss.form=reweight",
        "loss.name=bear, loss.form=regularizer",
        "loss.name=beamsim",
        "loss.name=sdpo, loss.negative_source=random, loss.num_negatives=1",
        "loss.name=sdpo, loss.negative_source=random, loss.num_negatives=3",
        "loss.name=sdpo, loss.negative_source=self, train.self_play=True",
    ]
    for method in methods:
        line = re.search(
            rf"\*\*{re.escape(method)}[^*]* vs {re.escape(control.group(1))}\*\*: pooled, over 1 seed\(s\) "
            r"\(943 users\): NDCG@10 difference [+-][0-9.]+ \(95% interval \[[+-][0-9.]+, [+-][0-9.]+\], p = [0-9.e-]+\)",
            text,
        )
        assert line, (method, text)
