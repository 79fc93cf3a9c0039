"""The training-loss plug-in point: what a loss of one micro-batch gets and what it returns.

A training loss is a context manager `compute(model, batch, ctx) -> Iterator[MicroBatchLoss]`,
listed in `bear_ds.training.loss_table.LOSSES` (the built-in ones) or added with
`register_loss(name, compute, extra_metrics=(...), setup=..., epoch_start=...)`; `loss.name` picks
it. The trainer runs the backward inside the `with` block (under ZeRO-3 the gathered lm_head must
still be held when the chunks are recomputed):

    with accelerator.accumulate(model), micro_batch_loss(model, batch, ctx) as out:
        accelerator.backward(out.loss)
        totals.add(out, out.loss, finite)

Adding a loss (e.g. one that runs a beam search over the micro-batch's prompts first, or one that
needs negative sequences and reference log-probabilities per example):
1. the math as pure tensor functions in `bear_ds/losses/` (returning sums, normalised once);
2. `compute` gets the micro-batch's tensors, the example indices and prompts
   (`batch.prompt_ids()`), and `ctx` (config, trie, catalog, tokenizer, all encoded examples,
   whether ZeRO-3 partitions the model, and `ctx.loss_state`: what `setup` returned, e.g.
   reference log-probabilities computed once before training);
3. per-step metrics beyond the LossSums ones: name them in `extra_metrics` and return each in
   `MicroBatchLoss.extras` as a (numerator, denominator) pair of device scalars. The trainer adds
   them over the step's micro-batches and ranks and logs numerator / denominator under that name
   in `train_log.jsonl` (e.g. `reward_accuracy` = correct pairs / pairs).
Every micro-batch on every rank must take part in the same collectives (ZeRO-3 gathers, a
synced beam search), whatever its number of response tokens.

This module imports no other training module: the losses, the table and the trainer import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.losses import LMHead, zero_through

if TYPE_CHECKING:
    from bear_ds.catalog import Catalog
    from bear_ds.config import Config
    from bear_ds.losses import LossSums, ResponsePositions
    from bear_ds.training.examples import EncodedExamples
    from bear_ds.trie import TokenTrie


@dataclass
class MicroBatch:
    """One micro-batch as the model sees it, and where it comes from (for messages and lookups)."""

    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX on prompt and padding
    indices: np.ndarray  # [B] example indices into `LossContext.examples`
    where: str  # "step S (epoch E, ...), accumulation round R, examples [...] on rank K"
    # the response positions, tokens and trie states, computed on the host (`select_response(...,
    # positions=batch.response)` then waits for nothing); None: found on the device from `labels`
    response: ResponsePositions | None = None

    def response_children(self) -> np.ndarray | None:
        """`response_loss(..., children=)`: the trie children of each response state, when known."""
        return None if self.response is None else self.response.children

    def prompt_ids(self) -> list[list[int]]:
        """The prompt token ids of each example (without the response), for losses that decode."""
        prompts = []
        for row in range(self.labels.shape[0]):
            response = (self.labels[row] != IGNORE_INDEX).nonzero()
            start = int(response[0, 0]) if response.numel() else int(self.attention_mask[row].sum())
            prompts.append(self.input_ids[row, :start].tolist())
        return prompts


@dataclass
class LossContext:
    """What a loss may read besides the micro-batch; built once by the trainer."""

    cfg: Config
    trie: TokenTrie  # on the training device
    catalog: Catalog
    tokenizer: Any
    examples: EncodedExamples
    zero3: bool  # parameters are ZeRO-3 partitioned: every rank must run the same collectives
    loss_state: Any = None  # what the loss's `setup` returned
    train_rows: Any = None  # the train split (`history`, `target` item ids), row i = example i
    accelerator: Any = None  # the run's Accelerator (rank, device, gathers; the evaluator's beam search)
    # beamsim's search under ZeRO-3: eval.gather as decided at the first micro-batch ("once" or
    # "per_step"), kept for the run (deciding auto is a collective and a host sync)
    search_gather: str | None = None


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # scalar float32, carries gradient
    sums: LossSums  # the LossSums diagnostics (ce, counted, positions, pruning risk, ...)
    zero: Callable[[], torch.Tensor]  # a 0 that reaches every parameter the loss reaches (a skipped batch): `head_zero`
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (num, den)
    # seconds of named phases of this micro-batch (this rank); the trainer logs each phase's sum over
    # the step's micro-batches divided by the step time as `{name}_time_frac` (rank 0's)
    timings: dict[str, float] = field(default_factory=dict)


MicroBatchLossFn = Callable[[Any, MicroBatch, LossContext], contextlib.AbstractContextManager[MicroBatchLoss]]


@dataclass(frozen=True)
class LossSpec:
    compute: MicroBatchLossFn
    extra_metrics: tuple[str, ...] = ()  # keys of `MicroBatchLoss.extras`, logged per step
    # (model, ctx) -> ctx.loss_state, once, after the model is built and before a resume restores
    # weights: it sees the initial model (e.g. the reference policy of a preference loss)
    setup: Callable[[Any, LossContext], Any] | None = None
    # (model, ctx, epoch, step) at the start of every epoch (also a resumed one), before its first step;
    # step = optimiser steps done so far
    epoch_start: Callable[[Any, LossContext, int, int], None] | None = None


def head_zero(hidden: torch.Tensor, head: LMHead) -> Callable[[], torch.Tensor]:
    """`MicroBatchLoss.zero` of a loss computed through the chunked head: a 0 through the hidden
    states and the head's parameters, backpropagated instead of a skipped micro-batch's loss so
    that every rank's backward reaches the same parameters (ZeRO's gradient hooks still fire)."""
    return functools.partial(zero_through, hidden, head.weight, head.bias)


def with_loss_name(ctx: LossContext, name: str) -> LossContext:
    """`ctx` whose config says `loss.name=name`, the other loss settings kept (`ctx` itself if it does)."""
    if ctx.cfg.loss.name == name:
        return ctx
    loss_cfg = ctx.cfg.loss.model_copy(update={"name": name})
    return dataclasses.replace(ctx, cfg=ctx.cfg.model_copy(update={"loss": loss_cfg}))


def as_loss(name: str, compute: MicroBatchLossFn) -> MicroBatchLossFn:
    """`compute` run as loss `name` whatever `loss.name` selected it.

    The pure losses choose their math by `loss_cfg.name`, so without this a built-in loss registered
    again under a new name (`register_loss("lml_copy", loss_spec("lml").compute)`) would compute
    another loss; with it, the copy computes the same one.
    """

    @functools.wraps(compute)
    def named(model: Any, batch: MicroBatch, ctx: LossContext) -> contextlib.AbstractContextManager[MicroBatchLoss]:
        return compute(model, batch, with_loss_name(ctx, name))

    return named


__all__ = [
    "LossContext",
    "LossSpec",
    "MicroBatch",
    "MicroBatchLoss",
    "MicroBatchLossFn",
    "as_loss",
    "head_zero",
    "with_loss_name",
]
