"""Processes: how every command joins, uses and leaves a process group (no model or data knowledge).

`make_accelerator` / `end_distributed` are the one set-up and teardown of training, evaluation and
analysis; sharding and gathering use Accelerate's `split_between_processes` and `gather_object`.
Also: one-machine launch commands for tests and benchmarks, the one-process DeepSpeed environment.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import InitProcessGroupKwargs, gather_object
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from bear_ds.runtime import launcher_world_size


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
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch; deferred: DeepSpeed is heavy, needed only here)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def make_accelerator(
    deepspeed_config: dict[str, Any] | None,
    *,
    zero3_init: bool = False,
    timeout_s: int = 1800,
    **accelerator_kwargs: Any,
):
    """The one way bear_ds joins a process group (training, evaluation, analysis): an Accelerate
    `Accelerator`, with a DeepSpeed plugin when `deepspeed_config` is given (`zero3_init`: models
    created afterwards are partitioned as they are built or loaded).

    Works under plain python, torchrun, accelerate launch and the deepspeed launcher (the group is
    read from RANK, WORLD_SIZE, MASTER_ADDR, ...). Pair it with `end_distributed`.
    """
    if AcceleratorState._shared_state or PartialState._shared_state:
        # a command that ran earlier in this process without `end_distributed` (one that raised, or
        # the previous point of an in-process sweep) left its state, DeepSpeed plugin included
        # (Accelerate refuses a second one): start from a clean state, joining a new group if needed
        AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
        GradientState._reset_state()

    global _environment_before
    _environment_before = {k: v for k, v in os.environ.items() if _set_for_the_group(k)}
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world_size = launcher_world_size()
    plugin = None
    if deepspeed_config is not None:
        if "RANK" not in os.environ:  # plain `python -m ...`: a one-process DeepSpeed group
            ensure_single_process_env()
        if not on_cuda:
            stub_deepspeed_shm_op()
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config, zero3_init_flag=zero3_init)
    pg_kwargs = InitProcessGroupKwargs(backend="nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        # several CPU processes without DeepSpeed: Accelerate only sets up a group (MULTI_CPU) with
        # cpu=True; never with DeepSpeed, which cpu=True silently turns off
        cpu=plugin is None and not on_cuda and world_size > 1,
        # one process without DeepSpeed has no process group to configure
        kwargs_handlers=[pg_kwargs] if (plugin is not None or world_size > 1) else [],
        **accelerator_kwargs,
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the process group has {accelerator.num_processes} processes")
    return accelerator


def end_distributed(accelerator) -> None:
    """The one teardown, on every rank: wait for all, close trackers, leave the process group (a rank
    exiting while gloo still talks to it aborts the others), and forget Accelerate's process state
    and transformers' registered DeepSpeed config, so that a later command in this process (a
    sweep's analysis after its training) starts clean rather than loading models ZeRO-3 partitioned."""
    accelerator.wait_for_everyone()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        # through DeepSpeed, which then forgets the groups it cached: a later training in this
        # process (an in-process sweep's next point) would otherwise use the destroyed ones
        ds_comm.destroy_process_group()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    # Accelerate records its choices in the environment (ACCELERATE_USE_DEEPSPEED=true makes the next
    # Accelerator a DeepSpeed one); the one-process group wrote RANK, MASTER_PORT, ...: undo both
    if _environment_before is not None:
        for key in [k for k in os.environ if _set_for_the_group(k)]:
            if key not in _environment_before:
                del os.environ[key]
        os.environ.update(_environment_before)


def _set_for_the_group(key: str) -> bool:
    return key.startswith("ACCELERATE_") or key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


_environment_before: dict[str, str] | None = None  # the launcher's values, restored by end_distributed


def all_max(value: float) -> float:
    """The largest `value` over the ranks, on every rank."""
    return max(gather_object([value]))
