"""One owner per run folder, and the checks a training makes before it writes anything there.

    lock = RunFolderLock(out).acquire()        # bear_ds.locks: a second run into `out` is refused
    changes = check_launch(out, cfg, ckpt)     # refused launch / changed config: raised before any write
    if finished_run_summary(out, ckpt) is None:  # else: this run, finished, no checkpoint: nothing to do
        ...                                    # save config.yaml, record `changes`, train
    lock.release()                             # also released by the kernel when the process dies

- The lock (`bear_ds/locks.py`) is `fcntl.flock` on `OUT/.lock`, held by one process per run
  (rank 0); the kernel drops it when that process exits, however it exits.
- A resumed run (`train.resume=auto` with a checkpoint) must have the config of the run it
  continues, except keys that cannot change what was already trained: raising `train.epochs` /
  `train.max_steps`, logging and checkpoint cadence, and evaluation/report keys. Those changes are
  allowed and recorded in `OUT/resumes.jsonl`; any other is refused with the list of changed keys.
- A finished run (`OUT/summary.json`), with or without checkpoints, is the same: refused without
  `train.resume=auto`, and with it refused when the config changed. Without checkpoints it is
  finished already (nothing is changed), or refused when epochs/max_steps were raised (nothing to
  continue from); with them it resumes (raised epochs/max_steps train on, else the summary is redone).
- `OUT/tokenizer/trained_from.json` records what a BPE tokenizer was trained from (vocabulary
  size, number and SHA-256 digest of the texts); `tokenizer_mismatch` says how a leftover differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from bear_ds.config import Config, ConfigError
from bear_ds.errors import RunFolderError, RunStateError
from bear_ds.runs import flatten

logger = logging.getLogger(__name__)

RESUMES_FILE = "resumes.jsonl"
SUMMARY_FILE = "summary.json"  # written when a run ends: its presence says the run finished
TOKENIZER_RECORD = "trained_from.json"

# keys a resumed run may change: none of them changes the steps already taken
RESUME_FREE_KEYS = (
    "train.log_every", "train.save_every", "train.keep_last", "train.pg_timeout_s", "train.resume",
    "train.eval_every_epoch", "train.eval_max_users", "train.select_metric", "train.eval_test",
    "output_dir",
)  # fmt: skip
RESUME_FREE_SECTIONS = ("eval.", "analyze.", "sweep.")
RESUME_RAISE_ONLY = ("train.epochs", "train.max_steps")


# ---------------------------------------------------------------------------------------- config checks
def _raised(old: Any, new: Any) -> bool:
    """`new` allows at least as many steps as `old` (None = no max_steps cap: epochs decide)."""
    if old is None or new is None:
        return new is None
    return new >= old


def classify_resume_changes(
    saved: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(allowed, refused) changes between the config a run was started with and the one resuming it,
    each {dotted key: (old, new)}. Allowed: RESUME_FREE_KEYS, the RESUME_FREE_SECTIONS, and raising
    RESUME_RAISE_ONLY; everything else could change the result of the steps already taken."""
    old, new = flatten(saved), flatten(current)
    allowed: dict[str, tuple[Any, Any]] = {}
    refused: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        free = key in RESUME_FREE_KEYS or key.startswith(RESUME_FREE_SECTIONS)
        raise_only = key in RESUME_RAISE_ONLY and _raised(before, after)
        (allowed if free or raise_only else refused)[key] = (before, after)
    return allowed, refused


def check_launch(out: str | Path, cfg: Config, checkpoint: Path | None) -> dict[str, tuple[Any, Any]]:
    """The checks before a training writes anything into `out`; pure reads, the same on every rank.

    Raises RunFolderError when `out` holds checkpoints or a finished run (summary.json) and
    train.resume is not auto, or holds a finished run it cannot continue (no checkpoint);
    ConfigError listing the changed keys when a resume changes a key that matters. Returns the
    allowed changes of a resume (to record), else {}.
    """
    out = Path(out)
    finished = (out / SUMMARY_FILE).is_file()
    if checkpoint is None and not finished:
        return {}
    if cfg.train.resume != "auto":
        held = f"{out / 'checkpoints'} holds checkpoints" if checkpoint is not None else (
            f"{out} holds a finished training run ({SUMMARY_FILE})")  # fmt: skip
        raise RunFolderError(
            f"{held} of an earlier run: add train.resume=auto to continue it, or choose another output_dir"
        )
    saved_path = out / "config.yaml"
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("%s cannot be read (%s): the resumed config is not compared", saved_path, exc)
        saved = None
    allowed, refused = classify_resume_changes(saved, cfg.model_dump()) if isinstance(saved, dict) else ({}, {})
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        stands_for = f"the checkpoint at {checkpoint.name}" if checkpoint is not None else f"its {SUMMARY_FILE}"
        raise ConfigError(
            f"train.resume=auto: {out} was trained with another config ({listed}); these keys change what "
            f"{stands_for} stands for. Resume with the saved {saved_path} (only train.epochs/max_steps may be "
            "raised, logging, checkpoint and evaluation keys changed), or use another output_dir"
        )
    if finished and checkpoint is None:
        steps = read_summary(out)["steps"]
        raised = [key for key in RESUME_RAISE_ONLY if key in allowed]
        if raised or (cfg.train.max_steps is not None and cfg.train.max_steps > steps):
            raise RunFolderError(
                f"train.resume=auto: {out} holds a run finished after {steps} steps ({SUMMARY_FILE}) and no "
                f"checkpoint in {out / 'checkpoints'} to train it further from (train.max_steps="
                f"{cfg.train.max_steps}, train.epochs={cfg.train.epochs}); choose another output_dir"
            )
    return allowed


def read_summary(out: str | Path) -> dict[str, Any]:
    """OUT/summary.json, which must be a JSON object with an integer 'steps' (RunStateError naming it otherwise)."""
    path = Path(out) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunStateError(f"{path} cannot be read ({exc}): use another output_dir") from None
    steps = summary.get("steps") if isinstance(summary, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise RunStateError(f"{path} has no integer 'steps' (not what bear-ds writes): use another output_dir")
    return summary


def finished_run_summary(out: str | Path, checkpoint: Path | None) -> dict[str, Any] | None:
    """After `check_launch` accepted a launch into `out`: the saved summary when `out` holds this very
    run, finished, with no checkpoint left (nothing to train, nothing to change). None when there is
    no summary, or a checkpoint to resume from (a finished run's resume finds no step left and
    recomputes its summary from its logs; raised epochs/max_steps continue it)."""
    if checkpoint is not None or not (Path(out) / SUMMARY_FILE).is_file():
        return None
    return read_summary(out)


def record_resume(out: str | Path, step: int, allowed: dict[str, tuple[Any, Any]]) -> None:
    """Append the allowed config changes of a resume to OUT/resumes.jsonl (rank 0)."""
    if not allowed:
        return
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "from_step": step,
        "changed": {k: {"old": a, "new": b} for k, (a, b) in allowed.items()},
    }
    with (Path(out) / RESUMES_FILE).open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    logger.info("resumed with changed keys (allowed, recorded in %s): %s", RESUMES_FILE, ", ".join(allowed))


# ---------------------------------------------------------------------------------------- tokenizer
def tokenizer_record(texts: Iterable[str], vocab_size: int) -> dict[str, Any]:
    """What a BPE tokenizer is trained from: vocabulary size and a digest of the texts, in order."""
    digest = hashlib.sha256()
    count = 0
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")  # ["ab", "c"] and ["a", "bc"] differ
        count += 1
    return {"vocab_size": vocab_size, "texts": count, "texts_sha256": digest.hexdigest()}


def read_tokenizer_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / TOKENIZER_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tokenizer_mismatch(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> str | None:
    """None when a tokenizer trained from `saved` is the one `wanted` describes, else why not."""
    if saved is None:
        return f"it has no {TOKENIZER_RECORD} (trained by an older bear-ds, or not by bear-ds)"
    if saved.get("vocab_size") != wanted["vocab_size"]:
        return f"vocabulary size {saved.get('vocab_size')} where tokenizer.vocab_size={wanted['vocab_size']}"
    if saved.get("texts_sha256") != wanted["texts_sha256"]:
        return (
            f"it was trained on other texts ({saved.get('texts')} titles and prompts, digest "
            f"{str(saved.get('texts_sha256'))[:12]}; this data: {wanted['texts']}, {wanted['texts_sha256'][:12]})"
        )
    return None


# ---------------------------------------------------------------------------------------- export
def model_is_selected_epoch(export_info: dict[str, Any]) -> bool:
    """True when OUT/model's export_info.json says an epoch was selected into it (an epoch and a
    metric), not a final export with no selection."""
    return export_info.get("selected_by") is not None and export_info.get("epoch") is not None
