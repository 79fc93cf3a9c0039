"""All-or-nothing outputs: the atomic-write helper, and evaluate checking its folder first."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import write_model_folder, write_prepared

import bear_ds.evaluation.evaluate as evaluate_module
from bear_ds.cli import main
from bear_ds.config import load_config
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


def _args(root, out):
    return [
        f"output_dir={out}", f"data.path={root}/data", "data.source=prepared", f"model.path={root}/model",
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
