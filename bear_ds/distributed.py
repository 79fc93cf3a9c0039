"""Process-level helpers shared by the trainer and the evaluator (no model or data knowledge)."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A free TCP port on the loopback interface (for a one-process rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run` for `nproc` local processes on a free loopback port, then `args`
    (a script path or `-m module`, and its arguments): the one-machine launch of tests and benchmarks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip


def ensure_single_process_env() -> None:
    """Outside any launcher, describe a one-process group in the environment, as launchers do,
    so that DeepSpeed can initialise; values a launcher set are kept."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def stub_deepspeed_shm_op() -> None:
    """On CPU, skip building DeepSpeed's shared-memory all-reduce op (25-42 s of C++ compilation).

    It serves inference all-reduce only; without it DeepSpeed falls back to torch.distributed.
    The attribute must be replaced on the module object in sys.modules: `import deepspeed.comm.torch`
    resolves to the `torch` re-export instead.
    """
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
