"""Checkpoints: Accelerate/DeepSpeed state + the data position, written atomically, rotated.

A checkpoint is `OUT/checkpoints/step_N/`: `accelerator.save_state` (DeepSpeed engine state with
partitioned parameters and optimiser states, the scheduler, every rank's RNG states) plus
`trainer_state.json` (step, epoch, step within the epoch, counters). All of it is first written
to `tmp-step_N/`, and rank 0 renames it to `step_N/` once every rank has finished writing
(a rename within one folder is atomic), so a killed job never leaves a half checkpoint under a
`step_N` name; `latest_checkpoint` only considers `step_N` folders holding `trainer_state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its shard into tmp-step_N, rank 0 renames it and rotates."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step}"
    tmp = root / f"tmp-step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():  # the same step saved again (e.g. a resumed run that had nothing left to do)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep_last]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def remove_checkpoint(folder: Path) -> bool:
    """Delete a rotated-out checkpoint; a failure is logged as a warning naming the folder (the run goes on).

    Its trainer_state.json goes first, so a half-deleted folder is never taken for a complete checkpoint.
    """
    try:
        (folder / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder)
    except OSError as exc:
        logger.warning(
            "could not delete the old checkpoint %s (%s); it is no longer used: delete it by hand to free the space",
            folder, exc,
        )  # fmt: skip
        return False
    return True


def load_checkpoint(accelerator, folder: str | Path) -> dict[str, Any]:
    """Collective: restore model/optimiser/scheduler/RNG state; return the trainer state."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: {STATE_FILE} is missing")
    accelerator.load_state(str(folder))
    return json.loads(state_file.read_text())
