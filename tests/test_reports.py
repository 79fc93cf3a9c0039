"""report() and results_table() over synthetic run folders: PNGs written and linked, missing
inputs skipped with a reason, never a crash."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from report_fakes import write_jsonl, write_run, write_summary
from train_data import write_prepared

from bear_ds.config import Config
from bear_ds.reports import report, results_table
from bear_ds.reports.evidence import statistics_k
from bear_ds.runs import RunData
from bear_ds.sweeps import run_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def linked_images(results_md: Path) -> dict[str, Path]:
    """{alt text: file} for every Markdown image link (which must be relative), resolved against results.md."""
    links = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", results_md.read_text())
    assert all(not Path(rel).is_absolute() for _, rel in links)
    return {alt: results_md.parent / rel for alt, rel in links}


def demo_folder(tmp_path: Path) -> Path:
    root = tmp_path / "demo"
    write_run(root / "lml", ["loss.name=lml"], test_ndcg10=0.05, pruned_share=0.9)
    write_run(root / "msl", ["loss.name=msl"], test_ndcg10=0.08, pruned_share=0.85)
    write_run(root / "bear", ["loss.name=bear"], test_ndcg10=0.12, pruned_share=0.6)
    (root / "data").mkdir()  # a prepared data folder beside the runs is not a run
    (root / "data" / "config.yaml").write_text("output_dir: x\n")
    return root


def test_report_folder_of_runs_writes_and_links_plots(tmp_path: Path) -> None:
    root = demo_folder(tmp_path)
    out = report(root)
    assert out == root / "results.md"
    images = linked_images(out)
    expected = {"train_loss.png", "frac_outside_topb.png", "valid_ndcg10.png", "pruning.png"}
    assert {p.name for p in images.values()} == expected
    for path in images.values():
        assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000
    text = out.read_text()
    assert "](plots/train_loss.png)" in text  # relative link
    assert "Skipped: not a sweep folder" in text  # NDCG vs lam/xi need a sweep
    # the results table sits above the plots, one row per run, the data folder is not a run
    assert text.index("| run | HR@5") < text.index("## Plots")
    assert "| bear | 0.1200 | 0.2400 | 0.0600 | 0.1200 | 3 | 12.5 | 10.0 | 60.0% |" in text
    assert "| data |" not in text


def test_report_single_run_skips_missing_inputs_with_reason(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", ["loss.name=bear"], with_train_log=False, with_analysis=False)
    out = report(run)
    text = out.read_text()
    assert {p.name for p in linked_images(out).values()} == {"valid_ndcg10.png"}
    assert not (run / "plots" / "train_loss.png").exists() and not (run / "plots" / "pruning.png").exists()
    assert "### Training loss per step\n\nSkipped: no run has 'loss' in train_log.jsonl." in text
    assert "train_log.jsonl does not exist" in text
    assert "Skipped: no run has an analysis.json with 'topb_positives' and 'pruned' counts." in text
    assert "no analysis.json in" in text


def test_report_tolerates_malformed_lines_and_missing_analysis_keys(tmp_path: Path) -> None:
    root = demo_folder(tmp_path)
    with (root / "lml" / "train_log.jsonl").open("a") as handle:
        handle.write('{"step": 13, "loss": 0.3')  # a line cut by a crash
    analysis = root / "msl" / "analysis" / "analysis.json"
    analysis.write_text(json.dumps({"num_beams": 10, "users": 5}))
    text = report(root).read_text()
    assert "train_log.jsonl line 13: invalid JSON" in text
    assert (
        "msl: analysis.json has no valid 'topb_positives' and 'pruned' counts (keys present: num_beams, users)" in text
    )
    assert "msl: analysis.json lacks topb_positives, pruned, pruned_share" in text
    assert (root / "plots" / "pruning.png").is_file()  # lml and bear still have it


def test_report_skips_bad_prediction_rows_with_a_note_naming_file_line_and_value(tmp_path: Path) -> None:
    # ranks are 0-based or null: -1 and 3.7 are not ranks, nor a rank past the end of the returned list
    root = demo_folder(tmp_path)
    rows = [{"epoch": 3, "user_id": f"u{i}", "target_rank": i % 2 or None} for i in range(6)]
    bad_rows = {"lml": {2: {"target_rank": -1}, 4: {"epoch": [3]}}, "bear": {3: {"target_rank": 3.7}}}
    for name, bad in bad_rows.items():
        write_jsonl(root / name / "test_predictions.jsonl", [{**r, **bad.get(i + 1, {})} for i, r in enumerate(rows)])
    evaluated = [{"user_id": f"u{i}", "predictions": ["a", "b"], "target_rank": 1} for i in range(6)]
    evaluated[4] = {**evaluated[4], "target_rank": 2}
    write_jsonl(root / "msl" / "eval" / "predictions.jsonl", evaluated)
    text = report(root).read_text()
    assert "lml/test_predictions.jsonl line 2: target_rank -1 is not null or an integer >= 0" in text
    assert "bear/test_predictions.jsonl line 3: target_rank 3.7 is not null or an integer >= 0" in text
    assert "lml/test_predictions.jsonl line 4: epoch [3] is not an integer" in text
    assert "msl/eval/predictions.jsonl line 5: target_rank 2 is past the end of its 2 predictions" in text
    # no run's ranks are used, so no comparison is made on them; the tables from summary.json remain
    assert "bear vs msl: no seed with per-user test ranks for both" in text
    assert "| bear | 0.1200 | 0.2400 | 0.0600 | 0.1200 | 3 | 12.5 | 10.0 | 60.0% |" in text


def test_report_sweep_plots_metric_vs_lam(tmp_path: Path) -> None:
    grid = {"loss.name": ["lml", "bear"], "loss.lam": [0.1, 0.5], "train.seed": [1, 2]}
    cfg = Config.model_validate(
        {
            "output_dir": str(tmp_path / "sweep"),
            "sweep": {"grid": grid, "only_when": {"loss.lam": {"loss.name": ["bear"]}}},
        }
    )

    def fake_point(point_cfg: Config, out: Path) -> None:
        value = 0.05 if point_cfg.loss.name == "lml" else point_cfg.loss.lam / 5 + 0.01 * point_cfg.train.seed
        write_run(
            out,
            [
                f"loss.name={point_cfg.loss.name}",
                f"loss.lam={point_cfg.loss.lam}",
                f"train.seed={point_cfg.train.seed}",
            ],
            test_ndcg10=value,
        )

    run_sweep(cfg, fake_point)
    out = report(tmp_path / "sweep")
    text = out.read_text()
    names = {p.name for p in linked_images(out).values()}
    assert "ndcg10_vs_lam.png" in names and (tmp_path / "sweep" / "plots" / "ndcg10_vs_lam.png").is_file()
    assert "Skipped: loss.xi takes fewer than 2 values among done BEAR points." in text
    assert "## Sweep summary" in text and "| bear | 0.5 | 2 |" in text
    # per-step curves are averaged over seeds: one line per configuration
    assert "train_loss.png" in names


def test_results_table_values_and_missing_notes(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", ["loss.name=bear"], test_ndcg10=0.1, pruned_share=0.83)
    b = tmp_path / "b"
    write_summary(b, 0.2)  # no analysis, no config
    table = results_table({"BEAR": a, "other": b})
    lines = table.splitlines()
    assert (
        lines[0]
        == "| run | HR@5 | HR@10 | NDCG@5 | NDCG@10 | selected epoch | train time (s) | optimiser steps (s) | pruned share |"
    )
    assert lines[2] == "| BEAR | 0.1000 | 0.2000 | 0.0500 | 0.1000 | 3 | 12.5 | 10.0 | 83.0% |"
    assert lines[3] == "| other | 0.2000 | 0.4000 | 0.1000 | 0.2000 | 2 | 12.5 | 10.0 | – |"
    assert any(line.startswith("- other: pruned share unknown (no analysis.json in") for line in lines)


def test_report_rejects_a_folder_without_runs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no run"):
        report(tmp_path)


def test_report_sweep_with_no_finished_point(tmp_path: Path) -> None:
    cfg = Config.model_validate(
        {"output_dir": str(tmp_path / "sweep"), "sweep": {"grid": {"train.seed": [1, 2]}, "mode": "scripts"}}
    )
    run_sweep(cfg, lambda point_cfg, out: None)
    text = report(tmp_path / "sweep").read_text()
    assert "No point is done yet." in text and "No finished run." in text
    assert "point train.seed=1: not done (train.seed=1/summary.json does not exist)" in text
    assert linked_images(tmp_path / "sweep" / "results.md") == {}
    assert not (tmp_path / "sweep" / "plots").exists()


def test_report_sweep_has_most_popular_row_and_paired_comparisons(tmp_path: Path) -> None:
    prepared = write_prepared(tmp_path / "data")  # 16 test users, targets among i0..i3 (the train targets)
    # per-user test ranks of the selected epoch: LML never hits, MSL hits one user in four, BEAR 12 of 16
    hits = {"lml": lambda i: False, "msl": lambda i: i % 4 == 0, "bear": lambda i: i < 12}
    cfg = Config.model_validate(
        {
            "output_dir": str(tmp_path / "sweep"),
            "sweep": {"grid": {"loss.name": ["lml", "msl", "bear"], "train.seed": [1, 2]}},
        }
    )

    def fake_point(point_cfg: Config, out: Path) -> None:
        name, seed = point_cfg.loss.name, point_cfg.train.seed
        write_run(out, [f"loss.name={name}", f"train.seed={seed}", f"data.path={prepared}", "data.source=prepared"])
        users = [f"u5_{r}" for r in range(16)]
        write_jsonl(
            out / "test_predictions.jsonl",
            [{"epoch": 3, "user_id": u, "target_rank": 0 if hits[name](i) else None} for i, u in enumerate(users)],
        )
        items = [{"item_id": f"i{k}", "title": f"t{k}", "group": k, "token_ids": [k, 99]} for k in range(20)]
        (out / "model").mkdir()
        (out / "model" / "catalog.json").write_text(json.dumps({"items": items}))

    run_sweep(cfg, fake_point)
    text = report(tmp_path / "sweep").read_text()
    # the reference row: every test target is one of the four items the training targets are
    assert re.search(r"\| most-popular \(16 users\) \| [0-9.]+ \| 1\.0000 \| [0-9.]+ \| [0-9.]+ \|", text), text
    pairs = re.findall(
        r"\*\*(loss.name=\w+|most-popular) vs (loss.name=\w+)\*\*: pooled, over 2 seed\(s\) \(16 users\): "
        r"NDCG@10 difference ([+-][0-9.]+) \(95% interval \[([+-][0-9.]+), ([+-][0-9.]+)\], p = ([0-9.e-]+)\)",
        text,
    )
    found = {(a, b): (float(d), float(lo), float(hi), float(p)) for a, b, d, lo, hi, p in pairs}
    assert set(found) == {
        ("loss.name=msl", "loss.name=lml"),
        ("loss.name=bear", "loss.name=lml"),
        ("most-popular", "loss.name=lml"),
        ("loss.name=bear", "loss.name=msl"),
    }
    diff, low, high, p = found[("loss.name=bear", "loss.name=lml")]
    assert diff == pytest.approx(0.75, abs=1e-4) and 0 < low < diff < high <= 1 and p < 0.001
    assert "distinguishable from noise: loss.name=msl vs loss.name=lml" in text
    assert text.count("  - seed 1,") == text.count("  - seed 2,") == 4  # each pair per seed too
    assert text.count("  - seed level (each seed's mean difference): NDCG@10 ") == 4  # and the seeds' spread
    # two seeds pooled, Wilson interval; the positives and the beam HR@10 beside the share
    assert re.search(r"\| 32/40 / 32/40 \| 80 \| [0-9.]+ \| 64/80 = 80.0% \[70.0%, 87.3%\] \|", text), text


def test_report_statistics_are_at_the_k_the_runs_evaluated(tmp_path: Path) -> None:
    # eval.num_beams=5: the runs have no @10 metrics and select epochs on ndcg@5, so the statistics
    # (seed table, most-popular list, paired differences) are at K = 5 and say so
    prepared = write_prepared(tmp_path / "data")
    hits = {"lml": lambda i: i < 4, "bear": lambda i: i < 12}
    cfg = Config.model_validate(
        {
            "output_dir": str(tmp_path / "sweep"),
            "eval": {"num_beams": 5},
            "train": {"select_metric": "ndcg@5"},
            "sweep": {"grid": {"loss.name": ["lml", "bear"], "train.seed": [1, 2]}},
        }
    )

    def fake_point(point_cfg: Config, out: Path) -> None:
        name, seed = point_cfg.loss.name, point_cfg.train.seed
        write_run(out, [f"loss.name={name}", f"train.seed={seed}", f"data.path={prepared}", "data.source=prepared"])
        summary = json.loads((out / "summary.json").read_text())
        for split in ("valid", "test"):
            summary[split] = {m: v for m, v in summary[split].items() if int(m.split("@")[1]) <= 5}
        summary["select_metric"] = "ndcg@5"
        (out / "summary.json").write_text(json.dumps(summary))
        write_jsonl(
            out / "test_predictions.jsonl",
            [{"epoch": 3, "user_id": f"u5_{i}", "target_rank": i % 5 if hits[name](i) else None} for i in range(16)],
        )
        items = [{"item_id": f"i{k}", "title": f"t{k}", "group": k, "token_ids": [k, 99]} for k in range(20)]
        (out / "model").mkdir()
        (out / "model" / "catalog.json").write_text(json.dumps({"items": items}))

    run_sweep(cfg, fake_point)
    text = report(tmp_path / "sweep").read_text()
    statistics = text[text.index("## Statistics") : text.index("## Plots")]
    assert "@10" not in statistics and "top-10" not in statistics
    assert "| method | seeds | test NDCG@5 mean ± std [95% t interval] | test HR@5 mean" in statistics
    assert re.search(r"\| loss.name=bear \| 2 \| 0\.\d{4} ± 0\.\d{4} \[", statistics), statistics
    assert "| most-popular (top-5 by training frequency) | – | 0." in statistics
    # bear hits users 0-11 at rank i % 5, lml users 0-3: the mean NDCG@5 difference over 16 users
    ndcg5 = sum(1 / math.log2(i % 5 + 2) for i in range(4, 12)) / 16
    assert (
        f"**loss.name=bear vs loss.name=lml**: pooled, over 2 seed(s) (16 users): NDCG@5 difference +{ndcg5:.4f}"
        in statistics
    )
    assert "In plain words (pooled over seeds, NDCG@5)" in statistics


def test_statistics_k_is_the_selection_metrics_else_the_largest_k_every_run_evaluated() -> None:
    def run(name: str, ks: list[int], select: str | None, beams: int = 20) -> RunData:
        loaded = RunData(name=name, folder=Path(name), config={"eval": {"num_beams": beams}})
        loaded.summary = {"select_metric": select, "test": {f"ndcg@{k}": 0.1 for k in ks}}
        return loaded

    assert statistics_k([run("a", [1, 5, 10], "ndcg@10"), run("b", [1, 5, 10], "hr@10")]) == (10, None)
    k, why = statistics_k([run("a", [1, 5, 10], "ndcg@10"), run("b", [1, 5], "ndcg@5", beams=5)])
    assert k == 5 and why is not None and "different K (5, 10)" in why
    # a K above eval.num_beams is not measured (beam search returns num_beams items)
    k, why = statistics_k([run("a", [1, 5, 10], None, beams=5)])
    assert k == 5 and why is not None and "largest K every run evaluated" in why
    assert statistics_k([RunData(name="x", folder=Path("x"))]) == (10, None)


def test_report_of_a_one_method_ablation_compares_each_configuration_with_the_first(tmp_path: Path) -> None:
    # BEAR over lam, no LML or MSL in the sweep: lam 0.5 and most-popular are compared with lam 0.1
    prepared = write_prepared(tmp_path / "data")
    hits = {0.1: lambda i: i < 2, 0.5: lambda i: i < 14}
    cfg = Config.model_validate(
        {
            "output_dir": str(tmp_path / "sweep"),
            "sweep": {"grid": {"loss.name": ["bear"], "loss.lam": [0.1, 0.5], "train.seed": [1]}},
        }
    )

    def fake_point(point_cfg: Config, out: Path) -> None:
        lam = point_cfg.loss.lam
        write_run(
            out, ["loss.name=bear", f"loss.lam={lam}", "train.seed=1", f"data.path={prepared}", "data.source=prepared"]
        )
        write_jsonl(
            out / "test_predictions.jsonl",
            [{"epoch": 3, "user_id": f"u5_{i}", "target_rank": 0 if hits[lam](i) else None} for i in range(16)],
        )
        items = [{"item_id": f"i{k}", "title": f"t{k}", "group": k, "token_ids": [k, 99]} for k in range(20)]
        (out / "model").mkdir()
        (out / "model" / "catalog.json").write_text(json.dumps({"items": items}))

    run_sweep(cfg, fake_point)
    text = report(tmp_path / "sweep").read_text()
    compared = re.findall(r"\*\*([^*]+) vs ([^*]+)\*\*: pooled", text)
    assert compared == [
        ("loss.name=bear, loss.lam=0.5", "loss.name=bear, loss.lam=0.1"),
        ("most-popular", "loss.name=bear, loss.lam=0.1"),
    ], compared
    assert re.search(
        r"lam=0.5 vs loss.name=bear, loss.lam=0.1\*\*: pooled, over 1 seed\(s\) \(16 users\): NDCG@10 difference \+0\.7500",
        text,
    )


def _analysis_row(user: str, rank: int, pruned: bool, **extra) -> dict:
    row = {"user_id": user, "target": f"Title {user}", "global_rank": rank, "in_top_b": rank < 10}
    row.update(pruned=pruned, target_logp=-3.0 - rank)
    if pruned:
        row.update(
            prune_reason="pruned", pruned_step=1, pruned_prefix=f"Tit{user}", pruned_prefix_logp=-2.5 - rank,
            beam_cutoff_prefix="Other", beam_cutoff_logp=-1.25,
        )  # fmt: skip
    row.update(extra)
    return row


def test_report_shows_pruned_positives_like_figure_1_from_analysis_jsonl(tmp_path: Path) -> None:
    # per method, its two best-ranked targets pruned at a live step, with the drop step, the
    # prefix's log p and the B-th surviving prefix; a malformed row is reported with its line
    cfg = Config.model_validate(
        {"output_dir": str(tmp_path / "sweep"), "sweep": {"grid": {"loss.name": ["lml", "bear"], "train.seed": [1]}}}
    )

    def fake_point(point_cfg: Config, out: Path) -> None:
        write_run(out, [f"loss.name={point_cfg.loss.name}", "train.seed=1"])
        if point_cfg.loss.name == "lml":
            rows = [
                _analysis_row("u1", 4, True),
                _analysis_row("u2", 0, False),
                _analysis_row("u3", 2, True),
                _analysis_row("u4", 0, True, prune_reason="search_stopped", beam_cutoff_logp=None),
                _analysis_row("u5", 1, True, beam_cutoff_logp=None),  # malformed: a live-step prune needs it
                _analysis_row("u6", 7, True),
            ]
        else:
            rows = [_analysis_row("u1", 0, False)]
        write_jsonl(out / "analysis" / "analysis.jsonl", rows)

    run_sweep(cfg, fake_point)
    text = report(tmp_path / "sweep").read_text()
    section = text[text.index("### Pruned top-B positives, as in the paper's Figure 1") :]
    lml = section[section.index("**loss.name=lml**") : section.index("**loss.name=bear**")]
    examples = re.findall(r"user (u\d): target \"Title u\d\", rank (\d+) of the catalog", lml)
    assert examples == [("u3", "3"), ("u1", "5")]  # best-ranked first, 1-based ranks; u4 stopped, u5 malformed
    assert (
        'dropped its prefix "Titu3" at decoding step 2 (log p -4.50), beaten by the lowest of the 10 surviving '
        'prefixes "Other" (log p -1.25)'
    ) in lml
    assert "**loss.name=bear**: none to show (no top-B positive was pruned at a live step)" in section
    assert re.search(r"analysis\.jsonl line 5: beam_cutoff_logp null is not a finite number", text)
