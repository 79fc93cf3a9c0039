"""One kind of folder per command (bear_ds/folders.py): each command refuses the root, a file, and
another command's folder before writing anything; evaluate/analyze own their folder like train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import folder_snapshot

import bear_ds.training.trainer as trainer_module
from bear_ds.cli import main
from bear_ds.config import load_config, save_config
from bear_ds.errors import NotAFolderError, RunFolderError, RunStateError
from bear_ds.folders import COMMAND_KINDS, check_output_dir, folder_kinds

# what each kind's folder holds directly (as the commands write them)
KIND_FILES = {
    "a prepared data folder": ["train.parquet", "valid.parquet", "test.parquet", "catalog.parquet", "stats.json"],
    "a training run's folder": ["config.yaml", "train_log.jsonl", "epochs.jsonl", "summary.json"],
    "an exported model folder": ["config.json", "model.safetensors", "catalog.json", "config.yaml", "export_info.json"],
    "a sweep folder": ["sweep.yaml", "base.yaml", "points.json", "results.md"],
    "an evaluation output folder": ["predictions.jsonl", "metrics.json", "catalog.json", "config.yaml"],
    "an analysis output folder": ["analysis.jsonl", "analysis.json", "config.yaml"],
    "a demo folder": ["demo.yaml", "results.md", "demo_time.json"],
}


def _make(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True)
    for name in KIND_FILES[kind]:
        (folder / name).write_text(f"{kind}: {name}\n")
    return folder


def test_each_kind_is_told_and_refused_by_every_other_command(tmp_path):
    for i, kind in enumerate(KIND_FILES):
        folder = _make(tmp_path / f"k{i}", kind)
        assert list(folder_kinds(folder)) == [kind]
        for command, own in COMMAND_KINDS.items():
            if own == kind:
                assert check_output_dir(folder, command) == folder
            else:
                with pytest.raises(RunFolderError, match=rf"output_dir {folder} is {kind} \(it holds "):
                    check_output_dir(folder, command)
    # a Hugging Face model folder without export_info.json is a model too; new and empty folders are no kind
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_text("")
    assert list(folder_kinds(hf)) == ["an exported model folder"]
    (tmp_path / "empty").mkdir()
    for command in COMMAND_KINDS:
        check_output_dir(tmp_path / "empty", command)
        check_output_dir(tmp_path / "new" / "sub", command)
    # nesting: a run folder's model/ and checkpoints/ do not make the sweep folder above them a run
    sweep = _make(tmp_path / "sweep", "a sweep folder")
    _make(sweep / "point", "a training run's folder")
    _make(sweep / "data", "a prepared data folder")
    check_output_dir(sweep, "sweep")
    check_output_dir(sweep / "point", "train")


def test_root_and_files_are_refused_before_anything_is_created(tmp_path):
    for command in COMMAND_KINDS:
        with pytest.raises(RunFolderError, match="output_dir / is the filesystem root"):
            check_output_dir("/", command)
        with pytest.raises(RunFolderError, match="filesystem root"):
            check_output_dir("/tmp/..", command)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotAFolderError, match=rf"output_dir {blocker} is not writable: it is a file"):
        check_output_dir(blocker, "train")
    with pytest.raises(NotAFolderError, match=rf"it is under {blocker}, which is a file"):
        check_output_dir(blocker / "a" / "b", "evaluate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


class _NoWrites:
    """Stands in for the run-folder lock: the first thing train writes (so a test can never write into /)."""

    def __init__(self, folder):
        raise AssertionError(f"train took the lock of {folder}: it would write there")


def test_train_refuses_the_root_a_file_and_other_commands_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_module, "RunFolderLock", _NoWrites)
    args = ["train", f"data.path={tmp_path / 'nodata'}", "model.name=tiny"]
    assert main([*args, "output_dir=/"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "bear-ds train: error: output_dir / is the filesystem root: train writes only into a folder of its own"
    )
    (tmp_path / "file").write_text("x")
    assert main([*args, f"output_dir={tmp_path / 'file'}"]) == 2
    err = capsys.readouterr().err
    assert "is not writable: it is a file" in err and err.count("\n") == 1
    assert main([*args, f"output_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert "which is a file" in capsys.readouterr().err
    sweep = _make(tmp_path / "sweep", "a sweep folder")
    before = folder_snapshot(sweep)
    assert main([*args, f"output_dir={sweep}"]) == 2
    assert f"output_dir {sweep} is a sweep folder (it holds sweep.yaml, points.json)" in capsys.readouterr().err
    assert folder_snapshot(sweep) == before and (tmp_path / "file").read_text() == "x"


def test_sweep_prepare_and_demo_refuse_other_commands_folders(tmp_path, capsys):
    run = _make(tmp_path / "run", "a training run's folder")
    before = folder_snapshot(run)
    assert main(["sweep", f"output_dir={run}", "sweep.grid={train.seed: [1, 2]}"]) == 2
    assert f"output_dir {run} is a training run's folder" in capsys.readouterr().err
    assert main(["demo", f"output_dir={run}"]) == 2
    assert "is a training run's folder" in capsys.readouterr().err
    evaluation = _make(tmp_path / "eval", "an evaluation output folder")
    assert main(["prepare", f"output_dir={evaluation}"]) == 2
    assert "is an evaluation output folder" in capsys.readouterr().err
    assert main(["prepare", "output_dir=/"]) == 2
    assert "filesystem root" in capsys.readouterr().err
    assert folder_snapshot(run) == before and not (run / ".claims").exists()


# ---------------------------------------------------------------------------------------- finished runs
def _finished_run(folder: Path, *overrides: str) -> tuple[Path, list[str]]:
    """A training run's folder as a finished run leaves it after `rm -rf OUT/checkpoints`."""
    args = [f"output_dir={folder}", "loss.name=lml", "train.max_steps=2", *overrides]
    folder.mkdir(parents=True)
    save_config(load_config(None, args), folder)
    (folder / "summary.json").write_text(json.dumps({"steps": 2, "model": {"path": "model"}}))
    (folder / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (folder / "model").mkdir()
    (folder / "model" / "export_info.json").write_text('{"step": 2}')
    return folder, args


def test_a_finished_run_without_checkpoints_is_never_mixed_with_another(tmp_path, capsys):
    run, args = _finished_run(tmp_path / "run")
    before = folder_snapshot(run)
    # another method into it, with or without resume: refused, nothing changed
    assert main(["train", *args, "loss.name=msl"]) == 2
    err = capsys.readouterr().err
    assert f"{run} holds a finished training run (summary.json) of an earlier run: add train.resume=auto" in err
    assert main(["train", *args, "loss.name=msl", "train.resume=auto"]) == 2
    assert "was trained with another config (loss.name: 'lml' -> 'msl')" in capsys.readouterr().err
    # more steps: there is no checkpoint to continue from
    assert main(["train", *args, "train.max_steps=4", "train.resume=auto"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert folder_snapshot(run) == before
    # the same run with resume=auto: finished already, said so, nothing trained or rewritten
    assert main(["train", *args, "train.resume=auto"]) == 0
    assert folder_snapshot(run) == before


def test_a_finished_run_is_resumed_only_from_a_checkpoint(tmp_path):
    from bear_ds.training.run_folder import check_launch, finished_run_summary

    run, args = _finished_run(tmp_path / "run")
    cfg = load_config(None, [*args, "train.resume=auto"])
    assert check_launch(run, cfg, None) == {"train.resume": ("none", "auto")}  # allowed
    assert finished_run_summary(run, None) == {"steps": 2, "model": {"path": "model"}}
    # with a checkpoint the trainer resumes (no step left: it redoes the summary from its logs)
    assert finished_run_summary(run, run / "checkpoints" / "step_2") is None
    # config.yaml of a longer continuation that stopped before its first checkpoint, which was then
    # removed: the summary's 2 steps are not the 3 asked for, and there is nothing to continue from
    longer = load_config(None, [*args, "train.resume=auto", "train.max_steps=3"])
    save_config(longer, run)
    with pytest.raises(RunFolderError, match=r"finished after 2 steps \(summary.json\) and no checkpoint"):
        check_launch(run, longer, None)
    (run / "summary.json").write_text("{not json")
    with pytest.raises(RunStateError, match=r"summary.json cannot be read"):
        finished_run_summary(run, None)
