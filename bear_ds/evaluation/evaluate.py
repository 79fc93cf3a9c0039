"""Distributed top-K evaluation with the trie-constrained beam search (`bear-ds evaluate`).

Users are sharded across ranks by strided index (user i goes to rank i % world_size): no padding,
no duplicates, shards differ in size by at most one. Within a rank users are decoded in batches of
similar prompt length; results are gathered and put back in the original order, so world sizes 1
and 2 give identical predictions. Two weight modes:

- replicated: every rank holds the full model and decodes independently (synced=False);
- zero3: the model is loaded partitioned by DeepSpeed ZeRO-3 (in the precision it was saved in);
  its weights are gathered once for the whole evaluation when they fit in memory (eval.gather,
  `bear_ds.generation.zero3_gather`), else every forward gathers them from all ranks, so ranks run
  the same number of forwards (synced=True, dummy batches where a rank has fewer users).

Processes are Accelerate's, as in training (`bear_ds.distributed.make_accelerator`): works under
plain python, torchrun, accelerate launch and the deepspeed launcher; results are gathered with
`gather_object`; ZeRO-3 weights are a DeepSpeed engine built by `accelerator.prepare`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import deepspeed as hf_deepspeed

from bear_ds.catalog import CATALOG_FILE, Catalog, encode_prompts, fit_prompts
from bear_ds.config import save_config
from bear_ds.data import load_catalog, load_split, load_stats, resolve_prepared
from bear_ds.data.prompts import PromptBuilder
from bear_ds.distributed import all_max, end_distributed, make_accelerator
from bear_ds.errors import ConfigError, DataError, MissingPathError, ModelInputError
from bear_ds.evaluation.metrics import rank_metrics
from bear_ds.folders import check_output_folder_together, holds_output_lock
from bear_ds.generation.beam import constrained_beam_search, left_pad
from bear_ds.generation.zero3_gather import decoding_weights
from bear_ds.masking import resolve_mask
from bear_ds.models import is_zero3_partitioned, unwrap_model
from bear_ds.outputs import open_atomic, write_json_atomic
from bear_ds.tokenization import load_tokenizer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- sharding
def shard_indices(num_users: int, rank: int, world_size: int) -> list[int]:
    """Users of `rank`: i with i % world_size == rank (every user exactly once, no padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return list(range(rank, num_users, world_size))


# ---------------------------------------------------------------------- decoding + metrics
def metric_ks(top_k: Sequence[int], num_beams: int, *, warn: bool = True) -> tuple[list[int], list[int]]:
    """(K values used, K values left out because beam search returns only num_beams items)."""
    used = sorted({k for k in top_k if k <= num_beams})
    skipped = sorted({k for k in top_k if k > num_beams})
    if not used:
        raise ValueError(
            f"eval.top_k {list(top_k)}: every K exceeds eval.num_beams={num_beams}; "
            f"beam search returns at most num_beams items (raise eval.num_beams or lower eval.top_k)"
        )
    if skipped and warn:
        logger.warning("eval.top_k %s exceed eval.num_beams=%d: left out of the metrics", skipped, num_beams)
    return used, skipped


def training_loss_name(model_dir: Path, fallback: str | None) -> str | None:
    """loss.name of the run that exported `model_dir` (its config.yaml), else `fallback`."""
    saved = model_dir / "config.yaml"
    if saved.is_file():
        name = ((yaml.safe_load(saved.read_text()) or {}).get("loss") or {}).get("name")
        if name:
            return str(name)
    return fallback


def choose_mask(mask: str, model_dir: Path, configured_loss: str | None) -> tuple[str, str]:
    """(mask decoded, why) for `bear-ds evaluate` / `analyze`, the why recorded in their outputs.

    eval.mask=auto follows the loss the model was trained with (its config.yaml); a model that
    records none falls back to this command's loss.name, and that is said in a warning, never silently.
    """
    if mask != "auto":
        return resolve_mask(mask, None), f"eval.mask={mask} as configured"
    recorded = training_loss_name(model_dir, None)
    if recorded is not None:
        chosen = resolve_mask(mask, recorded)
        return chosen, f"eval.mask=auto: {model_dir}/config.yaml records loss.name={recorded} -> mask={chosen}"
    chosen = resolve_mask(mask, configured_loss)
    why = (
        f"eval.mask=auto: {model_dir} records no training loss (no config.yaml with loss.name), so this "
        f"command's loss.name={configured_loss} chose mask={chosen}; set eval.mask=after or before to decide"
    )
    logger.warning("%s", why)
    return chosen, why


def check_context(prompt_ids: Sequence[Sequence[int]], max_depth: int, context: int | None, what: str = "user") -> None:
    """Raise ValueError when a prompt plus the longest title does not fit the model's context."""
    if context is None:
        return
    too_long = [i for i, p in enumerate(prompt_ids) if len(p) + max_depth > context]
    if too_long:
        i = too_long[0]
        raise ModelInputError(
            f"{len(too_long)} prompts plus the longest title ({max_depth} tokens) exceed the model context of "
            f"{context} positions, e.g. {what} {i} ({len(prompt_ids[i])} prompt tokens); "
            f"lower data.max_history or use a model with a longer context"
        )


def _decode_batch(
    net: torch.nn.Module,
    prompts: list[list[int]],
    users: list[int],
    catalog: Any,
    eval_cfg: Any,
    trie: Any,
    pad: int,
    mask: str,
    synced: bool,
) -> list[tuple[int, list[int], list[float]]]:
    """One beam search over `prompts` (of `users`; none: a synced rank's dummy call) -> (user, finished
    groups, their scores) per user, best first."""
    device = trie.device
    if users:
        input_ids, attention_mask = left_pad(prompts, pad, device)
    else:
        input_ids = torch.zeros(0, 1, dtype=torch.int64, device=device)
        attention_mask = torch.ones(0, 1, dtype=torch.int64, device=device)
    res = constrained_beam_search(
        net,
        input_ids,
        attention_mask,
        trie,
        num_beams=eval_cfg.num_beams,
        eos_token_id=catalog.eos_token_id,
        mask=mask,
        length_penalty=eval_cfg.length_penalty,
        synced=synced,
    )
    groups, scores = res.groups.cpu().tolist(), res.scores.cpu().tolist()
    decoded = []
    for j, i in enumerate(users):
        keep = [b for b, g in enumerate(groups[j]) if g >= 0]
        decoded.append((i, [groups[j][b] for b in keep], [scores[j][b] for b in keep]))
    return decoded


def _each_user_once(
    decoded: list[tuple[int, list[int], list[float]]], num_users: int
) -> dict[int, tuple[list[int], list[float]]]:
    """user -> (groups, scores) from every rank's results; every user decoded exactly once."""
    by_user: dict[int, tuple[list[int], list[float]]] = {}
    for i, groups, scores in decoded:
        if i in by_user:
            raise RuntimeError(f"user {i} was decoded by two ranks")
        by_user[i] = (groups, scores)
    missing = [i for i in range(num_users) if i not in by_user]
    if missing:
        raise RuntimeError(f"{len(missing)} users were not decoded (e.g. user {missing[0]})")
    return by_user


def _prediction(groups: list[int], scores: list[float], target: int | None, catalog: Any) -> dict[str, Any]:
    rank = groups.index(target) if target is not None and target in groups else None
    return {
        "groups": groups,
        "predictions": [catalog.group_titles[g] for g in groups],
        "scores": scores,
        "target_rank": rank,
    }


def run_beam_evaluation(
    model: torch.nn.Module,
    tokenizer: Any,
    catalog: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    targets_groups: Sequence[int | None],
    eval_cfg: Any,
    accelerator: Any = None,
    synced: bool = False,
    *,
    loss_name: str | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Beam-search every user's prompt and score the lists; usable from the trainer each epoch.

    prompts: the prompt strings (or their token ids) of ALL users, the same list on every rank;
    targets_groups: each user's target group (None when the target is not in the catalog: a miss).
    Each rank decodes its shard; results are gathered on every rank in the original order.
    A ZeRO-3 partitioned `model` (its DeepSpeed engine) has its weights gathered once for the whole
    evaluation (ranks decode on their own), or at every forward with `synced` forced on, as
    eval.gather decides (`decoding_weights`). The model's train/eval mode is restored on return. eval.mask="auto"
    follows `loss_name` (after for lml, before otherwise). Returns (predictions, metrics):
    predictions[i] = {"groups", "predictions" (titles), "scores", "target_rank"}; metrics = {"hr@K", "ndcg@K", "users",
    "targets_not_in_catalog", "decoding", "decode_s", "users_per_second"}.
    """
    if len(prompts) != len(targets_groups):
        raise ValueError(f"{len(prompts)} prompts but {len(targets_groups)} targets")
    if len(prompts) == 0:
        raise ValueError("no users to evaluate")
    if catalog.num_groups == 0:
        raise ValueError("the catalog is empty: nothing to recommend")
    ks, skipped = metric_ks(eval_cfg.top_k, eval_cfg.num_beams)
    mask = resolve_mask(eval_cfg.mask, loss_name)
    net = unwrap_model(model)
    partitioned = is_zero3_partitioned(net)
    device = accelerator.device if accelerator is not None else next(net.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    if isinstance(prompts[0], str):
        prompt_ids = encode_prompts(tokenizer, list(prompts))
    else:
        prompt_ids = [list(p) for p in prompts]
    check_context(prompt_ids, catalog.trie.max_depth, getattr(net.config, "max_position_embeddings", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else catalog.eos_token_id
    trie = catalog.trie.to(device)

    mine = shard_indices(len(prompt_ids), rank, world)
    mine.sort(key=lambda i: (-len(prompt_ids[i]), i))  # similar lengths together: little padding
    bs = eval_cfg.batch_users
    batches = [mine[s : s + bs] for s in range(0, len(mine), bs)]

    was_training = net.training
    net.eval()
    local: list[tuple[int, list[int], list[float]]] = []  # (user, groups, scores) of this rank's users
    bar = tqdm(total=len(mine), desc="beam search", unit="user", disable=not (progress and rank == 0))
    started = time.perf_counter()
    try:
        with decoding_weights(model, getattr(eval_cfg, "gather", "auto"), device) as gather:
            # weights gathered once: every rank holds the full model and decodes on its own
            synced = (synced or partitioned) and gather != "once"
            # per-step gathering: every rank runs as many beam searches as the busiest one (dummies)
            n_calls = int(all_max(len(batches))) if synced and world > 1 else len(batches)
            for call in range(n_calls):
                batch = batches[call] if call < len(batches) else []
                local += _decode_batch(
                    net, [prompt_ids[i] for i in batch], batch, catalog, eval_cfg, trie, pad, mask, synced
                )
                bar.update(len(batch))
    finally:
        bar.close()
        net.train(was_training)
    decode_s = time.perf_counter() - started
    if world > 1:
        decode_s = all_max(decode_s)
        local = gather_object(local)  # every rank's list, concatenated in rank order, on every rank

    by_user = _each_user_once(local, len(prompt_ids))
    predictions = [_prediction(*by_user[i], target, catalog) for i, target in enumerate(targets_groups)]
    metrics: dict[str, Any] = rank_metrics([p["target_rank"] for p in predictions], ks)
    metrics.update(
        users=len(predictions),
        targets_not_in_catalog=sum(t is None for t in targets_groups),
        decoding={
            "num_beams": eval_cfg.num_beams,
            "mask": mask,
            "length_penalty": eval_cfg.length_penalty,
            "batch_users": eval_cfg.batch_users,
            "synced": synced,
            "zero3_partitioned": partitioned,
            "gather": gather,
            "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),  # the precision decoded in
            "world_size": world,
            "top_k_skipped": skipped,
        },
        decode_s=decode_s,
        users_per_second=len(predictions) / decode_s if decode_s > 0 else None,
    )
    return predictions, metrics


# ---------------------------------------------------------------------- inputs and models
@dataclass
class EvalInputs:
    catalog: Any
    tokenizer: Any
    user_ids: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]
    truncated_prompts: int
    target_items: list[str]
    target_titles: list[str | None]
    target_groups: list[int | None]
    pad_token_id: int
    ks: list[int]


def eval_model_dir(cfg: Any) -> Path:
    """model.path, checked to be a Hugging Face model folder."""
    if not cfg.model.path:
        raise ConfigError("model.path is not set: evaluate needs a local model folder (the trainer's OUT/model)")
    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        raise MissingPathError(f"model.path {model_dir} has no config.json (expected a Hugging Face model folder)")
    return model_dir


def load_eval_inputs(cfg: Any, accelerator: Any) -> EvalInputs:
    """Tokenizer, catalog and the users of eval.split (first eval.max_users) with their prompts."""
    model_dir = eval_model_dir(cfg)
    ks, _ = metric_ks(cfg.eval.top_k, cfg.eval.num_beams, warn=False)  # fail before loading anything
    tokenizer = load_tokenizer(cfg.tokenizer.path or model_dir)

    # rank 0 prepares the data if needed; the others wait and then read the same folder
    with accelerator.main_process_first():
        folder = resolve_prepared(cfg, Path(cfg.output_dir) / "data")
    titles = load_catalog(folder)
    stats = load_stats(folder)
    domain = cfg.data.domain or stats.get("domain")
    if not domain:
        raise DataError(f"{folder}/stats.json has no 'domain' and data.domain is not set")
    builder = PromptBuilder(cfg.prompt, domain)
    if (model_dir / CATALOG_FILE).is_file():
        catalog = Catalog.load(model_dir)
        catalog.check_tokenizer(tokenizer, builder)  # every title's token ids, not only eos and size
    else:
        catalog = Catalog.build(titles, tokenizer, builder)

    split = load_split(folder, cfg.eval.split)
    n = len(split) if cfg.eval.max_users is None else min(cfg.eval.max_users, len(split))
    if n == 0:
        raise DataError(f"split {cfg.eval.split!r} of {folder} has no rows")
    rows = split.select(range(n))
    user_ids = [str(u) for u in rows["user_id"]]
    histories = rows["history"]
    targets = [str(t) for t in rows["target"]]
    unknown = sorted({h for hist in histories for h in hist if h not in titles})
    if unknown:
        raise DataError(
            f"{len(unknown)} history items of split {cfg.eval.split!r} are not in {folder}/catalog.parquet, e.g. {unknown[:3]}"
        )
    context = getattr(AutoConfig.from_pretrained(model_dir, local_files_only=True), "max_position_embeddings", None)
    fitted = fit_prompts(
        [[titles[h] for h in hist] for hist in histories], tokenizer, builder,
        (context or 10**9) - catalog.trie.max_depth,  # room for the longest title, since any may be decoded
        truncate=cfg.eval.truncate_history, what="user", option="eval.truncate_history",
    )  # fmt: skip
    if fitted.truncated_examples and accelerator.is_main_process:
        logger.warning(
            "%d prompts lost %d oldest history items in all to leave room for the longest title (%d tokens)",
            fitted.truncated_examples, fitted.truncated_items, catalog.trie.max_depth,
        )  # fmt: skip
    target_groups = [catalog.group_of_item(t) for t in targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else catalog.eos_token_id
    return EvalInputs(
        catalog=catalog,
        tokenizer=tokenizer,
        user_ids=user_ids,
        prompts=fitted.prompts,
        prompt_ids=fitted.prompt_ids,
        truncated_prompts=fitted.truncated_examples,
        target_items=targets,
        target_titles=[titles.get(t) for t in targets],
        target_groups=target_groups,
        pad_token_id=pad,
        ks=ks,
    )


def saved_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype `model_dir`'s config.json records for its weights (None: not recorded)."""
    saved = getattr(AutoConfig.from_pretrained(model_dir, local_files_only=True), "dtype", None)
    return getattr(torch, saved, None) if isinstance(saved, str) else saved


def zero3_eval_config(dtype: torch.dtype | None) -> dict[str, Any]:
    """The DeepSpeed ZeRO-3 config of eval.weights=zero3 for weights saved in `dtype`: partitions
    kept in that precision (a bf16 training exports bf16; without a bf16 block DeepSpeed would
    partition and gather it as fp32, twice the bytes), every parameter partitioned."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }


def eval_accelerator(eval_cfg: Any, model_dir: Path) -> Any:
    """The evaluation's Accelerator: plain processes (eval.weights=replicated), or a DeepSpeed ZeRO-3
    plugin (zero3, in the precision `model_dir` was saved in) under which `load_eval_model` loads the model
    partitioned."""
    ds_config = None
    if eval_cfg.weights == "zero3":
        ds_config = zero3_eval_config(saved_dtype(model_dir))
    return make_accelerator(ds_config, zero3_init=ds_config is not None, timeout_s=eval_cfg.timeout_s)


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Inside, `from_pretrained` builds full tensors even when a ZeRO-3 `HfDeepSpeedConfig` is alive.

    A ZeRO-3 training that ran earlier in this process and did not leave through `end_distributed`
    (one that raised) keeps its config registered; transformers then partitions every model it
    loads, so a model loaded afterwards in the same process (a sweep point's analysis) had 0-sized
    weights and failed in the embedding ("Padding_idx must be within num_embeddings").
    """
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers' one switch for zero3 init
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_eval_model(model_dir: Path, accelerator: Any) -> torch.nn.Module:
    """The model of `model_dir` (local files only) in eval mode: on this rank's device, never
    partitioned, ready for `constrained_beam_search`; or, under a ZeRO-3 accelerator, partitioned as
    it is loaded (in its saved dtype) and returned as its DeepSpeed engine, whose hooks a decoding
    that gathers the weights once takes off (`run_beam_evaluation` unwraps it)."""
    if accelerator.state.deepspeed_plugin is not None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype="auto")
        engine = accelerator.prepare(model)
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine
    with zero3_init_disabled():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    if is_zero3_partitioned(model):
        raise RuntimeError(f"{model_dir} was loaded ZeRO-3 partitioned where a full copy was asked for")
    return unwrap_model(model.to(accelerator.device)).eval()


# ---------------------------------------------------------------------- the command
@holds_output_lock
def evaluate(cfg: Any) -> dict[str, Any]:
    """`bear-ds evaluate`: top-K beam-search evaluation of `model.path` on `eval.split`.

    Writes output_dir/predictions.jsonl, metrics.json, catalog.json and config.yaml (rank 0).
    Returns the metrics (on every rank).
    """
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    accelerator = eval_accelerator(cfg.eval, eval_model_dir(cfg))
    check_output_folder_together(accelerator, out, "evaluate")  # before loading and decoding, not after
    inputs = load_eval_inputs(cfg, accelerator)
    model = load_eval_model(Path(cfg.model.path), accelerator)
    mask, mask_reason = choose_mask(cfg.eval.mask, Path(cfg.model.path), cfg.loss.name)
    predictions, metrics = run_beam_evaluation(
        model,
        inputs.tokenizer,
        inputs.catalog,
        inputs.prompt_ids,
        inputs.target_groups,
        cfg.eval.model_copy(update={"mask": mask}),
        accelerator,
        synced=cfg.eval.weights == "zero3",
    )
    metrics["decoding"].update(weights=cfg.eval.weights, split=cfg.eval.split, mask_reason=mask_reason)
    metrics["prompts_truncated"] = inputs.truncated_prompts  # users whose oldest history items were dropped
    metrics["elapsed_s"] = time.perf_counter() - started
    if accelerator.is_main_process:
        # metrics.json is written last: a folder holding it holds the matching predictions
        (out / "metrics.json").unlink(missing_ok=True)
        with open_atomic(out / "predictions.jsonl") as fh:
            for i, pred in enumerate(predictions):
                row = {
                    "user_id": inputs.user_ids[i],
                    "prompt": inputs.prompts[i],
                    "target": inputs.target_titles[i],
                    "target_item": inputs.target_items[i],
                    "predictions": pred["predictions"],
                    "scores": pred["scores"],
                    "target_rank": pred["target_rank"],
                }
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        inputs.catalog.save(out)
        save_config(cfg, out)
        write_json_atomic(out / "metrics.json", metrics)
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "@" in k)
        print(f"{summary} ({metrics['users']} users, {metrics['users_per_second'] or 0:.2f} users/s) -> {out}")
    end_distributed(accelerator)
    return metrics
