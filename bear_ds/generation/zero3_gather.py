"""Decoding with ZeRO-3 partitioned weights: gathered once for a whole search, or per step.

Under ZeRO-3 DeepSpeed's module hooks all-gather each submodule's weights at every forward and free
them after, so a beam search gathers the whole model at its prefill, at each decoding step and at
every dummy forward of a rank that has run out of users. `decoding_weights` instead gathers the full
weights once (`deepspeed.zero.GatheredParameters`) and takes the hooks off the modules for the
duration, as DeepSpeed's own `unwrap_model_for_generation` (and TRL's) do; the start-of-forward hook
goes too, since its trace check is a collective and ranks now run unequal numbers of forwards. The
search then runs on a plain full model, each rank on its own (no synced steps); on exit the hooks
are put back (DeepSpeed then records its prefetch trace again at the next forward) and the weights
partitioned again.

That needs the whole model in memory beside its partition: `eval.gather=auto` gathers once when
the full model's bytes take at most half of the memory free on the device (the other half is left
to the search's KV cache and logits), on every rank, else it keeps the per-step gathering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from bear_ds.models import full_numel, is_zero3_partitioned, unwrap_model

GATHER_MODES = ("auto", "once", "per_step")
FREE_MEMORY_SHARE = 0.5  # of the free memory the gathered model may take (auto)


def full_model_bytes(net: torch.nn.Module) -> int:
    """Bytes of every parameter in full (a ZeRO-3 partition counts as its whole tensor)."""
    return sum(full_numel(p) * p.element_size() for p in net.parameters())


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on `device`: on CUDA the driver's free memory plus
    what PyTorch's allocator holds unused; on CPU the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil  # deferred: a DeepSpeed dependency, needed only here

    return int(psutil.virtual_memory().available)


def _on_every_rank(fits: bool, device: torch.device) -> bool:
    """True when `fits` holds on every rank (all must choose alike: a gather is collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fits
    flag = torch.tensor([1 if fits else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def choose_gather(mode: str, net: torch.nn.Module, device: torch.device) -> str:
    """`once` or `per_step` for eval.gather=`mode` (auto: once when the full model fits on every
    rank; collective then, so every rank must call it)."""
    if mode not in GATHER_MODES:
        raise ValueError(f"eval.gather={mode!r}: expected one of {', '.join(GATHER_MODES)}")
    if mode != "auto":
        return mode
    fits = full_model_bytes(net) <= FREE_MEMORY_SHARE * free_memory_bytes(device)
    return "once" if _on_every_rank(fits, device) else "per_step"


def zero3_hook_owner(model: Any) -> Any:
    """DeepSpeed's object that registered the ZeRO-3 module hooks of the engine `model`
    (`DeepSpeedZeRoOffload`: the optimizer's `parameter_offload`, or the engine's optimizer itself
    when it was built without one)."""
    optimizer = getattr(model, "optimizer", None)
    owner = getattr(optimizer, "parameter_offload", optimizer)
    if owner is None or not hasattr(owner, "forward_hooks") or not hasattr(owner, "fwd_pre_hook"):
        raise TypeError(
            f"{type(model).__name__} is not a ZeRO-3 DeepSpeed engine: gathering its weights once needs "
            "the engine (pass the prepared model, not the module inside it), or use eval.gather=per_step"
        )
    return owner


@contextlib.contextmanager
def _hooks_removed(owner: Any) -> Iterator[None]:
    """Without DeepSpeed's ZeRO-3 module hooks inside; registered again on exit."""
    root = owner.module
    start_id = owner.fwd_pre_hook.id
    start_hook = root._forward_pre_hooks.pop(start_id)  # resets the step; its trace check is collective
    for handle in [*owner.forward_hooks, *owner.backward_hooks]:
        handle.remove()
    owner.forward_hooks, owner.backward_hooks = [], []
    try:
        yield
    finally:
        owner._register_deepspeed_module(root)  # what DeepSpeed's unwrap_model_for_generation calls
        root._forward_pre_hooks[start_id] = start_hook
        root._forward_pre_hooks.move_to_end(start_id, last=False)  # first, as it was registered


@contextlib.contextmanager
def decoding_weights(model: Any, mode: str, device: torch.device) -> Iterator[str | None]:
    """Around a search or an evaluation: yields the gathering that runs (None: not partitioned).

    `once`: the weights of the ZeRO-3 engine `model` gathered in full on every rank and its hooks
    off inside (forwards are then local: the search needs no synced steps); `per_step`: nothing
    changes (every forward gathers). Collective for a partitioned model: every rank enters together.
    """
    net = unwrap_model(model)
    if not is_zero3_partitioned(net):
        yield None
        return
    chosen = choose_gather(mode, net, device)
    if chosen == "per_step":
        yield chosen
        return
    owner = zero3_hook_owner(model)
    import deepspeed  # deferred: DeepSpeed is heavy and needed only for partitioned models

    with deepspeed.zero.GatheredParameters(list(net.parameters())), _hooks_removed(owner):
        yield chosen


__all__ = ["GATHER_MODES", "choose_gather", "decoding_weights", "free_memory_bytes", "full_model_bytes"]
