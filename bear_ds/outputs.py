"""All-or-nothing outputs: every file a command writes appears whole or not at all.

A file is written to a temporary name beside it (same folder, so the rename never crosses a file
system), flushed to disk, then renamed over the target with `os.replace`, which is atomic on POSIX:
a kill mid-write leaves the previous file (or none), never a truncated one. Output folders are
checked for writability before the expensive work (decoding, ranking), not after it.

    check_writable_folder(out)                      # before decoding
    write_text_atomic(out / "metrics.json", text)
    with open_atomic(out / "predictions.jsonl") as fh:
        fh.write(...)
    with atomic_path(out / "results.csv") as tmp:   # for writers that take a path
        frame.to_csv(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bear_ds.errors import NotAFolderError, UnwritableFolderError


def _temporary_name(path: Path) -> Path:
    # hidden, per process: two writers never share a temporary file, and report globs skip it;
    # the suffix stays last so that writers that choose a format by it (savefig) still can
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is renamed to `path`, on an error
    it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """`open(path, mode)` whose content replaces `path` only when the block finishes without error."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` all at once (see module doc)."""
    with open_atomic(path) as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON (UTF-8, a final newline), written all at once."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def check_writable_folder(folder: str | Path) -> Path:
    """Create `folder` if needed and make sure files can be created in it; raise PermissionError
    with a one-line message naming the folder otherwise. Call before the expensive work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise NotAFolderError(f"output folder {folder} exists and is not a folder") from None
    except OSError as exc:
        raise UnwritableFolderError(f"output folder {folder} is not writable: {exc.strerror or exc}") from None
    return folder
