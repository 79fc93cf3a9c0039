"""The training recipe: a `Trainer` with an explicit `TrainState`, in a torchtune recipe's shape.

    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train \
        data.path=PREPARED model.name=tiny loss.name=bear train.max_steps=12 train.save_every=6 output_dir=OUT

    Trainer.setup()            accelerator, data + tokenizer + catalog, model (partitioned on creation
                               under ZeRO-3), optimiser and schedule, resume, the per-epoch evaluator
    Trainer.run_epochs()       epochs; epoch E runs the steps of `epoch_schedule(seed, epoch=E)`
      .optimizer_step(...)     forward/backward of this rank's micro-batches, optimiser step, log record
        micro_batch_loss(...)  the loss of one micro-batch (`loss_table.py`; adding a loss: `loss_api.py`)
      .epoch_end()             evaluate valid (+ test), select the best epoch, export it; then a checkpoint
    Trainer.finish()           final export, summary.json, leave the process group together

One optimiser step consumes `train.global_batch` examples cut into micro-batches of
`train.micro_batch`, spread over ranks and accumulation rounds (see `batching.py`). Every
micro-batch loss is normalised within the micro-batch (as the released BEAR does); the step's
gradient is their mean, so it does not depend on the number of ranks. A checkpoint records
(step, epoch, step within the epoch); a resumed run recomputes that epoch's schedule and so
continues with exactly the batches the uninterrupted run would have used.

Extension points (details in `bear_ds/training/loss_api.py`):
- a new loss: `register_loss(name, compute, extra_metrics=..., setup=...)`, where `compute(model,
  batch, ctx)` is a context manager yielding a `MicroBatchLoss`; the trainer runs the backward
  inside it and never needs editing;
- per-step metrics of a loss: (numerator, denominator) pairs in `MicroBatchLoss.extras`, named in
  `extra_metrics`; they are added over micro-batches and ranks and logged as their ratio in
  `train_log.jsonl` next to the LossSums metrics (ce, counted, positions, frac_outside_topb, ...).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from bear_ds.catalog import Catalog
from bear_ds.config import Config, ConfigError, save_config
from bear_ds.data import PromptBuilder, load_catalog, load_stats, load_train_split, resolve_prepared
from bear_ds.distributed import end_distributed
from bear_ds.errors import BearDsError
from bear_ds.folders import check_output_dir
from bear_ds.locks import RunFolderBusyError, RunFolderLock
from bear_ds.memory import TrainingShape, checkpointing_needed
from bear_ds.models import (
    build_model,
    enable_activation_checkpointing,
    full_numel,
    is_zero3_partitioned,
    model_hidden_size,
    pretrained_folder,
)
from bear_ds.outputs import write_json_atomic
from bear_ds.runtime import launcher_rank, launcher_world_size
from bear_ds.training.accelerator import build_accelerator
from bear_ds.training.batching import epoch_schedule, padded_fraction, rank_micro_batches
from bear_ds.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from bear_ds.training.epochs import (
    EpochEvaluator,
    check_select_metric,
    metric_text,
    read_export_info,
    selected_epoch_summary,
    write_test_ranks,
)
from bear_ds.training.examples import EncodedExamples, encode_training_examples
from bear_ds.training.export import export_model
from bear_ds.training.host_syncs import count_host_syncs, not_counted
from bear_ds.training.loss_api import LossContext, MicroBatch
from bear_ds.training.loss_table import loss_spec
from bear_ds.training.mfu import FlopModel, mean_mfu, mfu, peak_flops
from bear_ds.training.micro_batch import StepTotals, load_micro_batch, micro_batch_loss
from bear_ds.training.run_folder import (
    SUMMARY_FILE,
    check_launch,
    finished_run_summary,
    model_is_selected_epoch,
    record_resume,
)
from bear_ds.training.run_tokenizer import check_resumed_tokenizer, prepare_tokenizer
from bear_ds.training.train_log import JsonlLog, ProgressBar

logger = logging.getLogger(__name__)


class NonFiniteLossError(BearDsError, FloatingPointError):
    """A micro-batch produced a NaN/inf loss and train.on_nonfinite=stop."""


def _schedule(name: str, optimizer, warmup: int, total: int):
    kind = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _optimizer(cfg: Config, model):
    """Client AdamW over the trainable parameters (no DeepSpeed optimizer block: no fused_adam JIT).

    With a ZeRO-Offload config, Accelerate swaps it for DeepSpeed's CPU Adam at `prepare`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (model.lora.target_modules matched nothing?)")
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


# ---------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where the run stands: what a checkpoint's `trainer_state.json` records and a resume restores."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # the epoch the next step belongs to
    step_in_epoch: int = 0  # steps of that epoch done
    counters: dict[str, Any] = field(default_factory=lambda: {"skipped_micro_batches": 0, "left_out_per_epoch": 0})

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        state = cls(step=saved["step"], epoch=saved["epoch"], step_in_epoch=saved["step_in_epoch"])
        state.counters.update(saved.get("counters", {}))
        return state

    def to_checkpoint(self, world_size: int, zero_stage: int, elapsed_s: float) -> dict[str, Any]:
        """`trainer_state.json` (`save_checkpoint` adds "step")."""
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "world_size": world_size,
            "zero_stage": zero_stage, "counters": {**self.counters, "elapsed_s": elapsed_s},
        }  # fmt: skip

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0


@dataclass
class TrainingData:
    """The prepared data as the trainer uses it (tokenised once, on every rank)."""

    prepared: Path
    titles: dict[str, str]
    builder: Any  # PromptBuilder
    tokenizer: Any
    catalog: Any  # Catalog
    examples: EncodedExamples | None = None  # encoded once the model's context length is known
    max_length: int = 10**9


# ---------------------------------------------------------------------------------------- trainer
class Trainer:
    """setup() -> run_epochs() -> finish(): one run, in the shape of a torchtune recipe.

    `run_epochs` runs epochs; an epoch runs `optimizer_step`s over its own schedule
    (`epoch_schedule(seed, epoch)`); after its last step come `epoch_end` (evaluate valid/test,
    select, export the best) and a checkpoint. The loss of each micro-batch is `micro_batch_loss`.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, data, model (partitioned on creation under ZeRO-3), optimiser, resume, evaluator."""
        self.t_start = time.time()
        self.loss = loss_spec(self.cfg.loss.name)  # an unknown loss.name is refused before any work
        if self.cfg.train.eval_every_epoch:
            check_select_metric(self.cfg)
        # check first, write after: the folder's kind, the lock, then a refused launch or resume, before config.yaml
        check_output_dir(self.out, "train")
        lock_error = self._lock_run_folder()
        self.checkpoint = latest_checkpoint(self.out)
        self.resume_changes = check_launch(self.out, self.cfg, self.checkpoint)  # the same on every rank
        self.finished = finished_run_summary(self.out, self.checkpoint)
        if self.finished is not None:  # this very run, finished, no checkpoint: nothing is changed
            logger.info("%s: this run finished already (%s, %d steps; no checkpoints): nothing to train",
                        self.out, SUMMARY_FILE, self.finished["steps"])  # fmt: skip
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator, self.plan, self.zero_stage = build_accelerator(
            self.cfg.train, self.out, hidden_size=model_hidden_size(self.cfg.model)
        )
        self.main = self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        if _main_decides(self.accelerator, lock_error is not None):  # every rank leaves, none waits
            raise lock_error or RunFolderBusyError(f"output_dir {self.out} is in use by another run (see rank 0)")
        if self.main:  # logging is configured by the entry points (bear_ds.runtime), not here
            save_config(self.cfg, self.out)
        self.data = self._load_data()
        self._build_model()
        self.train_log = JsonlLog(self.out / "train_log.jsonl", self.main)
        self.epochs_log = JsonlLog(self.out / "epochs.jsonl", self.main)
        self._restore_or_start()
        self.evaluate = self._epoch_evaluator()
        self.bar = ProgressBar(self.total_steps, self.state.step, self.main)
        self.elapsed_before = float(self.state.counters.get("elapsed_s", 0.0))
        self.t_run = time.time()

    def _lock_run_folder(self) -> RunFolderBusyError | None:
        """One process per run (global rank 0) takes OUT/.lock. In one process a busy folder is
        refused at once; with several ranks the error is returned and raised by all ranks together
        once the process group exists, so that none waits for a rank that has left."""
        self.lock = RunFolderLock(self.out)
        if launcher_rank() != 0:
            return None
        try:
            self.lock.acquire()
        except RunFolderBusyError as err:
            if launcher_world_size() == 1:
                raise
            return err
        return None

    def release(self) -> None:
        """Give up OUT/.lock (also released by the kernel when the process ends, however it ends)."""
        self.lock.release()

    def _load_data(self) -> TrainingData:
        """Prepared data, tokenizer, catalog: rank 0 writes what is shared, the others then read it."""
        cfg = self.cfg
        with self.accelerator.main_process_first():
            prepared = resolve_prepared(cfg, self.out / "data")
            self.model_folder = pretrained_folder(cfg.model)
        builder = PromptBuilder(cfg.prompt, cfg.data.domain or load_stats(prepared).get("domain"))
        titles = load_catalog(prepared)
        self.rows, self.train_data = load_train_split(prepared, cfg.data)  # data.train_sample applied
        prompts = (
            [builder.prompt([titles[i] for i in h]) for h in self.rows["history"]] if self.model_folder is None else []
        )
        resuming = cfg.train.resume == "auto" and self.checkpoint is not None
        if resuming and self.model_folder is None and not cfg.tokenizer.path:
            # every rank, before rank 0 writes anything: a refusal inside main_process_first would
            # leave the other ranks waiting for rank 0
            check_resumed_tokenizer(self.out / "tokenizer", [*titles.values(), *prompts], cfg.tokenizer.vocab_size)
        with self.accelerator.main_process_first():
            tokenizer = prepare_tokenizer(cfg, self.out, self.model_folder, titles, prompts, resuming)
        catalog = Catalog.build(titles, tokenizer, builder)
        return TrainingData(prepared, titles, builder, tokenizer, catalog)

    def _build_model(self) -> None:
        """Model, the examples fitted to its context, optimiser, schedule, all `accelerator.prepare`d."""
        cfg, data = self.cfg, self.data
        set_seed(cfg.train.seed)
        self.use_deepspeed = self.accelerator.state.deepspeed_plugin is not None
        # DeepSpeed bf16 keeps fp32 master weights itself; without it, fp32 weights + Accelerate's bf16 autocast
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" and self.use_deepspeed else torch.float32
        model = build_model(cfg.model, data.tokenizer, dtype=dtype, folder=self.model_folder)
        data.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
        data.examples = encode_training_examples(
            self.rows["history"], self.rows["target"], data.titles, data.catalog, data.tokenizer, data.builder,
            max_length=data.max_length, truncate_history=cfg.train.truncate_history,
            # S-DPO puts every title after a prompt (its negatives): room for the longest, as evaluation
            response_room=data.catalog.trie.max_depth if cfg.loss.name == "sdpo" else None,
        )  # fmt: skip
        self.gradient_checkpointing = self._activation_checkpointing(model)
        self.steps_per_epoch = len(data.examples.lengths) // self.plan.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(data.examples.lengths)} training examples < train.global_batch={self.plan.global_batch}"
            )
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        optimizer = _optimizer(cfg, model)
        scheduler = _schedule(cfg.train.schedule, optimizer, cfg.train.warmup_steps, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.flop_model = FlopModel.of(self.model)
        self.peak_flops = peak_flops(self.device, cfg.train.precision, cfg.train.peak_flops)
        self.loss_ctx = LossContext(
            cfg, data.catalog.trie.to(self.device), data.catalog, data.tokenizer, data.examples,
            zero3=is_zero3_partitioned(self.model), train_rows=self.rows, accelerator=self.accelerator,
        )  # fmt: skip
        if self.loss.setup is not None:
            self.loss_ctx.loss_state = self.loss.setup(self.model, self.loss_ctx)

    def _activation_checkpointing(self, model) -> bool:
        """model.gradient_checkpointing, with auto decided from the memory estimate (bear_ds/memory.py)
        for the longest training example; enables it on `model` when auto says on."""
        setting = self.cfg.model.gradient_checkpointing
        if setting != "auto":
            return bool(setting)
        sizes = [full_numel(p) for p in model.parameters()]  # ZeRO-3: full sizes
        trainable = sum(n for n, p in zip(sizes, model.parameters(), strict=True) if p.requires_grad)
        config = model.config
        shape = TrainingShape(
            params=sum(sizes), trainable=trainable, largest_layer=max(sizes), hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers), vocab=int(config.vocab_size), micro_batch=self.plan.micro_batch,
            seq_len=int(self.data.examples.lengths.max()), zero_stage=self.zero_stage, world_size=self.world,
            chunk_size=self.cfg.loss.chunk_size,
        )  # fmt: skip
        device_bytes = (
            torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        )
        needed = checkpointing_needed(shape, device_bytes)
        if needed:
            enable_activation_checkpointing(model)
        if self.main:
            logger.info(
                "model.gradient_checkpointing=auto: %s (memory estimate, bear_ds/memory.py)", "on" if needed else "off"
            )
        return needed

    def _restore_or_start(self) -> None:
        """train.resume=auto continues from the newest complete checkpoint; a fresh run starts fresh logs."""
        checkpoint = self.checkpoint  # a launch that would mix two runs' checkpoints was refused in setup
        if self.cfg.train.resume == "auto" and checkpoint is not None:
            self.state = TrainState.from_checkpoint(load_checkpoint(self.accelerator, checkpoint))
            self.train_log.truncate_after(self.state.step)
            self.epochs_log.truncate_after(self.state.step)
            if self.main:
                logger.info("resumed from %s: step %d, epoch %d, step %d of the epoch", checkpoint,
                            self.state.step, self.state.epoch, self.state.step_in_epoch)  # fmt: skip
                record_resume(self.out, self.state.step, self.resume_changes)
        elif self.main:
            for path in (self.train_log.path, self.epochs_log.path):
                path.unlink(missing_ok=True)
        if self.main:
            examples, plan = self.data.examples, self.plan
            logger.info(
                "world size %d, ZeRO stage %d, global batch %d = micro %d x accumulation %d x %d ranks; "
                "%d examples, %d steps per epoch, %d steps; prompts truncated: %d (%d history items)",
                self.world, self.zero_stage, plan.global_batch, plan.micro_batch, plan.accumulation, self.world,
                len(examples.lengths), self.steps_per_epoch, self.total_steps, examples.truncated_examples,
                examples.truncated_items,
            )  # fmt: skip

    def _epoch_evaluator(self) -> EpochEvaluator | None:
        if not self.cfg.train.eval_every_epoch:
            return None
        data = self.data
        evaluate = EpochEvaluator(
            self.cfg, data.prepared, data.titles, data.builder, data.catalog, data.tokenizer, data.max_length
        )
        if not evaluate.splits["valid"][0]:
            if self.main:
                logger.warning(
                    "%s/valid.parquet has no rows: no per-epoch evaluation or epoch selection", data.prepared
                )
            return None
        return evaluate

    # ------------------------------------------------------------------------------------ train
    def run_epochs(self) -> None:
        """Epochs until train.max_steps or train.epochs; each epoch draws its own batch order."""
        while self.state.step < self.total_steps:
            self.train_epoch()
        self.bar.close()

    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it unless resumed inside it), up to the run's last step."""
        state, train_cfg = self.state, self.cfg.train
        schedule = epoch_schedule(
            self.data.examples.lengths, global_batch=self.plan.global_batch, micro_batch=self.plan.micro_batch,
            seed=train_cfg.seed, epoch=state.epoch, length_bucket=train_cfg.length_bucket,
        )  # fmt: skip
        state.counters["left_out_per_epoch"] = schedule.left_out
        if self.loss.epoch_start is not None:
            self.loss.epoch_start(self.model, self.loss_ctx, state.epoch, state.step)
        self.model.train()
        while state.step_in_epoch < len(schedule.steps) and state.step < self.total_steps:
            self.log_step(self.optimizer_step(schedule.steps[state.step_in_epoch]))
            if state.step_in_epoch == len(schedule.steps):
                # evaluate before the checkpoint, so a resume never skips it; a partial last epoch
                # (train.max_steps) is not evaluated
                self.epoch_end()
                state.next_epoch()
                self.save_checkpoint()
                return
            if state.step == self.total_steps or (train_cfg.save_every and state.step % train_cfg.save_every == 0):
                self.save_checkpoint()
        if state.step_in_epoch >= len(schedule.steps):  # resumed exactly at an epoch's end
            state.next_epoch()

    def optimizer_step(self, step_micro_batches: list[np.ndarray]) -> dict[str, Any]:
        """Forward and backward of this rank's micro-batches of the step, the optimiser and schedule
        step; returns the step's log record (losses reduced over every micro-batch and rank)."""
        t_step = time.time()
        state, accelerator = self.state, self.accelerator
        totals = StepTotals(self.device, self.loss.extra_metrics)
        self.step_timings: dict[str, float] = {}  # the losses' named phases, summed over this rank's micro-batches
        unchecked: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # on_nonfinite=stop: checked after the step
        grad_norm = None
        micro_batches = rank_micro_batches(step_micro_batches, self.rank, self.world)
        with count_host_syncs() as syncs:  # logging (the reads below) excluded
            for round_index, indices in enumerate(micro_batches):
                norm = self._micro_step(round_index, indices, totals, unchecked)
                grad_norm = norm if norm is not None else grad_norm  # `or` would read the tensor
            if unchecked:
                _stop_on_nonfinite(accelerator, unchecked, state.step)
        if not accelerator.sync_gradients:
            raise RuntimeError(
                f"step {state.step + 1}: accumulation out of sync ({self.plan.accumulation} rounds expected per step)"
            )
        if self.use_deepspeed:  # the engine clipped and stepped inside the last backward
            grad_norm = self.model.get_global_grad_norm()
        lr_used = float(self.scheduler.get_last_lr()[0])
        self.scheduler.step()  # a client schedule: Accelerate steps it only here (step_scheduler_with_optimizer=False)
        state.step += 1
        state.step_in_epoch += 1
        means = totals.reduce(accelerator, self.cfg)
        step_time = time.time() - t_step
        # optimisation time alone (no evaluation, checkpoint or export): what BEAR/MSL cost ratios use
        state.counters["optim_time_s"] = state.counters.get("optim_time_s", 0.0) + step_time
        examples = self.data.examples
        lengths = examples.lengths[np.concatenate(step_micro_batches)]  # every rank's examples of the step
        responses = sum(len(examples.response_states[i]) for m in step_micro_batches for i in m)
        flops = self.flop_model.step_flops(lengths, responses)
        return {
            "step": state.step,
            "epoch": state.epoch + state.step_in_epoch / self.steps_per_epoch,
            **means,  # loss, then the loss's own metrics (ce, counted, positions, ...)
            "lr": lr_used,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": step_time,
            **{f"{name}_time_frac": seconds / max(step_time, 1e-9) for name, seconds in self.step_timings.items()},
            "tokens_per_s": int(lengths.sum()) / max(step_time, 1e-9),
            "padded_frac": padded_fraction(examples.lengths, step_micro_batches),
            "mfu": mfu(flops, step_time, self.world, self.peak_flops),  # null where the peak is unknown (mfu.py)
            "host_syncs": syncs.total,  # device-to-host synchronisations of this rank's step (host_syncs.py)
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "skipped_micro_batches": state.counters["skipped_micro_batches"],
            "elapsed_s": self.elapsed(),
        }

    def _micro_step(
        self, round_index: int, indices: np.ndarray, totals: StepTotals,
        unchecked: list[tuple[torch.Tensor, torch.Tensor, str]],
    ) -> torch.Tensor | None:  # fmt: skip
        """Load one micro-batch, its forward and backward; without DeepSpeed the optimiser step after
        the accumulation's last round (returns the gradient norm when it clipped)."""
        state, accelerator, grad_norm = self.state, self.accelerator, None
        where = (
            f"step {state.step + 1} (epoch {state.epoch}, step {state.step_in_epoch} of the epoch), "
            f"accumulation round {round_index}, examples {[int(i) for i in indices[:8]]} on rank {self.rank}"
        )
        batch = load_micro_batch(self.data.examples, indices, self.data.tokenizer.pad_token_id, self.device, where)
        with accelerator.accumulate(self.model):
            self._forward_backward(batch, totals, unchecked)
            if not self.use_deepspeed:  # Accelerate steps only on the accumulation's last round
                if accelerator.sync_gradients and self.cfg.train.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                with not_counted():  # torch's AdamW reads its step counts with .item(): host memory, no wait
                    self.optimizer.step()
                self.optimizer.zero_grad()
        return grad_norm

    def _forward_backward(
        self, batch: MicroBatch, totals: StepTotals, unchecked: list[tuple[torch.Tensor, torch.Tensor, str]]
    ) -> None:
        """One micro-batch: its loss, the non-finite policy, the backward (inside the loss's context)."""
        with micro_batch_loss(self.model, batch, self.loss_ctx) as out:
            loss = out.loss
            finite = torch.isfinite(loss.detach())
            if self.cfg.train.on_nonfinite == "skip":  # decided before the backward, alike on every rank
                if self.accelerator.reduce((~finite).float()[None], reduction="sum").item() > 0:
                    self.state.counters["skipped_micro_batches"] += 1
                    logger.warning("skipping a micro-batch with a non-finite loss at %s", batch.where)
                    finite = torch.zeros_like(finite)
                    loss = out.zero()  # reaches every parameter, so ZeRO's gradient hooks still fire
            else:
                unchecked.append((finite, loss.detach(), batch.where))
            totals.add(out, loss, finite)
            for name, seconds in out.timings.items():
                self.step_timings[name] = self.step_timings.get(name, 0.0) + seconds
            self.accelerator.backward(loss)

    def log_step(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step % self.cfg.train.log_every == 0 or step == self.total_steps:
            self.train_log.write(record)
            if self.accelerator.trackers:
                self.accelerator.log(
                    {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step
                )
        self.bar.update(record["loss"], record["tokens_per_s"])

    def elapsed(self) -> float:
        """Seconds of this run so far, across resumes (evaluation and checkpoints included)."""
        return self.elapsed_before + time.time() - self.t_run

    def save_checkpoint(self) -> None:
        trainer_state = self.state.to_checkpoint(self.world, self.zero_stage, self.elapsed())
        save_checkpoint(self.accelerator, self.out, self.state.step, trainer_state, self.cfg.train.keep_last)

    # ------------------------------------------------------------------------------------ epoch end
    def epoch_end(self) -> None:
        """Evaluate valid (and test) after an epoch; export OUT/model when the epoch is the best so far."""
        if self.evaluate is None:
            return
        epoch, step, metric = self.state.epoch, self.state.step, self.cfg.train.select_metric
        every_epoch = self.cfg.train.eval_test == "every_epoch"
        results = self._evaluate(("valid", "test") if every_epoch else ("valid",))
        valid = results["valid"]
        if metric not in valid:
            raise KeyError(f"train.select_metric={metric!r} is not among the validation metrics {sorted(valid)}")
        previous = self.epochs_log.read() if self.main else []
        best = max((r["valid"][metric] for r in previous), default=-math.inf)
        improved = _main_decides(self.accelerator, valid[metric] > best)
        if not every_epoch and improved:  # the model in memory is the best so far: its test is the one reported
            results.update(self._evaluate(("test",)))
        test = results.get("test", {})
        if self.main:
            logger.info("epoch %d (step %d): valid %s, test %s", epoch, step, metric_text(valid), metric_text(test))
        if improved and test and self.main:
            write_test_ranks(self.out / "test_predictions.jsonl", self.evaluate.last_ranks["test"], epoch)
        record = {"epoch": epoch, "step": step, "valid": valid, "test": test}
        self.epochs_log.write(record)
        if self.accelerator.trackers:  # train.report_to: the epoch's metrics beside the per-step scalars
            scalars = {f"{split}/{k}": v for split in ("valid", "test") for k, v in record[split].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
            self.accelerator.log({**scalars, "epoch": epoch}, step=step)
        if improved:
            self.export("model", {"epoch": epoch, "step": step, "selected_by": metric})

    def _evaluate(self, splits: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        return self.evaluate(self.accelerator, self.model, self.data.tokenizer, self.data.catalog, splits=splits)

    def export(self, name: str, extra: dict[str, Any]) -> None:
        """Collective: the consolidated model into OUT/name (see `export.py`)."""
        export_model(self.accelerator, self.model, self.out / name, tokenizer=self.data.tokenizer,
                     catalog=self.data.catalog, cfg=self.cfg, extra=extra)  # fmt: skip

    # ------------------------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        """Final export and OUT/summary.json (OUT/model is the selected epoch when epochs were evaluated)."""
        summary: dict[str, Any] = {"steps": self.state.step, "world_size": self.world, "zero_stage": self.zero_stage,
                                   "gradient_checkpointing": self.gradient_checkpointing}  # fmt: skip
        summary["model"] = self._export_final()
        summary["data"] = self.train_data
        records = self.epochs_log.read() if self.main else []
        if records:
            summary.update(selected_epoch_summary(records, self.cfg, self.out / "model", summary["model"]))
        logs = self.train_log.read()
        summary["loss"] = logs[-1]["loss"] if logs else None
        summary["mfu_mean"] = mean_mfu(logs)  # over the logged steps; null where the peak is unknown
        summary["prompts_truncated"] = self.data.examples.truncated_examples  # examples that lost history items
        summary["train_time_s"] = self.elapsed()  # including per-epoch evaluation
        summary["optim_time_s"] = self.state.counters.get("optim_time_s", 0.0)  # optimiser steps only
        summary["wall_time_s"] = time.time() - self.t_start
        summary["counters"] = self.state.counters
        if self.main:
            write_json_atomic(self.out / "summary.json", summary, indent=1)
        self.cleanup()
        return summary

    def _export_final(self) -> dict[str, str]:
        step = self.state.step
        # OUT/model is the selected epoch's only when an epoch was selected into it: a finished run
        # re-run with resume finds its final export there, which no epoch selected
        selected = model_is_selected_epoch(read_export_info(self.out / "model"))
        if self.evaluate is None or not _main_decides(self.accelerator, selected):
            self.export("model", {"step": step, "selected_by": None})
            return {"path": "model", "is": "final model (no per-epoch evaluation)"}
        self.export("model_final", {"step": step})
        return {"path": "model", "is": "the selected epoch's model", "final": "model_final"}

    def cleanup(self) -> None:
        """Leave the process group together and forget its state (`bear_ds.distributed.end_distributed`)."""
        end_distributed(self.accelerator)


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` (single process or under accelerate / torchrun / deepspeed); return the summary."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if trainer.finished is not None:
            return trainer.finished
        trainer.run_epochs()
        return trainer.finish()
    finally:
        if hasattr(trainer, "lock"):
            trainer.release()


# ---------------------------------------------------------------------------------------- helpers
def _main_decides(accelerator, flag: bool) -> bool:
    """Rank 0's boolean, on every rank (only rank 0 reads the run's logs)."""
    vote = torch.tensor([1.0 if (flag and accelerator.is_main_process) else 0.0], device=accelerator.device)
    return accelerator.reduce(vote, reduction="sum").item() > 0


def _stop_on_nonfinite(accelerator, unchecked: list[tuple[torch.Tensor, torch.Tensor, str]], step: int) -> None:
    """train.on_nonfinite=stop: one check per step, on every rank, naming the first bad micro-batch."""
    bad = torch.stack([~finite for finite, _, _ in unchecked]).float()
    if accelerator.reduce(bad.sum()[None], reduction="sum").item() == 0:
        return
    local = [(loss, where) for (finite, loss, where) in unchecked if not finite]
    if local:
        value, where = f"{local[0][0].item()}", local[0][1]
    else:
        value, where = "(on another rank)", f"step {step + 1}"
    raise NonFiniteLossError(
        f"non-finite loss {value} at {where}; set train.on_nonfinite=skip to drop such micro-batches"
    )


__all__ = ["NonFiniteLossError", "TrainState", "Trainer", "prepare_tokenizer", "train"]
