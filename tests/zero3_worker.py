"""For the 2-rank ZeRO-3 worker scripts of the tests: a tiny Llama built partitioned under
zero.Init, loaded with given weights, wrapped in a DeepSpeed engine (gloo, short timeout)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def partitioned_engine(llama_kwargs: dict[str, Any], weights_path: str) -> tuple[Any, int, bool]:
    """(engine, rank, partitioned): rank 0's copy of `weights_path` scattered into the partitions;
    `partitioned` says every parameter was really partitioned (no full copy on a rank)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from bear_ds.distributed import stub_deepspeed_shm_op

    stub_deepspeed_shm_op()  # the C++ shared-memory op serves inference all-reduce only (25-42 s to build)
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=40))
    rank = dist.get_rank()
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = LlamaForCausalLM._from_config(LlamaConfig(**llama_kwargs))
    reference = torch.load(weights_path)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(reference[name])
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine, rank, partitioned
