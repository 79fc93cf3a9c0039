"""One live owner per folder: an exclusive, non-blocking `fcntl.flock` on FOLDER/.lock.

The kernel drops the lock when its process exits, however it exits, so a lock file left by a dead
process is free again; the file only names its last owner (pid, host, time) for the messages.
Used for run folders (one training per OUT) and for sweep points (one process per point).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from bear_ds.errors import RunFolderError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunFolderBusyError(RunFolderError):
    """Another live process holds the run folder's lock; `owner` describes it."""

    def __init__(self, message: str, owner: str = "owner unknown") -> None:
        super().__init__(message)
        self.owner = owner


class RunFolderLock:
    """An exclusive, non-blocking `flock` on OUT/.lock for the life of a run."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> RunFolderLock:
        """Take the lock or raise RunFolderBusyError naming the owner (`wait`: block until the
        owner releases it instead). Creates the folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = _describe_owner(_read_owner(fd))
            os.close(fd)
            raise RunFolderBusyError(
                f"output_dir {self.folder} is in use by another run ({owner}): wait for it to finish, "
                "or choose another output_dir",
                owner=f"in use by another process ({owner})",
            ) from None
        previous = _read_owner(fd)
        if previous and not _alive(previous):
            logger.info("%s: the run that held it (%s) has ended; taken over", self.path, _describe_owner(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolderLock:
        return self if self.held else self.acquire()  # `with RunFolderLock(d).acquire(wait=True):` works

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True  # cannot tell from here
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
