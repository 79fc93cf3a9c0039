"""loss.name=sdpo end to end: the contract (one process and 2 ranks under ZeRO-3, equal), the
reference pass and its reload on resume, `self` negatives equal to `bear-ds evaluate`, and a tiny
run that improves the reward accuracy on held-out pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.distributed import free_port
from bear_ds.training import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "tokenizer.vocab_size=300"]
CONTRACT = ["model.name=hf", "model.path=SFT/model", "model.reference_path=SFT/model", "loss.name=sdpo",
            "loss.num_negatives=3", "loss.negative_source=random", "train.max_steps=6", "output_dir=OUT"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 150) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """A folder with PREPARED data and SFT/model exported by a short LML run."""
    root = tmp_path_factory.mktemp("sdpo")
    write_prepared(root / "prepared")
    train(load_config(None, [f"data.path={root / 'prepared'}", f"output_dir={root / 'SFT'}", "loss.name=lml",
                             "train.zero_stage=0", "train.max_steps=12", "train.lr=3e-3", "train.warmup_steps=2",
                             "train.eval_every_epoch=false", *TINY]))  # fmt: skip
    return root


def test_contract_one_process_and_two_ranks_zero3_agree(sft, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / "SFT").symlink_to(sft / "SFT")
    prepared = f"data.path={sft / 'prepared'}"
    _run([str(BIN / "bear-ds"), "train", prepared, *CONTRACT], cwd=one)
    yaml = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"
    # the accelerate yaml names its DeepSpeed JSON relative to the repository: run from there
    _run([str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "--main_process_port", str(free_port()),
          "-m", "bear_ds.train", prepared, *[c.replace("SFT/", f"{two}/SFT/").replace("=OUT", f"={two}/OUT")
                                            for c in CONTRACT], "train.pg_timeout_s=30"], cwd=REPO)  # fmt: skip
    logs = {n: _log(f / "OUT") for n, f in (("one", one), ("two", two))}
    assert [r["step"] for r in logs["one"]] == list(range(1, 7)) == [r["step"] for r in logs["two"]]
    for a, b in zip(logs["one"], logs["two"], strict=True):
        assert np.isfinite(a["loss"]) and 0.0 <= a["reward_accuracy"] <= 1.0
        assert (a["world_size"], b["world_size"], b["zero_stage"]) == (1, 2, 3)
        for key in ("loss", "pref_loss", "reward_margin", "reward_accuracy", "ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
    # the reference is the SFT model itself: step 1 has all rewards 0, so L = log(1 + K), accuracy 0 (ties)
    assert logs["one"][0]["loss"] == pytest.approx(np.log(4.0), rel=1e-6)
    assert logs["one"][-1]["reward_accuracy"] > 0.5
    saved = torch.load(one / "OUT" / "reference_logps" / "epoch_0.pt", weights_only=True)
    assert saved["negatives"].shape == (256, 3) and saved["reference_logps"].shape == (256, 4)
    _run([str(BIN / "bear-ds"), "evaluate", prepared, "model.path=OUT/model", "output_dir=EVAL"], cwd=one)
    metrics = json.loads((one / "EVAL" / "metrics.json").read_text())
    assert metrics["users"] == 16 and metrics["decoding"]["mask"] == "before"


def _item_logps(model_dir: Path, prompts, groups, catalog, loss_cfg) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from bear_ds.training.preference_pairs import item_logps_pass

    net = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return item_logps_pass(net, prompts, groups, catalog, loss_cfg, batch_examples=16,
                           pad_token_id=catalog.eos_token_id, device=torch.device("cpu"), synced=False)  # fmt: skip


def _pairs(prepared: Path, split: str, model_dir: Path, k: int, seed: int):
    """Prompts and [positive, k random negatives] groups of a split, encoded as the trainer does."""
    from bear_ds.catalog import Catalog, encode_prompts
    from bear_ds.config import PromptConfig
    from bear_ds.data import PromptBuilder, load_catalog, load_split
    from bear_ds.tokenization import load_tokenizer
    from bear_ds.training.negatives import group_weights, sample_negatives

    titles, rows = load_catalog(prepared), load_split(prepared, split)
    catalog, tokenizer = Catalog.load(model_dir), load_tokenizer(model_dir)
    builder = PromptBuilder(PromptConfig(), "office")
    prompts = encode_prompts(tokenizer, [builder.prompt([titles[i] for i in h]) for h in rows["history"]])
    targets = [catalog.group_of_item(t) for t in rows["target"]]
    weights = group_weights(catalog.item_group, catalog.num_groups, "random", targets)
    negatives = sample_negatives(targets, None, weights, k, seed=seed)
    return prompts, np.concatenate([np.array(targets)[:, None], negatives], axis=1), catalog


def test_training_improves_reward_accuracy_on_held_out_pairs(sft, tmp_path):
    from bear_ds.config import LossConfig

    out = tmp_path / "run"
    beta = 0.5
    train(load_config(None, [
        f"data.path={sft / 'prepared'}", f"output_dir={out}", "train.zero_stage=0", "train.max_steps=16",
        "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every_epoch=false", "model.name=hf",
        f"model.path={sft / 'SFT' / 'model'}", f"model.reference_path={sft / 'SFT' / 'model'}", "loss.name=sdpo",
        f"loss.dpo_beta={beta}", "loss.num_negatives=3",
    ]))  # fmt: skip
    loss_cfg = LossConfig(name="sdpo", dpo_beta=beta)
    prompts, groups, catalog = _pairs(sft / "prepared", "valid", out / "model", 3, seed=11)
    ref = _item_logps(sft / "SFT" / "model", prompts, groups, catalog, loss_cfg)
    pol = _item_logps(out / "model", prompts, groups, catalog, loss_cfg)
    reward = beta * (pol - ref)  # [16, 4]
    accuracy = float((reward[:, 1:] < reward[:, :1]).float().mean())
    # before training the policy is the reference: every reward is 0 and no negative is below the positive
    assert accuracy >= 0.8, f"held-out reward accuracy {accuracy:.3f}"
    log = _log(out)
    assert log[-1]["reward_accuracy"] > log[1]["reward_accuracy"]


def test_frozen_reference_pass_equals_the_reference_model(sft, tmp_path):
    from bear_ds.config import LossConfig

    other = tmp_path / "other"  # a reference that is not the policy's starting point: loaded for the pass
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={other}", "loss.name=lml",
                             "train.zero_stage=0", "train.max_steps=3", "train.eval_every_epoch=false",
                             "model.name=hf", f"model.path={sft / 'SFT' / 'model'}"]))  # fmt: skip
    out = tmp_path / "run"
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={out}", "train.zero_stage=0",
                             "train.eval_every_epoch=false", "train.max_steps=2", "model.name=hf",
                             f"model.path={sft / 'SFT' / 'model'}", f"model.reference_path={other / 'model'}",
                             "loss.name=sdpo", "loss.num_negatives=2", "loss.negative_source=popular",
                             "loss.sft_weight=0.3"]))  # fmt: skip
    saved = torch.load(out / "reference_logps" / "epoch_0.pt", weights_only=True)
    prompts, groups, catalog = _pairs(sft / "prepared", "train", other / "model", 2, seed=0)
    groups[:, 1:] = saved["negatives"].numpy()
    want = _item_logps(other / "model", prompts, groups, catalog, LossConfig(name="sdpo"))
    torch.testing.assert_close(saved["reference_logps"], want, rtol=1e-5, atol=1e-5)
    log = _log(out)
    assert log[0]["loss"] != pytest.approx(log[0]["pref_loss"])  # the sft_weight CE term is in the loss


def test_resume_reloads_the_epoch_reference(sft, tmp_path):
    # no model.reference_path: the reference is the policy at the start of the epoch (SPRec); a resume
    # mid-epoch must reload it, not rescore with the policy that has moved since
    common = [f"data.path={sft / 'prepared'}", "train.zero_stage=0", "train.eval_every_epoch=false",
              "train.schedule=constant", "train.warmup_steps=0", "train.lr=3e-3", "train.save_every=2",
              "model.name=hf", f"model.path={sft / 'SFT' / 'model'}", "loss.name=sdpo",
              "loss.num_negatives=2"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(None, [*common, f"output_dir={full}", "train.max_steps=4"]))
    train(load_config(None, [*common, f"output_dir={part}", "train.max_steps=2"]))
    train(load_config(None, [*common, f"output_dir={part}", "train.max_steps=4", "train.resume=auto"]))
    a, b = _log(full), _log(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x["step"], x["loss"], y["loss"])
    assert a[-1]["reward_margin"] != 0.0


def test_self_negatives_are_what_evaluate_recommends(sft, tmp_path):
    import shutil

    from bear_ds.catalog import Catalog
    from bear_ds.evaluation.evaluate import evaluate

    out = tmp_path / "run"
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={out}", "train.zero_stage=0",
                             "train.max_steps=1", "train.eval_every_epoch=false", "model.name=hf",
                             f"model.path={sft / 'SFT' / 'model'}", "loss.name=sdpo", "loss.num_negatives=3",
                             "loss.negative_source=self", "eval.num_beams=5"]))  # fmt: skip
    negatives = torch.load(out / "reference_logps" / "epoch_0.pt", weights_only=True)["negatives"].tolist()
    as_test = tmp_path / "train_as_test"  # the training prompts, as a split `bear-ds evaluate` decodes
    shutil.copytree(sft / "prepared", as_test)
    shutil.copy(as_test / "train.parquet", as_test / "test.parquet")
    evaluate(load_config(None, [f"data.path={as_test}", f"model.path={sft / 'SFT' / 'model'}",
                                f"output_dir={tmp_path / 'eval'}", "eval.num_beams=5", "eval.mask=before"]))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    catalog = Catalog.load(sft / "SFT" / "model")
    assert len(rows) == len(negatives) == 256
    exact = 0
    for row, neg in zip(rows, negatives, strict=True):
        recommended = [t for t in row["predictions"] if t != row["target"]]
        titles = [catalog.group_titles[g] for g in neg]
        assert row["target"] not in titles
        n = min(3, len(recommended))
        assert titles[:n] == recommended[:n]
        exact += n == 3
    assert exact > 200  # almost every beam finished 5 items


def test_self_play_rounds_sft_then_sdpo_with_the_round_start_reference(sft, tmp_path):
    from bear_ds.config import LossConfig

    out = tmp_path / "sprec"
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={out}", "train.zero_stage=0",
                             "train.epochs=2", "train.global_batch=64", "train.eval_every_epoch=false",
                             "train.self_play=true", "model.name=hf", f"model.path={sft / 'SFT' / 'model'}",
                             "loss.name=sdpo", "loss.num_negatives=1", "loss.negative_source=self",
                             "eval.num_beams=4"]))  # fmt: skip
    log = _log(out)
    assert [r["epoch"] for r in log][3] == 1.0 and len(log) == 8  # 4 SFT steps, then 4 S-DPO steps
    assert all(r["reward_accuracy"] == "nan" and r["pref_loss"] == "nan" for r in log[:4])  # SFT: no pairs
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 and np.isfinite(r["pref_loss"]) for r in log[4:])
    assert sorted(p.name for p in (out / "reference_logps").iterdir()) == ["epoch_0.pt"]  # one round, one pass
    saved = torch.load(out / "reference_logps" / "epoch_0.pt", weights_only=True)
    prompts, groups, catalog = _pairs(sft / "prepared", "train", sft / "SFT" / "model", 1, seed=0)
    groups[:, 1:] = saved["negatives"].numpy()
    # the reference is the model at the start of the round (before its SFT epoch): the SFT model here
    want = _item_logps(sft / "SFT" / "model", prompts, groups, catalog, LossConfig(name="sdpo"))
    torch.testing.assert_close(saved["reference_logps"], want, rtol=1e-5, atol=1e-5)
    assert log[4]["reward_margin"] != 0.0  # the SFT epoch moved the policy away from the reference


def test_self_play_config_errors():
    from bear_ds.config import ConfigError

    with pytest.raises(ConfigError, match="needs loss.name=sdpo and loss.negative_source=self"):
        load_config(None, ["train.self_play=true", "loss.name=sdpo"])
    with pytest.raises(ConfigError, match="leave model.reference_path unset"):
        load_config(None, ["train.self_play=true", "loss.name=sdpo", "loss.negative_source=self",
                           "model.reference_path=SFT/model"])  # fmt: skip
    with pytest.raises(ConfigError, match="train.epochs=3 is odd"):
        load_config(None, ["train.self_play=true", "loss.name=sdpo", "loss.negative_source=self", "train.epochs=3"])


def test_frozen_reference_under_two_rank_zero3_equals_one_process(sft, tmp_path):
    # model.reference_path differs from model.path: the reference is loaded partitioned for the pass
    # (the trainer raises if ZeRO-3 loaded it whole) and its stored log-probabilities match one process
    other = tmp_path / "other"
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={other}", "loss.name=lml",
                             "train.zero_stage=0", "train.max_steps=3", "train.eval_every_epoch=false",
                             "model.name=hf", f"model.path={sft / 'SFT' / 'model'}"]))  # fmt: skip
    common = [f"data.path={sft / 'prepared'}", "model.name=hf", f"model.path={sft / 'SFT' / 'model'}",
              f"model.reference_path={other / 'model'}", "loss.name=sdpo", "loss.num_negatives=2",
              "loss.negative_source=popular", "train.max_steps=3", "train.eval_every_epoch=false"]  # fmt: skip
    train(load_config(None, [*common, f"output_dir={tmp_path / 'one'}", "train.zero_stage=0"]))
    yaml = REPO / "launchers" / "accelerate" / "cpu_zero3.yaml"
    _run([str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "--main_process_port", str(free_port()),
          "-m", "bear_ds.train", *common, f"output_dir={tmp_path / 'two'}", "train.pg_timeout_s=30",
          "train.save_every=3"], cwd=REPO)  # fmt: skip
    one, two = (torch.load(tmp_path / n / "reference_logps" / "epoch_0.pt", weights_only=True) for n in ("one", "two"))
    assert torch.equal(one["negatives"], two["negatives"])
    # what the file was computed from is recorded alike (rank 0 digests, the other ranks receive it)
    assert one["reference_digest"] == two["reference_digest"] and one["examples_digest"] == two["examples_digest"]
    torch.testing.assert_close(one["reference_logps"], two["reference_logps"], rtol=1e-5, atol=1e-5)
    for a, b in zip(_log(tmp_path / "one"), _log(tmp_path / "two"), strict=True):
        assert b["zero_stage"] == 3 and b["world_size"] == 2
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["reward_accuracy"] == a["reward_accuracy"]
    # a 2-rank resume checks the reloaded file against the reference on every rank together
    _run([str(BIN / "accelerate"), "launch", "--config_file", str(yaml), "--main_process_port", str(free_port()),
          "-m", "bear_ds.train", *[c.replace("max_steps=3", "max_steps=4") for c in common],
          f"output_dir={tmp_path / 'two'}", "train.pg_timeout_s=30", "train.resume=auto"], cwd=REPO)  # fmt: skip
    assert [r["step"] for r in _log(tmp_path / "two")] == [1, 2, 3, 4]
