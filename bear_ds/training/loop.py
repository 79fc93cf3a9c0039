"""The training recipe: setup, train (with checkpoints and per-epoch evaluation), export.

    accelerate launch --config_file launchers/accelerate/cpu_zero3.yaml -m bear_ds.train \
        data.path=PREPARED model.name=tiny loss.name=bear train.max_steps=12 train.save_every=6 output_dir=OUT

One optimiser step consumes `train.global_batch` examples cut into micro-batches of
`train.micro_batch`, spread over ranks and accumulation rounds (see `batching.py`). Each
micro-batch: backbone hidden states (the model never builds full logits), the response positions
selected (hidden at i predicts token i + 1), the trie states along the gold responses, then
`losses.response_loss` inside `lm_head_context` (which gathers the partitioned lm_head once under
ZeRO-3), backward inside that context. Every micro-batch loss is normalised within the
micro-batch (as the released BEAR does); the step's gradient is their mean, so it does not
depend on the number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from bear_ds.config import Config, ConfigError, save_config
from bear_ds.errors import BearDsError, RunStateError
from bear_ds.training.batching import collate, epoch_schedule, padded_fraction, rank_micro_batches
from bear_ds.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from bear_ds.training.distributed import build_accelerator
from bear_ds.training.examples import encode_training_examples
from bear_ds.training.export import export_model
from bear_ds.training.train_log import JsonlLog, ProgressBar

logger = logging.getLogger(__name__)


class NonFiniteLossError(BearDsError, FloatingPointError):
    """A micro-batch produced a NaN/inf loss and train.on_nonfinite=stop."""


# ---------------------------------------------------------------------------------------- setup
def prepare_tokenizer(
    cfg: Config, output_dir: Path, model_folder: Path | None, titles: dict[str, str], prompts: list[str]
):
    """The run's tokenizer: tokenizer.path, else the model folder's, else a BPE trained once into OUT/tokenizer.

    Not collective: call on one process first (`main_process_first`), then the others load it.
    """
    from bear_ds.tokenization import ensure_pad_token, load_tokenizer, train_bpe_tokenizer

    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    elif model_folder is not None:
        tokenizer = load_tokenizer(model_folder)
    else:
        folder = output_dir / "tokenizer"
        if (folder / "tokenizer_config.json").is_file():  # resume / second rank: reuse, never retrain
            tokenizer = load_tokenizer(folder)
        else:
            tokenizer = train_bpe_tokenizer([*titles.values(), *prompts], cfg.tokenizer.vocab_size)
            tmp = output_dir / "tokenizer.tmp"
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, folder)  # atomic: a killed run never leaves a half tokenizer to reuse
    ensure_pad_token(tokenizer)
    return tokenizer


def _schedule(name: str, optimizer, warmup: int, total: int):
    from transformers import get_scheduler

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


class EpochEvaluator:
    """Valid (first train.eval_max_users users) and test beam-search metrics after an epoch."""

    def __init__(
        self, cfg: Config, prepared: Path, titles: dict[str, str], builder, catalog, tokenizer, context: int
    ) -> None:
        from bear_ds.catalog import fit_prompts
        from bear_ds.data import load_split
        from bear_ds.evaluation.evaluate import run_beam_evaluation

        self.run, self.cfg = run_beam_evaluation, cfg
        self.splits: dict[str, tuple[list[list[int]], list[int | None]]] = {}
        for split, cap in (("valid", cfg.train.eval_max_users), ("test", cfg.eval.max_users)):
            rows = load_split(prepared, split)
            if cap is not None:
                rows = rows.select(range(min(cap, len(rows))))
            fitted = fit_prompts(
                [[titles[i] for i in h] for h in rows["history"]], tokenizer, builder,
                context - catalog.trie.max_depth,  # room for the longest title, as `bear-ds evaluate` leaves
                truncate=cfg.eval.truncate_history, what=f"{split} user", option="eval.truncate_history",
            )  # fmt: skip
            if fitted.truncated_examples:
                logger.warning("%s: %d prompts lost oldest history items to fit the context", split,
                               fitted.truncated_examples)  # fmt: skip
            self.splits[split] = (fitted.prompt_ids, [catalog.group_of_item(t) for t in rows["target"]])

    def __call__(
        self, accelerator, model, tokenizer, catalog, splits: tuple[str, ...] = ("valid", "test")
    ) -> dict[str, dict[str, Any]]:
        results = {}
        for split in splits:
            prompts, groups = self.splits[split]
            if not prompts:  # an empty test split: nothing to report
                results[split] = {}
                continue
            _, metrics = self.run(
                model, tokenizer, catalog, prompts, groups, self.cfg.eval, accelerator,
                loss_name=self.cfg.loss.name, progress=accelerator.is_main_process,
            )  # fmt: skip
            results[split] = metrics
        return results


# ---------------------------------------------------------------------------------------- train
def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` (single process or under accelerate / torchrun / deepspeed); return the summary."""
    from accelerate.utils import set_seed

    from bear_ds.catalog import Catalog
    from bear_ds.data import PromptBuilder, load_catalog, load_split, load_stats, resolve_prepared
    from bear_ds.losses import (
        LossSums,
        backbone_hidden_states,
        lm_head_context,
        metrics_from_sums,
        response_loss,
        select_response,
    )
    from bear_ds.models import build_model, pretrained_folder

    if cfg.train.eval_every_epoch:
        _check_select_metric(cfg)
    t_start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator, plan, zero_stage = build_accelerator(cfg.train, out)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if main:  # logging is configured by the entry points (bear_ds.runtime), not here
        save_config(cfg, out)

    # ---- data, tokenizer, catalog (rank 0 writes what is shared; the others then read it)
    with accelerator.main_process_first():
        prepared = resolve_prepared(cfg, out / "data")
        model_folder = pretrained_folder(cfg.model)
    stats = load_stats(prepared)
    builder = PromptBuilder(cfg.prompt, cfg.data.domain or stats.get("domain"))
    titles = load_catalog(prepared)
    rows = load_split(prepared, "train")
    histories, targets = rows["history"], rows["target"]
    with accelerator.main_process_first():
        prompts = [builder.prompt([titles[i] for i in h]) for h in histories] if model_folder is None else []
        tokenizer = prepare_tokenizer(cfg, out, model_folder, titles, prompts)
    catalog = Catalog.build(titles, tokenizer, builder)
    trie = catalog.trie.to(device)

    # ---- model: created partitioned under ZeRO-3 (the accelerator registered the DS config)
    set_seed(cfg.train.seed)
    use_deepspeed = accelerator.state.deepspeed_plugin is not None
    # DeepSpeed bf16 keeps fp32 master weights itself; without it, fp32 weights + Accelerate's bf16 autocast
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" and use_deepspeed else torch.float32
    model = build_model(cfg.model, tokenizer, dtype=dtype, folder=model_folder)
    max_length = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
    examples = encode_training_examples(
        histories, targets, titles, catalog, tokenizer, builder,
        max_length=max_length, truncate_history=cfg.train.truncate_history,
    )  # fmt: skip
    steps_per_epoch = len(examples.lengths) // plan.global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(examples.lengths)} training examples < train.global_batch={plan.global_batch}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    optimizer = _optimizer(cfg, model)
    scheduler = _schedule(cfg.train.schedule, optimizer, cfg.train.warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    train_log = JsonlLog(out / "train_log.jsonl", main)
    epochs_log = JsonlLog(out / "epochs.jsonl", main)
    step, epoch, step_in_epoch = 0, 0, 0
    counters = {"skipped_micro_batches": 0, "left_out_per_epoch": 0}
    if cfg.train.resume == "auto" and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(accelerator, ckpt)
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        counters.update(state.get("counters", {}))
        train_log.truncate_after(step)
        epochs_log.truncate_after(step)
        if main:
            logger.info("resumed from %s: step %d, epoch %d, step %d of the epoch", ckpt, step, epoch, step_in_epoch)
    else:
        if latest_checkpoint(out) is not None:  # all ranks raise: never mix two runs' checkpoints
            raise RunStateError(
                f"{out / 'checkpoints'} holds checkpoints of an earlier run: add train.resume=auto to continue it, "
                "or choose another output_dir"
            )
        if main:  # a fresh run starts fresh logs
            for path in (train_log.path, epochs_log.path):
                path.unlink(missing_ok=True)
    if main:
        logger.info(
            "world size %d, ZeRO stage %d, global batch %d = micro %d x accumulation %d x %d ranks; "
            "%d examples, %d steps per epoch, %d steps; prompts truncated: %d (%d history items)",
            world, zero_stage, plan.global_batch, plan.micro_batch, plan.accumulation, world,
            len(examples.lengths), steps_per_epoch, total_steps, examples.truncated_examples, examples.truncated_items,
        )  # fmt: skip

    pad_id = tokenizer.pad_token_id
    bar = ProgressBar(total_steps, step, main)
    evaluate = (
        EpochEvaluator(cfg, prepared, titles, builder, catalog, tokenizer, max_length)
        if cfg.train.eval_every_epoch
        else None
    )
    if evaluate is not None and not evaluate.splits["valid"][0]:
        if main:
            logger.warning("%s/valid.parquet has no rows: no per-epoch evaluation or epoch selection", prepared)
        evaluate = None
    elapsed_before = float(counters.get("elapsed_s", 0.0))
    t_run = time.time()
    grad_norm = None

    def trainer_state() -> dict[str, Any]:
        return {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "world_size": world, "zero_stage": zero_stage,
            "counters": {**counters, "elapsed_s": elapsed_before + time.time() - t_run},
        }  # fmt: skip

    while step < total_steps:
        schedule = epoch_schedule(
            examples.lengths, global_batch=plan.global_batch, micro_batch=plan.micro_batch,
            seed=cfg.train.seed, epoch=epoch, length_bucket=cfg.train.length_bucket,
        )  # fmt: skip
        counters["left_out_per_epoch"] = schedule.left_out
        model.train()
        while step_in_epoch < len(schedule.steps) and step < total_steps:
            t_step = time.time()
            micro = schedule.steps[step_in_epoch]
            # Per-micro-batch results stay on the device and are read once per step: every read waits for
            # the GPU, and a wait per micro-batch would leave it idle while the next one is launched.
            loss_sum = torch.zeros((), device=device)
            step_sums = LossSums.zeros(loss_sum).as_tensor()  # [9]: the finite micro-batches' LossSums
            finite_micro = torch.zeros((), device=device)
            unchecked: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # on_nonfinite=stop: checked after the step
            for round_index, indices in enumerate(rank_micro_batches(micro, rank, world)):
                batch = {
                    k: v.to(device) for k, v in collate(examples.input_ids, examples.labels, indices, pad_id).items()
                }
                where = (
                    f"step {step + 1} (epoch {epoch}, step {step_in_epoch} of the epoch), accumulation round "
                    f"{round_index}, examples {[int(i) for i in indices[:8]]} on rank {rank}"
                )
                with accelerator.accumulate(model):
                    hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])  # [B, L, H]
                    h, y, s = select_response(hidden, batch["labels"], trie)  # [N, H], [N], [N]
                    with lm_head_context(model) as head:
                        result = response_loss(h, head, y, s, trie, cfg.loss)
                        loss = result.loss
                        finite = torch.isfinite(loss.detach())
                        if cfg.train.on_nonfinite == "skip":  # decided before the backward, alike on every rank
                            if accelerator.reduce((~finite).float()[None], reduction="sum").item() > 0:
                                counters["skipped_micro_batches"] += 1
                                logger.warning("skipping a micro-batch with a non-finite loss at %s", where)
                                finite = torch.zeros_like(finite)
                                # a zero that reaches every parameter, so ZeRO's gradient hooks still fire
                                loss = h.float().sum() * 0.0 + head.weight.float().sum() * 0.0
                        else:
                            unchecked.append((finite, loss.detach(), where))
                        loss_sum = loss_sum + torch.where(finite, loss.detach(), 0.0)
                        step_sums = step_sums + torch.where(finite, result.sums.as_tensor(), 0.0)
                        finite_micro = finite_micro + finite.float()
                        accelerator.backward(loss)
                    if not use_deepspeed:
                        if accelerator.sync_gradients:
                            grad_norm = (
                                accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                                if cfg.train.grad_clip > 0
                                else None
                            )
                        optimizer.step()
                        optimizer.zero_grad()
            if unchecked:
                _stop_on_nonfinite(accelerator, unchecked, step)
            if not accelerator.sync_gradients:
                raise RuntimeError(
                    f"step {step + 1}: accumulation out of sync ({plan.accumulation} rounds expected per step)"
                )
            if use_deepspeed:  # the engine clipped and stepped inside the last backward
                grad_norm = model.get_global_grad_norm()
            lr_used = float(scheduler.get_last_lr()[0])
            scheduler.step()  # a client schedule: Accelerate steps it only here (step_scheduler_with_optimizer=False)
            step += 1
            step_in_epoch += 1

            # ---- log: token-weighted over the step's micro-batches on all ranks, one read from the device
            local = torch.cat([step_sums, loss_sum[None], finite_micro[None]]).double()
            total = accelerator.reduce(local, reduction="sum").cpu()
            n_finite = float(total[-1])
            means = {
                "loss": float(total[-2]) / max(n_finite, 1.0),  # mean of the micro-batch losses
                **metrics_from_sums(LossSums.from_tensor(total[:-2]), name=cfg.loss.name, form=cfg.loss.form),
            }
            if n_finite == 0:  # every micro-batch skipped (train.on_nonfinite=skip): nothing to average
                means = dict.fromkeys(means, float("nan"))
            step_time = time.time() - t_step
            # optimisation time alone (no evaluation, checkpoint or export): what BEAR/MSL cost ratios use
            counters["optim_time_s"] = counters.get("optim_time_s", 0.0) + step_time
            real_tokens = int(sum(int(examples.lengths[m].sum()) for m in micro))
            record = {
                "step": step,
                "epoch": epoch + step_in_epoch / len(schedule.steps),
                "loss": means.get("loss", float("nan")),
                **{k: v for k, v in means.items() if k != "loss"},
                "lr": lr_used,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "step_time_s": step_time,
                "tokens_per_s": real_tokens / max(step_time, 1e-9),
                "padded_frac": padded_fraction(examples.lengths, micro),
                "world_size": world,
                "zero_stage": zero_stage,
                "skipped_micro_batches": counters["skipped_micro_batches"],
                "elapsed_s": elapsed_before + time.time() - t_run,
            }
            if step % cfg.train.log_every == 0 or step == total_steps:
                train_log.write(record)
                if accelerator.trackers:
                    accelerator.log(
                        {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step
                    )
            bar.update(record["loss"], record["tokens_per_s"])

            epoch_done = step_in_epoch == len(schedule.steps)
            if epoch_done:  # evaluate before the checkpoint, so a resume never skips it; a partial last epoch
                # (train.max_steps) is not evaluated
                _epoch_end(cfg, accelerator, model, tokenizer, catalog, evaluate, epochs_log, out, epoch, step)
            if epoch_done:
                epoch, step_in_epoch = epoch + 1, 0
            if epoch_done or step == total_steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_checkpoint(accelerator, out, step, trainer_state(), cfg.train.keep_last)
        if step_in_epoch >= len(schedule.steps):  # resumed exactly at an epoch's end
            epoch, step_in_epoch = epoch + 1, 0
    bar.close()

    summary = _finish(cfg, accelerator, model, tokenizer, catalog, evaluate, epochs_log, out, step, world, zero_stage)
    summary["train_time_s"] = elapsed_before + time.time() - t_run  # including per-epoch evaluation
    summary["optim_time_s"] = counters.get("optim_time_s", 0.0)  # optimiser steps only
    summary["wall_time_s"] = time.time() - t_start
    summary["counters"] = counters
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # leave together: a rank exiting while gloo still talks to it aborts the other ("terminate called")
        torch.distributed.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------- epochs
def _main_decides(accelerator, flag: bool) -> bool:
    """Rank 0's boolean, on every rank (only rank 0 reads the run's logs)."""
    vote = torch.tensor([1.0 if (flag and accelerator.is_main_process) else 0.0], device=accelerator.device)
    return accelerator.reduce(vote, reduction="sum").item() > 0


def _read_export_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "export_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _check_select_metric(cfg: Config) -> None:
    """Fail before training, not after the first epoch, when train.select_metric is not computed."""
    from bear_ds.evaluation.evaluate import metric_ks

    ks, _ = metric_ks(cfg.eval.top_k, cfg.eval.num_beams, warn=False)
    allowed = [f"{name}@{k}" for name in ("hr", "ndcg") for k in ks]
    if cfg.train.select_metric not in allowed:
        raise ConfigError(
            f"train.select_metric={cfg.train.select_metric!r} is not among the metrics the per-epoch evaluation "
            f"computes with eval.top_k={cfg.eval.top_k} and eval.num_beams={cfg.eval.num_beams}: "
            f"{', '.join(allowed) or 'none'} (K above num_beams is left out)"
        )


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


def _epoch_end(cfg, accelerator, model, tokenizer, catalog, evaluate, epochs_log, out, epoch, step) -> None:
    """Evaluate valid + test after an epoch; export OUT/model when the epoch is the best so far."""
    if evaluate is None:
        return
    every_epoch = cfg.train.eval_test == "every_epoch"
    results = evaluate(accelerator, model, tokenizer, catalog, splits=("valid", "test") if every_epoch else ("valid",))
    valid = results["valid"]
    metric = cfg.train.select_metric
    if metric not in valid:
        raise KeyError(f"train.select_metric={metric!r} is not among the validation metrics {sorted(valid)}")
    previous = epochs_log.read() if accelerator.is_main_process else []
    best = max((r["valid"][metric] for r in previous), default=-math.inf)
    improved = _main_decides(accelerator, valid[metric] > best)
    if not every_epoch and improved:  # the model in memory is the best so far: its test is the one reported
        results.update(evaluate(accelerator, model, tokenizer, catalog, splits=("test",)))
    test = results.get("test", {})
    if accelerator.is_main_process:
        logger.info("epoch %d (step %d): valid %s, test %s", epoch, step, _metric_text(valid), _metric_text(test))
    record = {"epoch": epoch, "step": step, "valid": valid, "test": test}
    epochs_log.write(record)
    if accelerator.trackers:  # train.report_to: the epoch's metrics beside the per-step scalars
        scalars = {f"{split}/{k}": v for split in ("valid", "test") for k, v in record[split].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        accelerator.log({**scalars, "epoch": epoch}, step=step)
    if improved:
        export_model(accelerator, model, out / "model", tokenizer=tokenizer, catalog=catalog, cfg=cfg,
                     extra={"epoch": epoch, "step": step, "selected_by": metric})  # fmt: skip


def _metric_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("hr@", "ndcg@")))


def _finish(cfg, accelerator, model, tokenizer, catalog, evaluate, epochs_log, out, step, world, zero_stage) -> dict:
    """Final export and the summary; OUT/model is the selected epoch when epochs were evaluated."""
    summary: dict[str, Any] = {"steps": step, "world_size": world, "zero_stage": zero_stage}
    records = epochs_log.read() if accelerator.is_main_process else []
    if evaluate is None or not _main_decides(accelerator, (out / "model").exists()):
        export_model(accelerator, model, out / "model", tokenizer=tokenizer, catalog=catalog, cfg=cfg,
                     extra={"step": step, "selected_by": None})  # fmt: skip
        summary["model"] = {"path": "model", "is": "final model (no per-epoch evaluation)"}
    else:
        export_model(accelerator, model, out / "model_final", tokenizer=tokenizer, catalog=catalog, cfg=cfg,
                     extra={"step": step})  # fmt: skip
        summary["model"] = {"path": "model", "is": "the selected epoch's model", "final": "model_final"}
    if records:
        metric = cfg.train.select_metric
        best = max(records, key=lambda r: r["valid"][metric])
        summary.update(
            selected_epoch=best["epoch"], select_metric=metric, valid=best["valid"], test=best["test"],
        )  # fmt: skip
        exported = _read_export_info(out / "model")
        if exported.get("epoch") != best["epoch"]:
            # a crash between an epoch's export and its checkpoint, then a replay that did not improve
            # on the best: OUT/model is from a discarded continuation. Say so rather than pair them.
            why = (
                f"{out / 'model'} holds epoch {exported.get('epoch')} (step {exported.get('step')}) but the "
                f"selected epoch is {best['epoch']}; re-export that epoch from its checkpoint if it is still kept"
            )
            summary["model"]["mismatch"] = why
            logger.error("%s", why)
        if cfg.train.eval_test == "every_epoch":
            summary["test_max_over_epochs"] = {
                "protocol": "released (max over epochs of TEST metrics; for comparison only, not model selection)",
                **{
                    k: max(r["test"].get(k, -math.inf) for r in records)
                    for k in best["test"]
                    if k.startswith(("hr@", "ndcg@"))
                },  # fmt: skip
            }
    logs = JsonlLog(out / "train_log.jsonl", accelerator.is_main_process).read()
    summary["loss"] = logs[-1]["loss"] if logs else None
    return summary


__all__ = ["NonFiniteLossError", "prepare_tokenizer", "train"]
