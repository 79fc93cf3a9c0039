"""Every YAML under configs/ (recursively, including files added later) validates against the
schema; sweep files also expand into valid points, and each runs as its header documents it
(`bear-ds sweep --config FILE`) on a tiny budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bear_ds import cli
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


@pytest.mark.slow
def test_ml100k_evidence_sweep_runs_at_a_tiny_budget(tmp_path: Path) -> None:
    # the contract: `bear-ds sweep --config configs/sweeps/ml100k_evidence.yaml` runs the main
    # comparison; here the same file with one seed, 64 training windows and a few users per split
    from bear_ds.pipeline import sweep

    cfg = load_config(
        CONFIGS / "sweeps" / "ml100k_evidence.yaml",
        [
            f"output_dir={tmp_path / 'sweep'}",
            "sweep.grid.train.seed=[1]",
            "data.train_sample=64",
            "train.global_batch=32",
            "train.micro_batch=32",
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
        "loss.name=beamsim__train.seed=1",
    ]
    sweep(cfg)
    text = (tmp_path / "sweep" / "results.md").read_text()
    assert "| most-popular (8 users) |" in text
    others = ("loss.name=msl", "loss.name=bear, loss.form=reweight", "loss.name=bear, loss.form=regularizer")
    for other in (*others, "loss.name=beamsim"):
        assert f"**{other} vs loss.name=lml**: pooled, over 1 seed(s) (8 users): NDCG@10 difference" in text
    # NDCG and HR, pooled (one seed: no separate per-seed line): 5 pairs against LML, 2 BEAR vs MSL
    assert text.count(" p = ") == 2 * 7 and "  - seed 1, one seed" not in text

    # stage 2, ml100k_preference.yaml: DPO from this sweep's LML model, on the same tiny budget
    lml_model = tmp_path / "sweep" / "loss.name=lml__train.seed=1" / "model"
    pref = load_config(
        CONFIGS / "sweeps" / "ml100k_preference.yaml",
        [
            f"output_dir={tmp_path / 'preference'}",
            f"model.path={lml_model}",
            f"model.reference_path={lml_model}",
            "sweep.grid.loss.num_negatives=[1]",
            "data.train_sample=64",
            "train.global_batch=32",
            "train.eval_max_users=8",
            "eval.max_users=8",
            "analyze.max_users=4",
        ],
    )
    sweep(pref)
    _check_points(tmp_path / "preference", 1)
    trained = yaml.safe_load(
        (tmp_path / "preference" / "loss.name=sdpo__train.seed=1__loss.num_negatives=1" / "config.yaml").read_text()
    )
    assert trained["loss"]["name"] == "sdpo" and trained["model"]["path"] == str(lml_model)


# office_smollm2_gpu (SmolLM2-135M, a GPU's budget) runs through benchmarks/gpu_evidence.sh --cpu-smoke in
# tests/test_gpu_evidence.py, with a tiny model in place of SmolLM2
GPU_SWEEP = "office_smollm2_gpu.yaml"
STAGED_SWEEPS = ("ml100k_evidence.yaml", "ml100k_preference.yaml", "demo_preference_sft.yaml", "demo_preference.yaml")
# ml100k_evidence runs in the test above (5 points, with its report, then its stage 2 ml100k_preference);
# demo_preference_sft and its stage 2, demo_preference, run one after the other in the last test below;
# the two-stage sweeps (ml100k_finetune, office_finetune) run here like the others, both stages at the
# tiny budget (tests/test_two_stage.py has ml100k_finetune's literal contract command, opt-in: it takes minutes)
SWEEPS = sorted(p for p in (CONFIGS / "sweeps").glob("*.yaml") if p.name not in (*STAGED_SWEEPS, GPU_SWEEP))
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
def test_each_sweep_config_runs_as_documented(
    path: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(path)
    extra = []
    data_path = str(sweep_base(cfg).data.path or "")
    if data_path.startswith("data/bear/"):  # the paper's data: on this project's machines, ../shared/data
        extra.append(f"data.path={request.getfixturevalue('shared_data') / Path(data_path).name}")
    out = tmp_path / path.stem
    _run_sweep(path, [f"output_dir={out}", *TINY, *_two_points(cfg), *extra], cwd=REPO, monkeypatch=monkeypatch)
    _check_points(out, len(expand_grid(load_config(path, _two_points(cfg)).sweep, sweep_base(cfg))))
    if cfg.sweep.stage1 is not None:  # most-popular from stage 1's training windows, not stage 2's sample
        assert "most-popular (3 users, stage 1's training windows)" in (out / "results.md").read_text()


def _run_sweep(path: Path, overrides: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bear-ds sweep --config PATH OVERRIDES` from `cwd`, in this process: starting an interpreter
    costs more than a tiny point (test_entry_points.py starts `python -m bear_ds sweep` as a process);
    each point leaves its process group itself, as in a sweep process."""
    monkeypatch.chdir(cwd)
    assert cli.main(["sweep", "--config", str(path), *overrides]) == 0


def _check_points(out: Path, points: int) -> None:
    assert points >= 1
    results = (out / "results.csv").read_text().splitlines()
    assert len(results) == 1 + points  # header + every point
    assert (out / "results.md").is_file()
    assert len(list(out.glob("*/analysis/analysis.json"))) == points


@pytest.mark.slow
def test_the_two_stage_preference_sweeps_run_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # demo_preference.yaml names stage 1's model by a path relative to the working directory, as its
    # header says: run both from one folder, stage 1 into its default output_dir
    sft = load_config(CONFIGS / "sweeps" / "demo_preference_sft.yaml")
    short = ["data.max_history=3"]  # prompts within the tiny model's context with its 300-token BPE
    stage_1 = [*TINY, *short, *_two_points(sft)]
    _run_sweep(CONFIGS / "sweeps" / "demo_preference_sft.yaml", stage_1, cwd=tmp_path, monkeypatch=monkeypatch)
    _check_points(tmp_path / sft.output_dir, 1)  # its grid has one value per key
    pref = load_config(CONFIGS / "sweeps" / "demo_preference.yaml")
    out = tmp_path / pref.output_dir
    tiny_pref = [o for o in TINY if not o.startswith(("model.", "tokenizer."))]  # the model is stage 1's
    stage_2 = [*tiny_pref, *short, *_two_points(pref)]
    _run_sweep(CONFIGS / "sweeps" / "demo_preference.yaml", stage_2, cwd=tmp_path, monkeypatch=monkeypatch)
    _check_points(out, 2)
