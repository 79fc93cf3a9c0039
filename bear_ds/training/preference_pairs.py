"""Preference training data for loss.name=sdpo: negatives, the reference pass, pair batches.

Each training example becomes 1 + K sequences sharing its prompt: the positive (the target's
title) and K negatives (`bear_ds.training.negatives`). The reference log-probabilities
log pi_ref(y|x) of every (example, item) pair are computed BEFORE the epoch that uses them, in one
sharded no-grad pass (each rank scores the examples i with i % world == rank through the
chunked head, then all ranks gather), and stored in the run folder:

    OUT/reference_logps/epoch_E.pt   {"negatives" [N, K] int64, "reference_logps" [N, 1 + K] float32,
                                      "reference_digest", "examples_digest", ...}

Why a pass and not a frozen reference next to the policy (docs/scaling.md): the reference is
needed once per pair, not once per optimiser step; no second partitioned model stays resident
during training and no second set of all-gathers runs every micro-step. A resume reloads the file
of its epoch, so the reference a run resumes with is the one it started the epoch with; the file
records digests of what it was computed from (the `model.reference_path` folder's config and weights
files, the examples' prompt and title ids) and a resume whose reference or examples differ is refused.

When the pass runs:
- `model.reference_path` set and random/popular negatives (drawn once per run): once, epoch_0.pt;
- negative_source=self (the policy's own beam-search recommendations, regenerated each epoch) or no
  `model.reference_path` (the reference is the policy at the start of each epoch, as in SPRec):
  at the start of every epoch, epoch_E.pt.
- train.self_play (SPRec's rounds): at the start of round r (epoch 2r), from the model as it is then
  (negatives and reference alike), epoch_{2r}.pt; epoch 2r trains the positives' CE (SFT), epoch
  2r + 1 S-DPO on those pairs.
The frozen reference is loaded only for the pass (partitioned as it loads under ZeRO-3, wrapped
in a DeepSpeed inference engine) and released after it. When it is the policy's own starting
folder and no step has run, the pass uses the policy itself: no second load at all.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import pickle
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from bear_ds.catalog import CATALOG_FILE, IGNORE_INDEX, Catalog, encode_example
from bear_ds.errors import MissingPathError, ModelInputError, RunStateError, UnsafeCheckpointError
from bear_ds.evaluation.evaluate import run_beam_evaluation, shard_indices
from bear_ds.losses import (
    backbone_hidden_states,
    lm_head_context,
    response_rows,
    select_response,
    sequence_logps,
    token_logps,
)
from bear_ds.models import build_model
from bear_ds.tokenization import TOKENIZER_FILES, load_tokenizer
from bear_ds.training.batching import collate
from bear_ds.training.negatives import group_weights, sample_negatives, self_negatives

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference_logps"
# what of a model folder decides its log-probabilities (the tokenizer is checked at setup)
_REFERENCE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_REFERENCE_FILE_NAMES = ("config.json", "adapter_config.json")


# ---------------------------------------------------------------------------------------- batches
def prompt_ids_of(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompt of each encoded example: its tokens before the first response label."""
    prompts = []
    for ids, lab in zip(input_ids, labels, strict=True):
        start = next((j for j, v in enumerate(lab) if v != IGNORE_INDEX), len(lab))
        prompts.append(list(ids[:start]))
    return prompts


def collate_pairs(
    prompts: Sequence[Sequence[int]], groups: np.ndarray, catalog: Catalog, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded [b * (1 + K), L] input_ids, attention_mask, labels: example i's item j at row i * (1 + K) + j.

    groups [b, 1 + K]: the positive's group then the negatives'.
    """
    input_ids, labels = [], []
    for prompt, row in zip(prompts, groups, strict=True):
        for g in row:
            ids, lab = encode_example(prompt, catalog.group_token_ids[int(g)])
            input_ids.append(ids)
            labels.append(lab)
    return collate(input_ids, labels, np.arange(len(input_ids)), pad_token_id)


# ---------------------------------------------------------------------------------------- reference pass
def item_logps_pass(
    net: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    groups: np.ndarray,
    catalog: Catalog,
    loss_cfg: Any,
    *,
    batch_examples: int,
    pad_token_id: int,
    device: torch.device,
    synced: bool,
    accelerator: Any = None,
) -> torch.Tensor:
    """log pi(y|x) [N, 1 + K] float32 (CPU, every rank) of each example's items under `net`, no grad.

    Examples are sharded i % world == rank over the `accelerator`'s processes (None: one process)
    and gathered; under ZeRO-3 (`synced`) every rank runs as many forwards as the busiest one (extra
    ones score example 0 and are dropped).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    width = groups.shape[1]
    mine = shard_indices(len(prompts), rank, world)
    batches = [mine[s : s + batch_examples] for s in range(0, len(mine), batch_examples)]
    n_calls = len(batches)
    if synced and world > 1:
        n_calls = int(accelerator.gather(torch.tensor([n_calls], device=device)).max())
    trie = catalog.trie.to(device)
    local: list[tuple[int, list[float]]] = []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for call in range(n_calls):
                rows = batches[call] if call < len(batches) else [0]
                batch = collate_pairs([prompts[i] for i in rows], groups[rows], catalog, pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = backbone_hidden_states(net, batch["input_ids"], batch["attention_mask"])
                h, y, s = select_response(hidden, batch["labels"], trie)
                with lm_head_context(net) as head:
                    logp, _, _ = token_logps(
                        h, head, y, s, trie, masked=loss_cfg.masked, tau=loss_cfg.tau, chunk_size=loss_cfg.chunk_size
                    )
                seq = sequence_logps(logp, response_rows(batch["labels"]), len(rows) * width).view(len(rows), width)
                if call < len(batches):
                    local.extend(zip(rows, seq.float().cpu().tolist(), strict=True))
    finally:
        net.train(was_training)
    out = torch.full((len(prompts), width), float("nan"), dtype=torch.float32)
    for i, values in gather_object(local) if world > 1 else local:
        out[i] = torch.tensor(values)
    if bool(torch.isnan(out).any()):
        raise RuntimeError("the reference pass left pairs unscored (a rank's shard was lost)")
    return out


def reference_digest(folder: Path) -> str:
    """sha256 over the names and bytes of a model folder's config and weights files."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and (p.name in _REFERENCE_FILE_NAMES or p.name.endswith(_REFERENCE_FILE_SUFFIXES))
    )  # fmt: skip
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def examples_digest(prompts: Sequence[Sequence[int]], target_groups: np.ndarray, catalog: Catalog) -> str:
    """sha256 over the examples' prompt ids, their targets' groups and every title's response ids."""
    digest = hashlib.sha256()
    for rows in (prompts, catalog.group_token_ids):
        digest.update(np.array([len(r) for r in rows], dtype=np.int64).tobytes())
        digest.update(np.fromiter((t for r in rows for t in r), dtype=np.int64).tobytes())
    digest.update(np.asarray(target_groups, dtype=np.int64).tobytes())
    return digest.hexdigest()


def check_reference_model(folder: Path, tokenizer: Any, catalog: Catalog) -> None:
    """Refuse, before any work, a `model.reference_path` that is no model folder or reads other token ids."""
    if not (folder / "config.json").is_file():
        raise MissingPathError(
            f"model.reference_path={folder} has no config.json: expected a model folder exported by `bear-ds train`"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        _check_reference_catalog(folder, catalog)
        return  # weights only: the reference is read with the run's tokenizer
    try:
        theirs = load_tokenizer(folder)
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"model.reference_path={folder}: its tokenizer cannot be loaded ({exc})") from None
    special = ("eos_token_id", "pad_token_id", "bos_token_id")
    if theirs.get_vocab() != tokenizer.get_vocab() or any(getattr(theirs, k) != getattr(tokenizer, k) for k in special):
        raise ModelInputError(
            f"model.reference_path={folder} has another tokenizer than the policy ({len(theirs)} vs {len(tokenizer)} "
            "tokens, or other ids): the reference must score the same token ids; use a model trained from the "
            "policy's tokenizer"
        )
    _check_reference_catalog(folder, catalog)


def _check_reference_catalog(folder: Path, catalog: Catalog) -> None:
    """The reference must score the same token ids: its exported catalog must match the run's."""
    if not (folder / CATALOG_FILE).is_file():
        return  # a plain HF folder: the tokenizer check of build_model is all we can do
    theirs = Catalog.load(folder)
    if theirs.group_token_ids != catalog.group_token_ids:
        raise ModelInputError(
            f"model.reference_path={folder}: its catalog.json tokenizes the titles differently from this run's "
            "catalog (another tokenizer or dataset); the reference must be exported on the same data and tokenizer"
        )


@contextlib.contextmanager
def reference_network(
    cfg: Any, device: torch.device, tokenizer: Any, catalog: Catalog, dtype: torch.dtype, zero3: bool
) -> Iterator[torch.nn.Module]:
    """The frozen `model.reference_path` model for one pass, partitioned under ZeRO-3, then released."""
    folder = Path(cfg.model.reference_path)
    if not (folder / "config.json").is_file():
        raise MissingPathError(
            f"model.reference_path={folder} has no config.json: expected a model folder exported by `bear-ds train`"
        )
    _check_reference_catalog(folder, catalog)
    ref_cfg = cfg.model.model_copy(
        update={
            "name": "hf",
            "path": str(folder),
            "gradient_checkpointing": False,
            "lora": cfg.model.lora.model_copy(update={"enabled": False}),
        }
    )
    model = build_model(ref_cfg, tokenizer, dtype=dtype, folder=folder)  # partitioned as it loads under ZeRO-3
    model.requires_grad_(False)
    engine = None
    try:
        if zero3:
            import deepspeed  # deferred: DeepSpeed is heavy and needed under ZeRO-3 only

            if not any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned as it loaded?
                raise RuntimeError(
                    f"model.reference_path={folder} was loaded whole under ZeRO-3 (no DeepSpeed config registered)"
                )

            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "bf16": {"enabled": dtype == torch.bfloat16},
            }
            engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            yield engine.module
        else:
            yield model.to(device)
    finally:
        del model, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- per epoch
class PreferencePairs:
    """Negatives and reference log-probabilities of the current epoch; pair batches for the trainer."""

    def __init__(
        self,
        cfg: Any,
        *,
        prompts: list[list[int]],
        target_groups: list[int],
        history_groups: list[list[int]],
        catalog: Catalog,
        tokenizer: Any,
        zero3: bool,
        policy_folder: Path | None,
        accelerator: Any,
    ) -> None:
        self.cfg, self.loss_cfg = cfg, cfg.loss
        self.folder = Path(cfg.output_dir) / REFERENCE_DIR
        self.prompts, self.target_groups = prompts, np.asarray(target_groups, dtype=np.int64)
        self.history_groups = history_groups
        self.catalog, self.tokenizer, self.zero3, self.policy_folder = catalog, tokenizer, zero3, policy_folder
        self.accelerator = accelerator  # rank, device, barriers and gathers of the run's processes
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else catalog.eos_token_id
        self.static = cfg.model.reference_path is not None and cfg.loss.negative_source != "self"
        self.self_play = cfg.train.self_play  # SPRec rounds: epochs 2r (SFT) and 2r + 1 (S-DPO) share pairs
        self.groups: np.ndarray | None = None  # [N, 1 + K]
        self.reference_logps: torch.Tensor | None = None  # [N, 1 + K]
        self.epoch: int | None = None  # the epoch whose pairs are loaded
        self.sft_epoch = False  # self-play: the current epoch trains the positives' CE only
        self.prompts_truncated = 0  # examples whose oldest history items were dropped to fit the context

    def file_for(self, epoch: int) -> Path:
        if self.static:
            return self.folder / "epoch_0.pt"
        return self.folder / f"epoch_{epoch - epoch % 2 if self.self_play else epoch}.pt"

    def start_epoch(self, epoch: int, policy: Any, step: int) -> None:
        """This epoch's pairs: reloaded from the run folder on a resume (step > 0), else built and stored.

        At step 0 nothing is reused: a file there comes from an earlier run that never checkpointed.
        """
        path = self.file_for(epoch)
        self.sft_epoch = self.self_play and epoch % 2 == 0
        if self.epoch is not None and path == self.file_for(self.epoch):
            return
        if step > 0 and path.is_file():
            self._load(path)
        elif self.self_play and epoch % 2:
            # the round's pairs were built at its start, from the model before its SFT epoch
            raise MissingPathError(
                f"{path} (the pairs of this self-play round) is missing: cannot resume epoch {epoch}"
            )
        else:
            self._build(epoch, policy, step, path)
        self.epoch = epoch

    def _digests(self) -> dict[str, str | None]:
        """What this run's pairs are computed from: the frozen reference's files (None: the policy itself)
        and the examples. Rank 0 reads the weights once and sends the digests to the other ranks."""
        digests: dict[str, str | None] | None = None
        if self.accelerator.is_main_process:
            reference = self.cfg.model.reference_path
            digests = {
                "reference_digest": reference_digest(Path(reference)) if reference is not None else None,
                "examples_digest": examples_digest(self.prompts, self.target_groups, self.catalog),
            }
        if self.accelerator.num_processes > 1:
            digests = broadcast_object_list([digests])[0]
        return digests

    def _load(self, path: Path) -> None:
        """Reload a stored epoch file; refused (one line, nothing of it run) when damaged, tampered,
        or computed from another reference model or other examples than this run's."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" not in str(exc).lower():
                raise RunStateError(f"{path} is damaged ({_first_line(exc)}); delete it to recompute") from None
            raise UnsafeCheckpointError(
                f"{path} holds objects no reference file written by bear-ds holds (tampered, or from elsewhere): "
                "refused to load it, nothing from it was run; delete it to recompute"
            ) from None
        except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise RunStateError(
                f"{path} is not a readable reference file (truncated or damaged: {_first_line(exc)}); "
                "delete it to recompute"
            ) from None
        negatives, ref = (saved.get(k) if isinstance(saved, dict) else None for k in ("negatives", "reference_logps"))
        if not isinstance(negatives, torch.Tensor) or not isinstance(ref, torch.Tensor):
            raise RunStateError(f"{path} lacks the negatives and reference_logps tensors; delete it to recompute")
        negatives = negatives.numpy()
        n, k = len(self.prompts), self.loss_cfg.num_negatives
        if negatives.shape != (n, k) or tuple(ref.shape) != (n, 1 + k):
            raise RunStateError(
                f"{path} holds {tuple(negatives.shape)} negatives for this run's {n} examples x "
                f"loss.num_negatives={k}: it belongs to another configuration; use another output_dir"
            )
        mine = self._digests()
        if saved.get("examples_digest") != mine["examples_digest"]:
            raise RunStateError(
                f"{path} was computed for other training examples than this run's (another prepared data, prompt "
                "or tokenizer): resume with the configuration the run started with, or delete it to recompute"
            )
        if saved.get("reference_digest") != mine["reference_digest"]:
            raise RunStateError(
                f"{path} was computed from another reference model than model.reference_path="
                f"{self.cfg.model.reference_path} holds now (its config or weights files changed since): restore "
                "that model, or delete the file to recompute from the current one, or start a fresh run"
            )
        self.groups = np.concatenate([self.target_groups[:, None], negatives], axis=1)
        self.reference_logps = ref.float()
        if self.accelerator.is_main_process:
            logger.info("reference log-probabilities and negatives loaded from %s", path)

    def _negatives(self, epoch: int, policy: Any) -> tuple[np.ndarray, int]:
        k, seed, source = self.loss_cfg.num_negatives, self.cfg.train.seed, self.loss_cfg.negative_source
        if source == "self":
            predictions, _ = run_beam_evaluation(
                policy, self.tokenizer, self.catalog, self.prompts, list(self.target_groups), self.cfg.eval,
                self.accelerator, loss_name=self.loss_cfg.name, progress=self.accelerator.is_main_process,
            )  # fmt: skip
            return self_negatives(
                [p["groups"] for p in predictions], self.target_groups, self.catalog.num_groups, k,
                seed=seed, epoch=epoch,
            )  # fmt: skip
        weights = group_weights(self.catalog.item_group, self.catalog.num_groups, source, self.target_groups)
        history = self.history_groups if self.loss_cfg.exclude_history else None
        return sample_negatives(self.target_groups, history, weights, k, seed=seed), 0

    def _build(self, epoch: int, policy: Any, step: int, path: Path) -> None:
        started = time.perf_counter()
        negatives, filled = self._negatives(epoch, policy)
        groups = np.concatenate([self.target_groups[:, None], negatives], axis=1)
        reference = self.cfg.model.reference_path
        own_start = (
            reference is not None
            and step == 0
            and self.policy_folder is not None
            and Path(reference).resolve() == self.policy_folder.resolve()
        )
        device = self.accelerator.device
        kwargs = dict(
            batch_examples=self.cfg.train.micro_batch,
            pad_token_id=self.pad_id,
            device=device,
            synced=self.zero3,
            accelerator=self.accelerator,
        )
        net = getattr(policy, "module", policy)  # the model inside a DeepSpeed / DDP wrapper
        if reference is None or own_start:  # the policy as it is now (before any step, or at the epoch's start)
            ref = item_logps_pass(net, self.prompts, groups, self.catalog, self.loss_cfg, **kwargs)
        else:
            dtype = next(net.parameters()).dtype
            with reference_network(self.cfg, device, self.tokenizer, self.catalog, dtype, self.zero3) as frozen:
                ref = item_logps_pass(frozen, self.prompts, groups, self.catalog, self.loss_cfg, **kwargs)
        elapsed = time.perf_counter() - started
        digests = self._digests()
        if self.accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            payload = {
                "negatives": torch.from_numpy(negatives),
                "reference_logps": ref,
                "epoch": epoch,
                "negative_source": self.loss_cfg.negative_source,
                "reference": reference or "policy at the start of the epoch",
                "filled_negatives": filled,
                "seconds": elapsed,
                "prompts_truncated": self.prompts_truncated,
                **digests,
            }
            torch.save(payload, tmp)
            os.replace(tmp, path)  # a killed run never leaves a half file to reuse
            logger.info(
                "epoch %d: %s negatives (%d filled at random) and reference log-probabilities of %d pairs in %.1f s -> %s",
                epoch, self.loss_cfg.negative_source, filled, groups.size, elapsed, path,
            )  # fmt: skip
        self.accelerator.wait_for_everyone()
        self.groups, self.reference_logps = groups, ref

    def batch(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The micro-batch's pair sequences and their reference log-probabilities [b, 1 + K]."""
        rows = [int(i) for i in indices]
        batch = collate_pairs([self.prompts[i] for i in rows], self.groups[rows], self.catalog, self.pad_id)
        batch["reference_logps"] = self.reference_logps[rows]
        return {k: v.to(device) for k, v in batch.items()}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


__all__ = [
    "REFERENCE_DIR",
    "PreferencePairs",
    "check_reference_model",
    "collate_pairs",
    "item_logps_pass",
    "prompt_ids_of",
]
