"""Tokenizers: a byte-level BPE trained on the catalog and prompts, local tokenizer folders, padding.

The trained BPE is what a from-scratch model uses: byte-level (every title is representable, no
`<unk>` ever appears, decoding is lossless), no normaliser (titles are decoding targets and must
come back byte for byte, HTML entities included), and special tokens at fixed ids:

    <unk> 0, <s> 1 (bos), </s> 2 (eos), <pad> 3

`tokenizer(text)` prepends `<s>` (add_special_tokens=True); responses are tokenised with
add_special_tokens=False and get `</s>` appended as an id by the catalog.

    tok = train_bpe_tokenizer(titles_and_prompts, vocab_size=2000)
    tok.save_pretrained(out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")

Training is deterministic: the same texts in the same order give the same vocabulary and merges
(the `tokenizers` BPE trainer breaks count ties by pair id, and the byte alphabet is fixed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bear_ds.errors import ConfigError, DataError, MissingPathError, ModelInputError

logger = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0..3, in this order
BYTE_ALPHABET_SIZE = 256  # the byte-level alphabet every trained vocabulary contains

# Files that make a folder loadable by AutoTokenizer (any one of them, with its companions).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens (specials included) on `texts`.

    The vocabulary is smaller when the texts have fewer distinct pairs to merge; `len(tok)` is
    the real size. Raises ValueError when `texts` is empty or `vocab_size` cannot hold the byte
    alphabet plus the special tokens.
    """
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    counted = _CountingIterator(texts)

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: a title at the start of a response is not given a leading space, so
    # the tokens the model generates after the prompt are those of the response text alone.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(counted, trainer=trainer)
    if counted.count == 0:
        raise DataError("cannot train a BPE tokenizer on no texts (the catalog and prompts are empty)")
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD)


class _CountingIterator(Iterator[str]):
    """Passes texts through to the trainer and counts them (an empty corpus is an error)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._it = iter(texts)
        self.count = 0

    def __next__(self) -> str:
        text = next(self._it)
        if not isinstance(text, str):
            raise TypeError(f"tokenizer training text #{self.count} is a {type(text).__name__}, not a str")
        self.count += 1
        return text


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder (never the hub).

    Raises FileNotFoundError naming the folder and what it holds when it has no tokenizer files.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingPathError(f"tokenizer folder {folder} does not exist (tokenizer.path must be a local folder)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise MissingPathError(
            f"tokenizer folder {folder} has none of {', '.join(TOKENIZER_FILES)}; "
            f"it holds: {', '.join(present) or 'nothing'}"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give `tokenizer` a pad token if it has none, reusing EOS (else UNK); returns True if it did.

    No token is added, so the model's embeddings need no resizing. Reusing EOS is safe for us:
    padded positions are masked out of attention and carry IGNORE_INDEX labels, and the EOS that
    ends each response is appended as an id, not found by looking for pad.
    """
    if tokenizer.pad_token is not None:
        return False
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            logger.info("tokenizer %s has no pad token: padding with its %s %r", tokenizer.name_or_path, name, token)
            return True
    raise ModelInputError(
        f"tokenizer {tokenizer.name_or_path!r} has no pad, eos or unk token to pad with; "
        "use a tokenizer with an eos token"
    )
