"""The tool's own errors: bad input or state a user can fix, reported without a traceback.

Both entry points (`bear-ds ...` and `python -m bear_ds.train`) print a `BearDsError` as one line
naming the key, file or value, and exit with status 2; anything else is a bug or an environment
problem and keeps its full traceback (exit status 1). `BEAR_DS_TRACEBACK=1` shows the traceback
of a `BearDsError` too. Each class also derives from the built-in exception it used to be, so
`except ValueError` / `except FileNotFoundError` callers keep working.
"""

from __future__ import annotations

import os
import sys

EXIT_USER_ERROR = 2


class BearDsError(Exception):
    """Base of every error the tool raises about its input or run state."""


class ConfigError(BearDsError, ValueError):
    """A config problem; the message lists every offending key."""


class DataError(BearDsError, ValueError):
    """A problem with input data; the message names the file and line, or the key or id."""


class ModelInputError(BearDsError, ValueError):
    """A model, tokenizer or prompt that cannot be used as configured (names the key or value)."""


class RunStateError(BearDsError, RuntimeError):
    """An output folder's state forbids the command (earlier checkpoints, an unreadable log, ...)."""


class MissingPathError(BearDsError, FileNotFoundError):
    """A file or folder named by the config or the command line does not exist."""


class RunFolderError(BearDsError, FileExistsError):
    """The run folder is taken: another live run holds it, or it holds an earlier run's checkpoints."""


class UnwritableFolderError(BearDsError, PermissionError):
    """An output folder cannot be written (checked before any work)."""


class NotAFolderError(BearDsError, NotADirectoryError):
    """An output folder's path exists and is not a folder."""


class UnsafeCheckpointError(BearDsError, ValueError):
    """A checkpoint file is not what bear-ds writes (tampered, or from elsewhere); nothing of it was run."""


def one_line(err: BaseException) -> str:
    """The message on one line: a multi-line message (e.g. every bad config key) joined by '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


def report_user_error(prog: str, err: BearDsError) -> int:
    """Print `err` as one line on stderr and return the exit status 2 (re-raise with BEAR_DS_TRACEBACK=1)."""
    if os.environ.get("BEAR_DS_TRACEBACK"):
        raise err
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return EXIT_USER_ERROR


__all__ = [
    "EXIT_USER_ERROR",
    "BearDsError",
    "ConfigError",
    "DataError",
    "MissingPathError",
    "NotAFolderError",
    "RunFolderError",
    "UnsafeCheckpointError",
    "UnwritableFolderError",
    "ModelInputError",
    "RunStateError",
    "one_line",
    "report_user_error",
]
