"""Accelerator construction: which DeepSpeed config, how the batch splits, the process group.

Three ways in, one result:
- `accelerate launch --config_file launchers/accelerate/X.yaml`: the yaml names a DeepSpeed JSON
  (ACCELERATE_DEEPSPEED_CONFIG_FILE) and the ZeRO-3 init flag; its stage wins over train.zero_stage.
- `deepspeed ...` / `torchrun ...` / plain `python -m bear_ds.train`: bear_ds/ds_configs/zero{train.zero_stage}.json
  (or train.ds_config); train.zero_stage=0 means no DeepSpeed (plain DDP or one process).
In both cases the JSON's "auto" values are filled here from the `train` section (micro batch,
accumulation, clipping, bf16) and ZeRO's bucket sizes from the model's hidden size, because we feed batches ourselves and Accelerate could only infer
them from a prepared DataLoader.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bear_ds.config import TrainConfig
from bear_ds.distributed import make_accelerator
from bear_ds.errors import ConfigError, MissingPathError
from bear_ds.memory import zero_bucket_sizes
from bear_ds.runtime import launcher_world_size

# package data, so an installed wheel finds them too (the checkout's ds_configs/ links to this folder)
DS_CONFIG_DIR = Path(str(resources.files("bear_ds") / "ds_configs"))


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
        raise ConfigError(
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
                raise ConfigError(f"DeepSpeed config key {dotted} is 'auto' but bear_ds has no value for it")
            node[key] = values[dotted]


def deepspeed_config(
    path: str | Path, train_cfg: TrainConfig, plan: BatchPlan, hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` with its "auto" values filled from the `train` section, and
    ZeRO's bucket sizes from the model's hidden size (`bear_ds.memory.zero_bucket_sizes`)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"DeepSpeed config {path} does not exist (train.ds_config or the accelerate yaml)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path}: invalid JSON: {exc}") from exc
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(
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
            **{f"zero_optimization.{k}": v for k, v in zero_bucket_sizes(hidden_size).items()},
        },
    )
    for key, want in (
        ("train_batch_size", plan.global_batch),
        ("train_micro_batch_size_per_gpu", plan.micro_batch),
        ("gradient_accumulation_steps", plan.accumulation),
    ):
        if key in config and config[key] != want:
            raise ConfigError(
                f"DeepSpeed config {path}: {key}={config[key]} disagrees with train.global_batch/micro_batch "
                f'(needs {want}); set it to "auto"'
            )
    return config


def launched_with_accelerate_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


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


def build_accelerator(train_cfg: TrainConfig, project_dir: str | Path | None = None, hidden_size: int | None = None):
    """The training Accelerator (DeepSpeed plugin when a ZeRO stage applies), its batch plan and ZeRO stage.

    Must run before the model is built so that ZeRO-3 partitions the model on creation; hence the
    model's hidden size (ZeRO's bucket sizes) is passed in, read from the model config.
    """
    plan = batch_plan(train_cfg, launcher_world_size())
    ds_path = resolve_ds_config_path(train_cfg)
    config, zero_stage, zero3_init = None, 0, False
    if ds_path is not None:
        config = deepspeed_config(ds_path, train_cfg, plan, hidden_size)
        zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        zero3_init = zero_stage == 3
        if launched_with_accelerate_deepspeed():
            zero3_init = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true").lower() == "true" and zero_stage == 3
    accelerator = make_accelerator(
        config,
        zero3_init=zero3_init,
        timeout_s=train_cfg.pg_timeout_s,
        gradient_accumulation_steps=plan.accumulation,
        mixed_precision="bf16" if train_cfg.precision == "bf16" else "no",
        log_with=_tracker(train_cfg.report_to) if project_dir is not None else None,
        project_dir=str(project_dir) if project_dir is not None else None,
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimiser step
    )
    if accelerator.log_with:  # tensorboard: OUT/tensorboard; wandb: a run named after OUT in project bear_ds
        name = "tensorboard" if train_cfg.report_to == "tensorboard" else "bear_ds"
        accelerator.init_trackers(name, init_kwargs={"wandb": {"name": Path(project_dir).name}})
    return accelerator, plan, zero_stage


def _tracker(report_to: str) -> str | None:
    """train.report_to as Accelerate's `log_with`; a tracker that is not installed is an error, not skipped."""
    if report_to == "none":
        return None
    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[report_to]
    if all(importlib.util.find_spec(m) is None for m in modules):
        raise ConfigError(
            f"train.report_to={report_to} but {modules[0]} is not installed: pip install 'bear_ds[{report_to}]'"
        )
    return report_to
