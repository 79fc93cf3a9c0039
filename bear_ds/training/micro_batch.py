"""The trainer's side of one micro-batch: loading it, running the configured loss, adding up a step.

`micro_batch_loss(model, batch, ctx)` looks `cfg.loss.name` up in the table of losses
(`loss_table.LOSSES`; what a loss gets and returns: `loss_api.py`) and returns its context
manager; `StepTotals` adds the micro-batches' sums on the device and reduces them once per step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from bear_ds.config import Config
from bear_ds.losses import LossSums, ResponsePositions, metrics_from_sums
from bear_ds.training.batching import collate
from bear_ds.training.examples import EncodedExamples
from bear_ds.training.loss_api import LossContext, MicroBatch, MicroBatchLoss
from bear_ds.training.loss_table import loss_spec


def load_micro_batch(
    examples: EncodedExamples, indices: np.ndarray, pad_token_id: int, device: torch.device, where: str
) -> MicroBatch:
    """The micro-batch's tensors on `device`, with its response positions (`response_positions`).

    On a GPU the host tensors are pinned and copied without waiting (a blocking copy waits for
    the device's queue to drain)."""
    tensors = collate(examples.input_ids, examples.labels, indices, pad_token_id)
    response = response_positions(examples, indices, width=tensors["input_ids"].shape[1])
    non_blocking = device.type == "cuda"
    if non_blocking:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
        response = response.pin_memory()
    tensors = {k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items()}
    return MicroBatch(**tensors, indices=indices, where=where, response=response.to(device, non_blocking))


def response_positions(examples: EncodedExamples, indices: np.ndarray, width: int) -> ResponsePositions:
    """Where the response tokens of the micro-batch `indices` (right-padded to `width`) are, their
    tokens and trie states, from the encoded examples alone (nothing on a device is read).

    An example's response is its last labels (`encode_example`); label j is predicted at j - 1."""
    index, targets, states, children = [], [], [], []
    for row, i in enumerate(int(i) for i in indices):
        length, response = len(examples.input_ids[i]), len(examples.response_states[i])
        start = length - response  # first response label
        if start < 1:
            raise ValueError(f"training example {i} has no prompt token before its response")
        index.append(row * width + np.arange(start - 1, length - 1))
        targets.append(examples.labels[i][start:])
        states.append(examples.response_states[i])
        children.append(examples.response_children[i])
    return ResponsePositions(
        index=torch.from_numpy(np.concatenate(index).astype(np.int64)),
        targets=torch.tensor([t for row in targets for t in row], dtype=torch.int64),
        states=torch.from_numpy(np.concatenate(states).astype(np.int64)),
        children=np.concatenate(children),
    )


def micro_batch_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> contextlib.AbstractContextManager:
    """The configured loss of one micro-batch (a context manager: run the backward inside it)."""
    return loss_spec(ctx.cfg.loss.name).compute(model, batch, ctx)


class StepTotals:
    """The step's loss sums, added on the device over its micro-batches and read once after the
    all-reduce (every read waits for the device; one per micro-batch would leave it idle).

    Layout of the vector: LossSums fields, then (numerator, denominator) per extra metric, then the
    sum of the finite micro-batch losses and their count.
    """

    def __init__(self, device: torch.device, extra_metrics: tuple[str, ...]) -> None:
        self.extra_metrics = extra_metrics
        self.sums = torch.zeros(len(LossSums.__dataclass_fields__) + 2 * len(extra_metrics), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.finite_micro = torch.zeros((), device=device)

    def add(self, out: MicroBatchLoss, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a micro-batch's sums when `finite` (a bool device scalar); `loss` is the one backpropagated."""
        if set(out.extras) != set(self.extra_metrics):
            raise ValueError(
                f"the loss returned extra metrics {sorted(out.extras)} but registered {list(self.extra_metrics)}"
            )
        pairs = [t.detach().float() for name in self.extra_metrics for t in out.extras[name]]
        vector = torch.cat([out.sums.as_tensor(), torch.stack(pairs)]) if pairs else out.sums.as_tensor()
        self.sums = self.sums + torch.where(finite, vector, 0.0)
        self.loss_sum = self.loss_sum + torch.where(finite, loss.detach(), 0.0)
        self.finite_micro = self.finite_micro + finite.float()

    def reduce(self, accelerator, cfg: Config) -> dict[str, float]:
        """Token-weighted means over every micro-batch of every rank (collective); "loss" first.

        All nan when every micro-batch was skipped (train.on_nonfinite=skip): nothing to average.
        """
        local = torch.cat([self.sums, self.loss_sum[None], self.finite_micro[None]]).double()
        total = accelerator.reduce(local, reduction="sum").cpu()
        n_sums = len(LossSums.__dataclass_fields__)
        n_finite = float(total[-1])
        means = {
            "loss": float(total[-2]) / max(n_finite, 1.0),  # mean of the micro-batch losses
            **metrics_from_sums(LossSums.from_tensor(total[:n_sums]), name=cfg.loss.name, form=cfg.loss.form),
        }
        for k, name in enumerate(self.extra_metrics):
            numerator, denominator = float(total[n_sums + 2 * k]), float(total[n_sums + 2 * k + 1])
            means[name] = numerator / denominator if denominator else float("nan")
        if n_finite == 0:
            means = dict.fromkeys(means, float("nan"))
        return means


__all__ = ["StepTotals", "load_micro_batch", "micro_batch_loss", "response_positions"]
