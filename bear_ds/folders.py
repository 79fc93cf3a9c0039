"""One kind of folder per command: what an output folder is, told from the entries directly in it.

Every command that writes checks its `output_dir` before it writes anything (pure reads):

    check_output_dir(out, "train")      # the root, a file, or another command's folder: one-line error

- `/` (the filesystem root) is never an output folder; a path that is a file or lies under one is
  refused as such (not a traceback from `mkdir`).
- A folder that is another command's kind is refused, naming the kind and the files that tell it.
  The kinds look at entries directly in the folder, never into subfolders, so the legitimate nesting
  is allowed: a sweep folder holds its points' run folders and a `data/` prepared folder, a run
  folder holds `model/`, `checkpoints/` and `analysis/`, and each of those is checked as its own
  command's folder when that command writes it.
- A folder of no kind (new, empty, or holding only other files) is accepted by every command.

evaluate and analyze also take the run-folder lock (`bear_ds.locks`) on their output_dir, as train
does: `check_output_folder_together` on the main process, its verdict on every rank; the lock is
released when the command decorated with `@holds_output_lock` returns or raises.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bear_ds.errors import NotAFolderError, RunFolderError
from bear_ds.locks import RunFolderLock
from bear_ds.outputs import check_writable_folder

# kind -> entries (files or folders) directly in a folder that only a folder of that kind holds
# (config.yaml is written by every command: not a marker)
FOLDER_KINDS: dict[str, tuple[str, ...]] = {
    "a sweep folder": ("sweep.yaml", "points.json", "point_configs"),
    "a demo folder": ("demo.yaml", "demo_time.json"),
    "a training run's folder": (
        "summary.json",
        "train_log.jsonl",
        "epochs.jsonl",
        "checkpoints",
        "resumes.jsonl",
        "test_predictions.jsonl",
    ),
    "an exported model folder": ("export_info.json",),  # what the trainer writes to OUT/model
    "a prepared data folder": ("stats.json", "catalog.parquet", "train.parquet", "valid.parquet", "test.parquet"),
    "an evaluation output folder": ("metrics.json", "predictions.jsonl"),
    "an analysis output folder": ("analysis.json", "analysis.jsonl"),
}
# the kind each command writes into its output_dir (an exported model is written inside a run folder)
COMMAND_KINDS: dict[str, str] = {
    "prepare": "a prepared data folder",
    "train": "a training run's folder",
    "evaluate": "an evaluation output folder",
    "analyze": "an analysis output folder",
    "sweep": "a sweep folder",
    "demo": "a demo folder",
}
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def folder_kinds(folder: str | Path) -> dict[str, list[str]]:
    """{kind: the entries that tell it} for each kind `folder` looks like ({} for a new or empty folder
    or one holding no marker). A Hugging Face model folder (config.json and weights) is an exported model."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[str, list[str]] = {}
    for kind, markers in FOLDER_KINDS.items():
        present = [name for name in markers if (folder / name).exists()]
        if present:
            found[kind] = present
    if (folder / "config.json").is_file():
        weights = sorted({p.name for pattern in _HF_WEIGHTS for p in folder.glob(pattern)})
        if weights:
            found.setdefault("an exported model folder", []).extend(["config.json", *weights[:2]])
    return found


def check_output_dir(out: str | Path, command: str) -> Path:
    """Refuse `out` as `command`'s output_dir (one-line BearDsError) when it is the filesystem root,
    a file or under one, or a folder of another command's kind. Pure reads: nothing is created."""
    out = Path(out)
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise RunFolderError(f"output_dir {out} is the filesystem root: {command} writes only into a folder of its own")
    for path in (resolved, *resolved.parents):
        if path.exists() and not path.is_dir():
            where = "it is a file" if path == resolved else f"it is under {path}, which is a file"
            raise NotAFolderError(f"output_dir {out} is not writable: {where}, and {command} needs a folder")
    own = COMMAND_KINDS[command]
    foreign = {kind: names for kind, names in folder_kinds(out).items() if kind != own}
    if foreign:
        kind, names = next(iter(foreign.items()))
        inside_a_run = kind == "a training run's folder" and command in ("evaluate", "analyze")
        hint = f", e.g. output_dir={out / command}" if inside_a_run else ""
        raise RunFolderError(
            f"output_dir {out} is {kind} (it holds {', '.join(names)}), not {own}: {command} writes only into a "
            f"new folder or one of its own, never among another command's files; choose another output_dir{hint}"
        )
    return out


# ---------------------------------------------------------------------------------------- evaluate/analyze
_held_locks: contextvars.ContextVar[list[RunFolderLock] | None] = contextvars.ContextVar("held_locks", default=None)
Command = TypeVar("Command", bound=Callable[..., Any])


def holds_output_lock(command: Command) -> Command:
    """Decorator: the output folder lock `check_output_folder_together` takes during `command` is
    released when it returns or raises (a failed command in a long-lived process leaves it free)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _held_locks.set([])
        try:
            return command(*args, **kwargs)
        finally:
            for lock in _held_locks.get() or []:
                lock.release()
            _held_locks.reset(token)

    return run  # type: ignore[return-value]


def check_output_folder(out: Path, command: str) -> RunFolderLock:
    """Refuse (before any work) an output_dir that is not `command`'s (`check_output_dir`), that
    another live process holds, or that cannot be written; return the lock taken on it."""
    check_output_dir(out, command)
    check_writable_folder(out)
    lock = RunFolderLock(out).acquire()  # RunFolderBusyError names the owner
    held = _held_locks.get()
    if held is not None:
        held.append(lock)
    return lock


def check_output_folder_together(accelerator: Any, out: Path, command: str) -> None:
    """`check_output_folder` on the main process, its verdict on every rank: all ranks raise together
    (none loads and decodes only to wait at the gather for a rank that has left), leaving the group."""
    # deferred: `prepare` uses this module and loads no torch; only this multi-rank check needs it
    from accelerate.utils import gather_object

    from bear_ds.distributed import end_distributed

    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            check_output_folder(out, command)
        except (ValueError, OSError) as exc:
            error = exc
    refused = gather_object([error is not None]) if accelerator.num_processes > 1 else [error is not None]
    if any(refused):
        end_distributed(accelerator)
        raise error or RunFolderError(f"{command}: output_dir {out} was refused (see rank 0)")
