"""The typed config: composition, dotted overrides, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bear_ds.cli import build_parser, main
from bear_ds.config import ConfigError, load_config, parse_overrides, save_config, with_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_typed():
    cfg = load_config(None, ["loss.lam=0.5", "train.seed=3", "eval.top_k=[1,5]", "model.lora.enabled=true"])
    assert cfg.loss.lam == 0.5 and isinstance(cfg.loss.lam, float)
    assert cfg.train.seed == 3
    assert cfg.eval.top_k == [1, 5]
    assert cfg.model.lora.enabled is True


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss: {name: msl, tau: 4.5}\ntrain: {seed: 1}\n")
    cfg = load_config(f, ["train.seed=7"])
    assert (cfg.loss.name, cfg.loss.tau, cfg.train.seed) == ("msl", 4.5, 7)


def test_defaults_chain_composes_relative_files(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("loss: {name: lml}\ntrain: {lr: 0.01}\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base/a.yaml]\ntrain: {seed: 5}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert (cfg.loss.name, cfg.train.lr, cfg.train.seed) == ("lml", 0.01, 5)


@pytest.mark.parametrize(
    "override, fragments",
    [
        (["loss.lamb=1"], ["loss.lamb", "unknown key", "did you mean 'lam'"]),
        (["loss.name=foo"], ["loss.name", "'foo'", "'lml', 'msl', 'bear'", "'beamsim'", "'sdpo'"]),
        (["train.lr=-1"], ["train.lr", "greater than 0"]),
        (["train.seed=abc"], ["train.seed", "integer"]),
        (["nosection.x=1"], ["nosection", "unknown key"]),
        (["eval.top_k=[0,5]"], ["eval.top_k", ">= 1"]),
    ],
)
def test_bad_values_name_the_key(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for frag in fragments:
        assert frag in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.tau=0", "train.epochs=0"])
    assert "loss.tau" in str(err.value) and "train.epochs" in str(err.value)


def test_malformed_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["loss.lam"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["loss.name=msl", "loss.tau=4.5", "eval.num_beams=20"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["loss"]["tau"] == 4.5


def test_decoding_mask_auto_follows_the_released_protocol():
    from bear_ds.masking import resolve_mask

    def decoding_mask(cfg):
        return resolve_mask(cfg.eval.mask, cfg.loss.name)

    assert decoding_mask(load_config(None, ["loss.name=lml"])) == "after"
    assert decoding_mask(load_config(None, ["loss.name=msl"])) == "before"
    assert decoding_mask(load_config(None, ["loss.name=bear"])) == "before"
    assert decoding_mask(load_config(None, ["loss.name=bear", "eval.mask=after"])) == "after"
    # 'auto' survives with_overrides, so switching the method switches the decoding mask
    base = load_config(None, ["loss.name=bear"])
    assert decoding_mask(with_overrides(base, ["loss.name=lml"])) == "after"


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 10, "configs/ should hold the dataset, model, method and experiment pieces"
    for f in files:
        load_config(f)  # raises with the file name on any problem


def test_cli_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    # the command list itself (a word at the start of an indented help row), not words anywhere in the text
    listed = re.findall(r"^ {4}([a-z]+) {2,}\S", out, flags=re.MULTILINE)
    assert listed == ["prepare", "train", "evaluate", "analyze", "sweep", "report", "config", "demo"]
    for name in listed:  # and each parses as a subcommand
        assert build_parser().parse_args([name]).command == name


def test_cli_config_error_exit_code(capsys):
    assert main(["prepare", "data.sorce=bear_csv"]) == 2
    assert "data.sorce" in capsys.readouterr().err


def test_sweep_grid_keys_are_dotted_keys_themselves():
    cfg = load_config(None, ["sweep.grid.train.seed=[1,2,3]", "sweep.grid.loss.name=[lml,bear]"])
    assert cfg.sweep.grid == {"train.seed": [1, 2, 3], "loss.name": ["lml", "bear"]}


def test_config_command_prints_every_key_with_its_description(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text('loss: {name: msl}\nprompt: {template: "### Instruction:\\n{instruction}\\n\\n{input}\\n"}\n')
    assert main(["config", "--config", str(f), "loss.lam=0.5", "eval.top_k=[1,5]"]) == 0
    out = capsys.readouterr().out
    expected = load_config(f, ["loss.lam=0.5", "eval.top_k=[1,5]"])
    assert yaml.safe_load(out) == expected.model_dump()  # the printout is the resolved config itself
    assert "  lam: 0.5  # BEAR/beamsim weight ('topk_weight' in the release)" in out.splitlines()
    for line in out.splitlines():
        if line.split("  # ")[0].endswith(":"):  # a section
            continue
        assert "  # " in line, f"a key without a description: {line}"


def test_report_takes_config_like_the_others(tmp_path, capsys):
    from report_fakes import write_run

    write_run(tmp_path / "runs" / "a", ["loss.name=bear"])
    f = tmp_path / "c.yaml"
    f.write_text(f"output_dir: {tmp_path / 'runs'}\n")
    assert main(["report", "--config", str(f)]) == 0
    assert (tmp_path / "runs" / "results.md").is_file()
    assert main(["report", str(tmp_path / "runs" / "a")]) == 0  # a folder as the first argument still works
    assert "report written to" in capsys.readouterr().out
