"""Which examples form each micro-batch of each optimiser step: a pure function of (seed, epoch).

Per epoch:
1. a permutation of the examples drawn from `numpy.random.default_rng([seed, epoch])`;
2. it is cut into windows of `length_bucket` global batches; each window is sorted by length, so
   a global batch holds examples of similar length (less padding), then cut into global batches;
3. the global batches are shuffled (same generator), so long and short steps interleave;
4. each global batch (sorted by length) is cut into `global_batch / micro_batch` micro-batches.

Micro-batch j of a step runs on rank j % world_size as accumulation round j // world_size. The
micro-batches themselves do not depend on the world size: 1 rank x accumulation 2 and 2 ranks x
accumulation 1 compute the same gradient. The last `N mod global_batch` examples of the epoch's
permutation do not fit a full step and are left out of that epoch (a different set each epoch);
the count is reported by `epoch_schedule`.

Resuming restores (epoch, step within the epoch) and recomputes the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.errors import ConfigError


@dataclass(frozen=True)
class EpochSchedule:
    steps: list[list[np.ndarray]]  # steps[s][j]: example indices of micro-batch j of step s
    left_out: int  # examples of the permutation's tail that do not fill a global batch


def epoch_schedule(
    lengths: np.ndarray, *, global_batch: int, micro_batch: int, seed: int, epoch: int, length_bucket: int = 16
) -> EpochSchedule:
    """The epoch's steps as lists of micro-batches of example indices (see the module docstring)."""
    if global_batch % micro_batch:
        raise ConfigError(f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch}")
    n = len(lengths)
    if n < global_batch:
        raise ConfigError(f"{n} training examples are fewer than train.global_batch={global_batch}: no full step")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    num_steps = n // global_batch
    used = order[: num_steps * global_batch]
    window = global_batch * length_bucket
    batches: list[np.ndarray] = []
    for start in range(0, len(used), window):
        chunk = used[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]  # by length, ties in permutation order
        batches.extend(chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch))
    step_order = rng.permutation(len(batches))
    per_step = global_batch // micro_batch
    steps = [np.split(batches[s], per_step) for s in step_order]
    return EpochSchedule(steps=steps, left_out=n - len(used))


def rank_micro_batches(step: list[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """The micro-batches rank `rank` runs in this step, in accumulation order."""
    return step[rank::world_size]


def padded_fraction(lengths: np.ndarray, step: list[np.ndarray]) -> float:
    """Share of padding among the tokens of a step's micro-batches (each padded to its longest)."""
    real = sum(int(lengths[m].sum()) for m in step)
    total = sum(int(lengths[m].max()) * len(m) for m in step)
    return 1.0 - real / total


def collate(
    input_ids: list[list[int]], labels: list[list[int]], indices: np.ndarray, pad_token_id: int
) -> dict[str, torch.Tensor]:  # noqa: F821
    """Right-padded tensors of one micro-batch: input_ids, attention_mask [B, L]; labels [B, L] (-100 pad)."""
    rows = [int(i) for i in indices]
    width = max(len(input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(input_ids[i])
        ids[r, :n] = torch.tensor(input_ids[i])
        lab[r, :n] = torch.tensor(labels[i])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
