"""Checkpoints: Accelerate/DeepSpeed state + the data position, written atomically, rotated.

A checkpoint is `OUT/checkpoints/step_N/`: `accelerator.save_state` (DeepSpeed engine state with
partitioned parameters and optimiser states, the scheduler, every rank's RNG states) plus
`trainer_state.json` (step, epoch, step within the epoch, counters). All of it is first written
to `tmp-step_N/`, and rank 0 renames it to `step_N/` once every rank has finished writing
(a rename within one folder is atomic), so a killed job never leaves a half checkpoint under a
`step_N` name; `latest_checkpoint` only considers `step_N` folders holding `trainer_state.json`.

Loading never runs code from a checkpoint. DeepSpeed reads its `*model_states.pt` and
`*optim_states.pt` with `torch.load(weights_only=False)`, i.e. plain pickle, which runs whatever a
tampered file asks for. `load_checkpoint` first lists the pickle globals of every file (a static
scan, nothing is executed) and refuses a file naming one outside `safe_checkpoint_globals()`, the
few classes DeepSpeed and Accelerate save; it then loads with torch's weights-only unpickler forced
on (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`) and that same allow-list, so a payload hidden from the scan
is refused by the unpickler as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bear_ds.errors import UnsafeCheckpointError

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


# what torch.save-d files of a checkpoint may hold besides tensors and containers
PICKLED_SUFFIXES = (".pt", ".bin", ".pkl", ".pth")


def safe_checkpoint_globals() -> list[Any]:
    """The classes and functions, beyond torch's weights-only defaults, that DeepSpeed (ZeRO-0/2/3,
    fp32 and bf16) and Accelerate (numpy RNG state) pickle into a checkpoint."""
    # deferred: DeepSpeed is heavy; only loading a checkpoint needs its classes
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
        np._core.multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the MT19937 state
    ]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every `torch.load` inside, DeepSpeed's `weights_only=False` included, uses the weights-only
    unpickler with `safe_checkpoint_globals()` allowed."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_checkpoint_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def verify_checkpoint_files(folder: str | Path) -> int:
    """Refuse (ValueError naming the file) a checkpoint file that is not a torch.save archive or
    whose pickle names a global outside the allow-list. Reads only the pickles, never runs them.
    Returns the number of files checked."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLED_SUFFIXES)
    with torch.serialization.safe_globals(safe_checkpoint_globals()):
        for path in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
                raise UnsafeCheckpointError(
                    f"checkpoint file {path} is not a torch.save archive ({exc}): refused to load it"
                ) from None
            if unsafe:
                raise UnsafeCheckpointError(
                    f"checkpoint file {path} refers to {', '.join(unsafe[:3])}, which no checkpoint written by "
                    "bear-ds holds (tampered, or from elsewhere): refused to load it, nothing from it was run"
                )
    return len(files)


def load_checkpoint(accelerator, folder: str | Path) -> dict[str, Any]:
    """Collective: restore model/optimiser/scheduler/RNG state; return the trainer state.
    Nothing in the checkpoint is run (see the module doc)."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint: {STATE_FILE} is missing")
    state = read_trainer_state(state_file)  # before the (large) state is loaded
    verify_checkpoint_files(folder)
    try:
        with weights_only_loading():
            accelerator.load_state(str(folder))
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(f"checkpoint {folder}: refused by the weights-only loader: {first_line}") from None
    return state


# what `save_checkpoint` writes into trainer_state.json and a resume reads back
_STATE_COUNTS = ("step", "epoch", "step_in_epoch")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, checked: a JSON object whose step, epoch and step_in_epoch
    are non-negative integers and whose counters (if any) are an object. Anything else (a truncated
    or edited file) is UnsafeCheckpointError naming the file and what is wrong."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UnsafeCheckpointError(f"{path} is not valid JSON ({exc}): this checkpoint cannot be resumed") from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(f"{path} is not a JSON object: this checkpoint cannot be resumed")
    for key in _STATE_COUNTS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            what = "is missing" if key not in state else f"is {value!r}, not a non-negative integer"
            raise UnsafeCheckpointError(f"{path}: {key!r} {what}: this checkpoint cannot be resumed")
    if not isinstance(state.get("counters", {}), dict):
        raise UnsafeCheckpointError(f"{path}: 'counters' is not a JSON object: this checkpoint cannot be resumed")
    return state
