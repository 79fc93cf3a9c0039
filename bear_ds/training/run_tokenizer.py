"""The training run's tokenizer: the configured one, the model folder's, or a BPE trained once into
OUT/tokenizer (with a record of what it was trained from, checked again on a resume)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from bear_ds.config import Config
from bear_ds.outputs import write_json_atomic
from bear_ds.tokenization import ensure_pad_token, load_tokenizer, train_bpe_tokenizer
from bear_ds.training.run_folder import TOKENIZER_RECORD, read_tokenizer_record, tokenizer_mismatch, tokenizer_record

logger = logging.getLogger(__name__)


def prepare_tokenizer(
    cfg: Config,
    output_dir: Path,
    model_folder: Path | None,
    titles: dict[str, str],
    prompts: list[str],
    resuming: bool = False,
):
    """The run's tokenizer: tokenizer.path, else the model folder's, else a BPE trained once into OUT/tokenizer.

    OUT/tokenizer/trained_from.json records what the BPE was trained from; a leftover trained from
    other texts or with another vocabulary size is retrained in a fresh run and refused on a resume
    (its checkpoints hold embeddings of that tokenizer). Not collective: call on one process first
    (`main_process_first`), then the others load it.
    """
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    elif model_folder is not None:
        tokenizer = load_tokenizer(model_folder)
    else:
        folder = output_dir / "tokenizer"
        texts = [*titles.values(), *prompts]
        wanted = tokenizer_record(texts, cfg.tokenizer.vocab_size)
        reuse = (folder / "tokenizer_config.json").is_file()
        if reuse and (mismatch := tokenizer_mismatch(read_tokenizer_record(folder), wanted)) is not None:
            if resuming:
                check_resumed_tokenizer(folder, texts, cfg.tokenizer.vocab_size)  # raises on a recorded mismatch
                logger.warning("%s: %s; reused for the resume", folder, mismatch)
            else:
                logger.warning("%s is a leftover that does not match this run (%s): retrained", folder, mismatch)
                reuse = False
        if reuse:  # resume / second rank: reuse, never retrain
            tokenizer = load_tokenizer(folder)
        else:
            tokenizer = train_bpe_tokenizer(texts, cfg.tokenizer.vocab_size)
            tmp = output_dir / f"tokenizer.tmp-{os.getpid()}"
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / TOKENIZER_RECORD, wanted)
            old = output_dir / f"tokenizer.old-{os.getpid()}"
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)  # atomic: a killed run never leaves a half tokenizer to reuse
            shutil.rmtree(old, ignore_errors=True)
    ensure_pad_token(tokenizer)
    return tokenizer


def check_resumed_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> None:
    """A resumed run's OUT/tokenizer must be the one its checkpoints were trained with: refuse
    (ValueError) one recorded as trained from other texts or with another vocabulary size."""
    saved = read_tokenizer_record(folder)
    if saved is None or not (folder / "tokenizer_config.json").is_file():
        return  # nothing recorded (an older run), or nothing to reuse: prepare_tokenizer decides
    mismatch = tokenizer_mismatch(saved, tokenizer_record(texts, vocab_size))
    if mismatch is not None:
        raise ValueError(
            f"{folder} does not match this run: {mismatch}; its checkpoints were trained with it, so the "
            "resume is refused (resume with the data and tokenizer.vocab_size it was started with, or use "
            "another output_dir)"
        )
