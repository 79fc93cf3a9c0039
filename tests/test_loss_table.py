"""The table of training losses: a loss registered from outside the package trains under its own
loss.name, a copy of a built-in loss computes that loss, an unknown name is refused early; the
zero a skipped micro-batch backpropagates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bear_ds.cli import main
from bear_ds.config import ConfigError, load_config
from bear_ds.losses import LMHead, zero_through
from bear_ds.training import loss_spec, register_loss, train
from bear_ds.training.loss_api import head_zero
from bear_ds.training.loss_table import LOSSES

# MovieLens-100k from the installed recbole wheel, 64 training windows, a tiny model, 3 steps
ML100K_TINY = [
    "data.source=ml100k", "data.train_sample=64", "model.name=tiny", "model.hidden_size=32",
    "model.intermediate_size=64", "tokenizer.vocab_size=300", "train.global_batch=8", "train.micro_batch=4",
    "train.max_steps=3", "train.log_every=1", "train.eval_every_epoch=false", "train.zero_stage=0",
]  # fmt: skip


def step_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def lml_copy():
    register_loss("lml_copy", loss_spec("lml").compute)
    yield "lml_copy"
    LOSSES.pop("lml_copy", None)  # later tests see the package's table only


def test_a_registered_copy_of_lml_trains_the_same_steps(tmp_path, lml_copy):
    losses = {}
    for name in ("lml", lml_copy):
        out = tmp_path / name
        train(load_config(None, [*ML100K_TINY, f"loss.name={name}", f"output_dir={out}"]))
        losses[name] = step_losses(out)
    assert len(losses["lml"]) == 3
    assert losses[lml_copy] == losses["lml"]  # same data, seed and math: bit for bit
    saved = load_config(tmp_path / lml_copy / "config.yaml")  # the saved config reads back
    assert saved.loss.name == lml_copy


def test_the_table_lists_every_builtin_loss_and_nothing_registers_on_import():
    assert list(LOSSES) == ["lml", "msl", "bear", "beamsim", "sdpo"]
    assert LOSSES["sdpo"].setup is not None and LOSSES["sdpo"].epoch_start is not None
    assert LOSSES["beamsim"].extra_metrics == ("sim_pruned_frac",)


def test_unknown_loss_name_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, [*ML100K_TINY, "loss.name=foo", f"output_dir={out}"])  # any name parses
    with pytest.raises(ConfigError) as err:
        train(cfg)
    for fragment in ("loss.name", "'foo'", "'lml', 'msl', 'bear'", "'beamsim'", "'sdpo'", "register_loss"):
        assert fragment in str(err.value)
    assert not out.exists()  # refused before the run folder, the data or the model
    assert main(["train", "loss.name=foo", f"output_dir={out}"]) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "loss.name: got 'foo'" in message[0]


def test_a_skipped_micro_batch_zero_reaches_the_hidden_states_and_every_head_parameter():
    hidden = torch.randn(3, 4, requires_grad=True)
    head = LMHead(torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True))
    zero = head_zero(hidden, head)()
    assert zero.dtype == torch.float32 and float(zero) == 0.0
    zero.backward()
    for tensor in (hidden, head.weight, head.bias):  # a gradient (0), not None: every hook fires
        assert tensor.grad is not None and not tensor.grad.any()
    assert float(zero_through(torch.randn(2), None)) == 0.0  # a head without bias
    with pytest.raises(ValueError, match="at least one tensor"):
        zero_through(None)
