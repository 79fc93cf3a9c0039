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
        # any loss name parses (register_loss adds losses); the trainer refuses an unknown one with the same
        # message: tests/test_loss_table.py
        (["loss.name=[a]"], ["loss.name", "valid string"]),
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


def test_duplicate_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("train: {lr: 0.01}\nloss: {name: lml}\ntrain: {seed: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg and "line 3: duplicate key 'train' (first on line 1)" in msg
    nested = tmp_path / "nested.yaml"
    nested.write_text("loss:\n  lam: 0.5\n  lam: 0.7\n")
    with pytest.raises(ConfigError, match="duplicate key 'lam'"):
        load_config(nested)


def test_defaults_cycle_is_one_line_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\ntrain: {seed: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    msg = str(err.value)
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg and "\n" not in msg


@pytest.mark.parametrize("override", ["train.lr=.inf", "loss.tau=.inf", "eval.length_penalty=.nan", "loss.lam=-.inf"])
def test_non_finite_floats_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value) and "finite" in str(err.value)


def test_unknown_domain_is_refused_listing_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.domain=offise"])
    msg = str(err.value)
    assert "data.domain" in msg and "'offise'" in msg and "office" in msg and "clothing" in msg
    # names and aliases, in any case or spacing, still work
    for ok in ["office", "Office Products", "toys", "ml-100k"]:
        assert load_config(None, [f"data.domain={ok}"]).data.domain == ok


@pytest.mark.parametrize("bad", ["eval.length_penalty=.nan", "DUPLICATE"])
def test_refused_config_exits_nonzero_without_writing_anything(tmp_path, capsys, bad):
    out = tmp_path / "run"
    args = ["train", f"output_dir={out}", "model.name=tiny"]
    if bad == "DUPLICATE":
        f = tmp_path / "c.yaml"
        f.write_text("train: {epochs: 1}\ntrain: {epochs: 2}\n")
        args = ["train", "--config", str(f), f"output_dir={out}"]
    else:
        args.append(bad)
    assert main(args) != 0
    assert not out.exists()
    assert capsys.readouterr().err.count("\n") <= 2
