"""Accelerator construction: which DeepSpeed config, how the batch splits, the process group.

Three ways in, one result:
- `accelerate launch --config_file launchers/accelerate/X.yaml`: the yaml names a DeepSpeed JSON
  (ACCELERATE_DEEPSPEED_CONFIG_FILE) and the ZeRO-3 init flag; its stage wins over train.zero_stage.
- `deepspeed ...` / `torchrun ...` / plain `python -m bear_ds.train`: ds_configs/zero{train.zero_stage}.json
  (or train.ds_config); train.zero_stage=0 means no DeepSpeed (plain DDP or one process).
In both cases the JSON's "auto" values are filled here from the `train` section (micro batch,
accumulation, clipping, bf16), because we feed batches ourselves and Accelerate could only infer
them from a prepared DataLoader.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from bear_ds.config import TrainConfig
from bear_ds.distributed import ensure_single_process_env, stub_deepspeed_shm_op

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's `global_batch` examples split over ranks and accumulation."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def micro_batches_per_step(self) -> int:
        return self.world_size * self.accumulation


def batch_plan(train_cfg: TrainConfig, world_size: int) -> BatchPlan:
    """accumulation = global_batch / (micro_batch x world_size); an error names the keys if not whole.

    Results do not depend on the number of ranks: a step always consumes the same global_batch
    examples cut into the same micro-batches; only which rank runs which micro-batch changes.
    """
    per_step = train_cfg.micro_batch * world_size
    if train_cfg.global_batch % per_step:
        raise ValueError(
            f"train.global_batch={train_cfg.global_batch} is not divisible by train.micro_batch={train_cfg.micro_batch} "
            f"x world size {world_size} = {per_step}; change train.global_batch or train.micro_batch"
        )
    return BatchPlan(train_cfg.global_batch, train_cfg.micro_batch, world_size, train_cfg.global_batch // per_step)


def _fill_auto(node: dict[str, Any], values: dict[str, Any], path: str = "") -> None:
    for key, value in node.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict):
            _fill_auto(value, values, dotted + ".")
        elif value == "auto":
            if dotted not in values:
                raise ValueError(f"DeepSpeed config key {dotted} is 'auto' but bear_ds has no value for it")
            node[key] = values[dotted]


def deepspeed_config(path: str | Path, train_cfg: TrainConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` with its "auto" values filled from the `train` section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist (train.ds_config or the accelerate yaml)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"DeepSpeed config {path}: invalid JSON: {exc}") from exc
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(
            f"DeepSpeed config {path} has an optimizer/scheduler block: bear_ds passes its own AdamW and schedule "
            "(train.lr, train.schedule); remove the block"
        )
    _fill_auto(
        config,
        {
            "train_batch_size": plan.global_batch,
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.accumulation,
            "gradient_clipping": train_cfg.grad_clip,
            "bf16.enabled": train_cfg.precision == "bf16",
            "fp16.enabled": False,
            "zero_optimization.stage": train_cfg.zero_stage,
        },
    )
    for key, want in (
        ("train_batch_size", plan.global_batch),
        ("train_micro_batch_size_per_gpu", plan.micro_batch),
        ("gradient_accumulation_steps", plan.accumulation),
    ):
        if key in config and config[key] != want:
            raise ValueError(
                f"DeepSpeed config {path}: {key}={config[key]} disagrees with train.global_batch/micro_batch "
                f'(needs {want}); set it to "auto"'
            )
    return config


def launched_with_accelerate_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_ds_config_path(train_cfg: TrainConfig) -> Path | None:
    """The DeepSpeed JSON to use, or None for no DeepSpeed (train.zero_stage=0 outside accelerate)."""
    if launched_with_accelerate_deepspeed():
        from_yaml = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if from_yaml and from_yaml != "none":
            return Path(from_yaml)
    if train_cfg.ds_config:
        return Path(train_cfg.ds_config)
    if train_cfg.zero_stage == 0:
        return None
    return DS_CONFIG_DIR / f"zero{train_cfg.zero_stage}.json"


def build_accelerator(train_cfg: TrainConfig, project_dir: str | Path | None = None):
    """The Accelerator (DeepSpeed plugin when a ZeRO stage applies), its batch plan and ZeRO stage.

    Must run before the model is built so that ZeRO-3 partitions the model on creation.
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    if AcceleratorState._shared_state or PartialState._shared_state:
        # a training that ran earlier in this process (the previous point of an in-process sweep) left
        # its state, DeepSpeed plugin included (Accelerate refuses a second one), and destroyed its
        # process group on the way out: start from a clean state, joining a new group if needed
        AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
        GradientState._reset_state()

    # DeepSpeed 0.19 calls torch.distributed collectives torch 2.13 deprecates: one warning per call
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world_size = world_size_from_env()
    plan = batch_plan(train_cfg, world_size)
    ds_path = resolve_ds_config_path(train_cfg)
    plugin = None
    zero_stage = 0
    if ds_path is not None:
        if "RANK" not in os.environ:  # plain `python -m bear_ds.train`: a one-process DeepSpeed group
            ensure_single_process_env()
        if not on_cuda:
            stub_deepspeed_shm_op()
        config = deepspeed_config(ds_path, train_cfg, plan)
        zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        zero3_init = zero_stage == 3
        if launched_with_accelerate_deepspeed():
            zero3_init = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true").lower() == "true" and zero_stage == 3
        plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=zero3_init)
    pg_kwargs = InitProcessGroupKwargs(
        backend="nccl" if on_cuda else "gloo", timeout=timedelta(seconds=train_cfg.pg_timeout_s)
    )
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        # several CPU processes without DeepSpeed: Accelerate only sets up DDP (MULTI_CPU) with cpu=True;
        # never with DeepSpeed, which cpu=True silently turns off
        cpu=plugin is None and not on_cuda and world_size > 1,
        gradient_accumulation_steps=plan.accumulation,
        mixed_precision="bf16" if train_cfg.precision == "bf16" else "no",
        # one process without DeepSpeed has no process group to configure
        kwargs_handlers=[pg_kwargs] if (plugin is not None or world_size > 1) else [],
        log_with="tensorboard" if _tensorboard_available() and project_dir is not None else None,
        project_dir=str(project_dir) if project_dir is not None else None,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimiser step
    )
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard")
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the process group has {accelerator.num_processes} processes")
    return accelerator, plan, zero_stage


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def is_zero3(model) -> bool:
    """True when the (prepared) model's parameters are ZeRO-3 partitioned."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
