"""Process-wide settings, made by the entry points when a command starts (never at import).

`configure_logging`: rank 0 shows bear_ds's INFO messages on stderr (the others only errors), so
`bear-ds analyze` or `bear-ds sweep` report progress without a training having configured logging.
`run_scope`: the warnings filter and environment variables a run sets, undone when it ends.
`exit_process`: how every entry point ends (one rank of several skips interpreter finalization).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def launcher_rank() -> int:
    """This process's global rank as a launcher (torchrun, accelerate, deepspeed) set it; 0 outside one."""
    return int(os.environ.get("RANK", "0") or 0)


def launcher_world_size() -> int:
    """The number of ranks a launcher started (WORLD_SIZE); 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def configure_logging(rank: int | None = None) -> None:
    """Root handler on stderr (WARNING for other libraries); bear_ds at INFO on rank 0, ERROR elsewhere
    (the other ranks would repeat every line)."""
    rank = launcher_rank() if rank is None else rank
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("bear_ds").setLevel(logging.INFO if rank == 0 else logging.ERROR)


@contextmanager
def run_scope() -> Iterator[None]:
    """Around one command: warnings it silences and environment variables it sets (DS_ACCELERATOR,
    a one-process group's RANK/MASTER_PORT, ...) do not outlive it."""
    saved_env = dict(os.environ)
    with warnings.catch_warnings():
        # DeepSpeed 0.19 calls torch.distributed collectives torch 2.13 deprecates: one warning per call
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
        try:
            yield
        finally:
            for key in set(os.environ) - set(saved_env):
                del os.environ[key]
            os.environ.update(saved_env)


def exit_process(code: int) -> NoReturn:
    """End an entry point with exit status `code` after its command returned.

    A rank that a launcher started among several (WORLD_SIZE > 1) flushes its output and leaves with
    `os._exit`, skipping interpreter finalization. In a clean-clone CI run, rank 1 of a two-rank
    ZeRO-3 evaluation aborted there once ("terminate called without an active exception", exit -6)
    after the results were gathered and written, which failed the whole launch (16 local runs did
    not repeat it). The likely cause: objects that outlive the destroyed process group (a ZeRO-3
    model's parameters refer to it) are freed during finalization, which gloo's C++ threads do
    not survive. Every command has already left its process group and closed its files and
    trackers (`end_distributed`).
    """
    if launcher_world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
