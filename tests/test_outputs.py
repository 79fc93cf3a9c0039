"""All-or-nothing outputs: the atomic-write helper, and evaluate/analyze checking their folder
first: never another command's folder, never one another live evaluate holds."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import folder_snapshot, write_model_folder, write_prepared

import bear_ds.evaluation.evaluate as evaluate_module
from bear_ds.cli import main
from bear_ds.config import load_config
from bear_ds.locks import RunFolderLock
from bear_ds.outputs import check_writable_folder, open_atomic, write_json_atomic, write_text_atomic


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "predictions.jsonl"
    target.write_text("old complete\n")
    with pytest.raises(KeyboardInterrupt), open_atomic(target) as fh:
        fh.write("new, half")
        raise KeyboardInterrupt  # a kill mid-write
    assert target.read_text() == "old complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]
    write_json_atomic(target.with_name("m.json"), {"hr@1": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"hr@1": 0.5}
    assert write_text_atomic(tmp_path / "sub" / "x.md", "x").read_text() == "x"  # creates the folder


def test_unwritable_output_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"output folder .*file/out is not writable"):
        check_writable_folder(blocker / "out")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        check_writable_folder(blocker)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    write_model_folder(root / "model", write_prepared(root / "data", num_items=12, num_users=5))
    return root


def _args(root, out, model=None):
    return [
        f"output_dir={out}", f"data.path={root}/data", "data.source=prepared", f"model.path={model or root / 'model'}",
        "eval.num_beams=3", "eval.top_k=[1,3]",
    ]  # fmt: skip


def test_evaluate_checks_its_folder_before_decoding(folders, tmp_path, monkeypatch, capsys):
    decoded = []
    monkeypatch.setattr(evaluate_module, "run_beam_evaluation", lambda *a, **k: decoded.append(1))
    (tmp_path / "file").write_text("")
    assert main(["evaluate", *_args(folders, tmp_path / "file" / "eval")]) == 2  # a user error: exit 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err and err.count("\n") == 1
    # a training run's folder: its config.yaml is not overwritten
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train run\n")
    (run / "train_log.jsonl").write_text("")
    assert main(["evaluate", *_args(folders, run)]) == 2
    assert "training run's folder" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "train run\n"
    assert decoded == []


def test_evaluate_killed_while_writing_keeps_the_previous_outputs_whole(folders, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    cfg = load_config(None, _args(folders, out))
    evaluate_module.evaluate(cfg)
    before = (out / "predictions.jsonl").read_text()
    real_dumps = json.dumps
    calls = []

    def dies_on_third_row(obj, *args, **kwargs):
        calls.append(isinstance(obj, dict) and "target_rank" in obj)
        if sum(calls) == 3:
            raise KeyboardInterrupt  # a kill while predictions.jsonl is being written
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(evaluate_module.json, "dumps", dies_on_third_row)
    with pytest.raises(KeyboardInterrupt):
        evaluate_module.evaluate(cfg)
    assert (out / "predictions.jsonl").read_text() == before  # whole, never truncated
    assert not (out / "metrics.json").exists()  # written last: its absence says the run did not finish
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_evaluate_into_the_model_folder_or_the_data_folder_changes_nothing(folders, tmp_path, capsys, monkeypatch):
    decoded = []
    monkeypatch.setattr(evaluate_module, "run_beam_evaluation", lambda *a, **k: decoded.append(1))
    # RUN/model as the trainer exports it: the HF model plus its training config and export_info.json
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for path in (folders / "model").iterdir():
        (run / "model" / path.name).write_bytes(path.read_bytes())
    (run / "model" / "config.yaml").write_text("loss:\n  name: lml\n")
    (run / "model" / "export_info.json").write_text('{"kind": "full"}\n')
    before = folder_snapshot(run / "model")
    assert main(["evaluate", *_args(folders, run / "model", model=run / "model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"output_dir {run / 'model'} is an exported model folder" in err
    assert folder_snapshot(run / "model") == before and sorted(p.name for p in (run / "model").iterdir()) == sorted(
        before
    )
    # the prepared data folder it reads: its config.yaml (and everything else) untouched
    data_before = folder_snapshot(folders / "data")
    assert main(["evaluate", *_args(folders, folders / "data")]) == 2
    assert "is a prepared data folder (it holds stats.json, catalog.parquet" in capsys.readouterr().err
    assert folder_snapshot(folders / "data") == data_before and not (folders / "data" / ".lock").exists()
    assert decoded == []


def test_two_evaluations_into_one_folder_the_second_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    with RunFolderLock(out):  # a live evaluate holding the folder
        assert main(["evaluate", *_args(folders, out)]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {out} is in use by another run (pid" in err and err.count("\n") == 1
        assert main(["analyze", *_args(folders, out), "analyze.max_users=2"]) == 2
        assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    # the lock is given back when the command ends, by an error too: each of these takes it again
    assert main(["evaluate", *_args(folders, out)]) == 0
    missing_model = _args(folders, out, model=tmp_path / "no_model")
    assert main(["evaluate", *missing_model]) == 2  # refused after the lock was taken
    assert "has no config.json" in capsys.readouterr().err
    assert main(["evaluate", *_args(folders, out)]) == 0
    with RunFolderLock(out):
        pass


def test_analyze_into_an_evaluation_folder_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", *_args(folders, out)]) == 0
    before = folder_snapshot(out)
    assert main(["analyze", *_args(folders, out), "analyze.max_users=2"]) == 2
    assert "is an evaluation output folder (it holds metrics.json, predictions.jsonl)" in capsys.readouterr().err
    assert folder_snapshot(out) == before
