"""loss.name=sdpo on the data LML trains on, and its one-line errors: over-long prompts fitted against
the longest title (train.truncate_history), a resume refused when the reference model changed or its
stored log-probabilities are damaged or tampered, another tokenizer, too few negatives, a title longer
than the context."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_data import write_prepared

from bear_ds.config import load_config
from bear_ds.errors import ConfigError, DataError, ModelInputError, RunStateError, UnsafeCheckpointError
from bear_ds.training import train

# a context of 298 positions: the default prompt with 6 history items overflows it for some rows with
# their own title (LML truncates 32 of 64) and for more with the longest title (S-DPO truncates 48)
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "tokenizer.vocab_size=300",
        "model.max_position_embeddings=298"]  # fmt: skip
QUICK = ["train.zero_stage=0", "train.eval_every_epoch=false"]


def _sdpo(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={root / 'prepared'}", f"output_dir={out}", "model.name=hf", f"model.path={root / 'SFT' / 'model'}",
            f"model.reference_path={root / 'REF'}", "loss.name=sdpo", "loss.num_negatives=3",
            "loss.negative_source=random", *QUICK, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    """PREPARED data with long histories, SFT/model from 2 LML steps, REF a copy of it, and RUN: 2 S-DPO
    steps from SFT/model against REF with checkpoints."""
    root = tmp_path_factory.mktemp("sdpo_inputs")
    write_prepared(root / "prepared", rows=64, history=6, varied_titles=True)
    summary = train(load_config(None, [f"data.path={root / 'prepared'}", f"output_dir={root / 'SFT'}", "loss.name=lml",
                                       "train.max_steps=2", *QUICK, *TINY]))  # fmt: skip
    assert summary["prompts_truncated"] == 32
    shutil.copytree(root / "SFT" / "model", root / "REF")
    train(load_config(None, _sdpo(root, root / "RUN", "train.max_steps=2", "train.save_every=1")))
    return root


def test_sdpo_fits_prompts_against_the_longest_title_where_lml_trained(sft):
    summary = __import__("json").loads((sft / "RUN" / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["prompts_truncated"] == 48  # more than LML's 32: room for the longest title, not the target's
    saved = torch.load(sft / "RUN" / "reference_logps" / "epoch_0.pt", weights_only=True)
    assert saved["prompts_truncated"] == 48 and torch.isfinite(saved["reference_logps"]).all()


def test_sdpo_without_truncation_names_the_option(sft, tmp_path):
    with pytest.raises(ModelInputError, match="train row .*set train.truncate_history=true"):
        train(load_config(None, _sdpo(sft, tmp_path / "run", "train.max_steps=1", "train.truncate_history=false")))


def _resume(sft: Path, tmp_path: Path) -> list[str]:
    run = tmp_path / "RUN"
    shutil.copytree(sft / "RUN", run)
    return _sdpo(sft, run, "train.max_steps=3", "train.resume=auto")


def test_resume_with_a_replaced_reference_is_refused(sft, tmp_path):
    from safetensors.torch import load_file, save_file

    ref, run = tmp_path / "REF", tmp_path / "RUN"  # its own reference: the run's saved config names it
    shutil.copytree(sft / "REF", ref)
    first = [a.replace(str(sft / "REF"), str(ref)) for a in _sdpo(sft, run, "train.max_steps=2", "train.save_every=1")]
    train(load_config(None, first))
    weights = load_file(ref / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, ref / "model.safetensors", metadata={"format": "pt"})
    resumed = [a.replace("train.max_steps=2", "train.max_steps=3") for a in first] + ["train.resume=auto"]
    with pytest.raises(RunStateError, match=f"another reference model than model.reference_path={ref} holds now"):
        train(load_config(None, resumed))
    (run / "reference_logps" / "epoch_0.pt").unlink()  # the way out the message names: recompute
    assert train(load_config(None, resumed))["steps"] == 3


def test_resume_with_the_same_reference_continues(sft, tmp_path):
    assert train(load_config(None, _resume(sft, tmp_path)))["steps"] == 3


def test_resume_with_a_truncated_reference_file_is_one_line(sft, tmp_path):
    args = _resume(sft, tmp_path)
    path = tmp_path / "RUN" / "reference_logps" / "epoch_0.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RunStateError, match="epoch_0.pt is not a readable reference file"):
        train(load_config(None, args))


class Smuggled:
    """An object no reference file holds: the weights-only loader must refuse it."""


def test_resume_with_a_tampered_reference_file_says_what_is_wrong(sft, tmp_path):
    args = _resume(sft, tmp_path)
    path = tmp_path / "RUN" / "reference_logps" / "epoch_0.pt"
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "extra": Smuggled()}, path)
    with pytest.raises(UnsafeCheckpointError, match="tampered, or from elsewhere") as err:
        train(load_config(None, args))
    assert "weights_only" not in str(err.value)


def test_a_reference_with_another_tokenizer_is_refused_at_setup(sft, tmp_path):
    other = tmp_path / "other"
    train(load_config(None, [f"data.path={sft / 'prepared'}", f"output_dir={other}", "loss.name=lml",
                             "train.max_steps=1", *QUICK, *TINY[:2], "tokenizer.vocab_size=320",
                             "model.max_position_embeddings=298"]))  # fmt: skip
    args = [a.replace(str(sft / "REF"), str(other / "model")) for a in _sdpo(sft, tmp_path / "run")]
    with pytest.raises(ModelInputError, match=f"model.reference_path={other / 'model'} has another tokenizer"):
        train(load_config(None, [*args, "train.max_steps=1"]))
    assert not (tmp_path / "run" / "reference_logps").exists()  # refused before the reference pass


def test_more_negatives_than_other_titles_is_a_config_error(sft, tmp_path):
    args = [a.replace("loss.num_negatives=3", "loss.num_negatives=20") for a in _sdpo(sft, tmp_path / "run")]
    with pytest.raises(ConfigError, match="loss.num_negatives=20 needs at least 21 distinct titles .* has 20"):
        train(load_config(None, [*args, "train.max_steps=1"]))


def test_a_title_longer_than_the_context_names_the_item(sft, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(sft / "prepared", prepared)
    catalog = pq.read_table(prepared / "catalog.parquet").to_pylist()
    catalog[0]["title"] = " ".join(["stapler"] * 400)  # item i0 is a training target
    pq.write_table(pa.Table.from_pylist(catalog), prepared / "catalog.parquet")
    with pytest.raises(
        DataError, match=r"titles are too long for the model context of 298 positions, e\.g\. item 'i0'"
    ):
        train(load_config(None, [f"data.path={prepared}", f"output_dir={tmp_path / 'run'}", "loss.name=lml",
                                 "train.max_steps=1", *QUICK, *TINY]))  # fmt: skip
