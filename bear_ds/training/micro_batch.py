"""The loss of one micro-batch: the one place where a training loss meets the model.

`micro_batch_loss(model, batch, ctx)` dispatches on `cfg.loss.name` to the loss registered in
`LOSSES` and yields a `MicroBatchLoss`; the trainer runs the backward inside the `with` block
(under ZeRO-3 the gathered lm_head must still be held when the chunks are recomputed):

    with accelerator.accumulate(model), micro_batch_loss(model, batch, ctx) as out:
        accelerator.backward(out.loss)
        totals.add(out, out.loss, finite)

Adding a loss (e.g. one that runs a beam search over the micro-batch's prompts first, or one that
needs negative sequences and reference log-probabilities per example):
1. the math as pure tensor functions in `bear_ds/losses/` (returning sums, normalised once);
2. a context manager `compute(model, batch, ctx) -> Iterator[MicroBatchLoss]` registered with
   `register_loss("name", compute, extra_metrics=(...), setup=...)` (and the name added to
   `LossConfig.name` in `bear_ds/config.py`). It gets the micro-batch's tensors, the example
   indices and prompts (`batch.prompt_ids()`), and `ctx` (config, trie, catalog, tokenizer, all
   encoded examples, whether ZeRO-3 partitions the model, and `ctx.loss_state`: what `setup`
   returned, e.g. reference log-probabilities computed once before training);
3. per-step metrics beyond the LossSums ones: name them in `extra_metrics` and return each in
   `MicroBatchLoss.extras` as a (numerator, denominator) pair of device scalars. The trainer adds
   them over the step's micro-batches and ranks and logs numerator / denominator under that name
   in `train_log.jsonl` (e.g. `reward_accuracy` = correct pairs / pairs).
Every micro-batch on every rank must take part in the same collectives (ZeRO-3 gathers, a
synced beam search), whatever its number of response tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bear_ds.catalog import IGNORE_INDEX, Catalog
from bear_ds.config import Config
from bear_ds.generation.survival import prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.generation.zero3_gather import choose_gather, decoding_weights
from bear_ds.losses import (
    LossSums,
    backbone_forward,
    backbone_hidden_states,
    lm_head_context,
    metrics_from_sums,
    response_loss,
    select_response,
)
from bear_ds.models import unwrap_model
from bear_ds.training.batching import collate
from bear_ds.training.examples import EncodedExamples
from bear_ds.trie import TokenTrie

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch as the model sees it, and where it comes from (for messages and lookups)."""

    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX on prompt and padding
    indices: np.ndarray  # [B] example indices into `LossContext.examples`
    where: str  # "step S (epoch E, ...), accumulation round R, examples [...] on rank K"

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
    zero: Callable[[], torch.Tensor]  # a 0 that reaches every parameter the loss reaches (a skipped batch)
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


LOSSES: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    compute: MicroBatchLossFn,
    *,
    extra_metrics: tuple[str, ...] = (),
    setup: Callable[[Any, LossContext], Any] | None = None,
    epoch_start: Callable[[Any, LossContext, int, int], None] | None = None,
) -> None:
    """Make `loss.name=name` train with `compute` (see the module docstring)."""
    LOSSES[name] = LossSpec(compute, tuple(extra_metrics), setup, epoch_start)


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r} has no training loss registered (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


@contextlib.contextmanager
def token_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """LML / MSL / BEAR: the chunked response head on the backbone's hidden states.

    Hidden state i predicts token i + 1; only response positions are projected to the vocabulary.
    """
    hidden = backbone_hidden_states(model, batch.input_ids, batch.attention_mask)  # [B, L, H]
    h, y, s = select_response(hidden, batch.labels, ctx.trie)  # [N, H], [N], [N]
    with lm_head_context(model) as head:
        result = response_loss(h, head, y, s, ctx.trie, ctx.cfg.loss)
        yield MicroBatchLoss(
            loss=result.loss,
            sums=result.sums,
            zero=lambda: h.float().sum() * 0.0 + head.weight.float().sum() * 0.0,
        )


for _name in ("lml", "msl", "bear"):
    register_loss(_name, token_loss)


@contextlib.contextmanager
def beamsim_micro_batch_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """beamsim (`bear_ds/losses/beamsim.py`): the training forward (also keeping its KV cache), the
    simulated beam search of the micro-batch's prompts started from it (no gradient, the current
    weights; under ZeRO-3 gathered once for the search, or, per eval.gather, at every step with
    the ranks' decoding steps synced), then the chunked head with the survival terms. Extra metric `sim_pruned_frac`: examples whose gold item
    the search does not return / examples; timing `search`."""
    cfg = ctx.cfg.loss
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    out = backbone_forward(model, ids, mask, prompt_ends(mask, labels))
    net = unwrap_model(model)
    if ctx.zero3 and ctx.search_gather is None:
        ctx.search_gather = choose_gather(ctx.cfg.eval.gather, net, ids.device)
        if ctx.accelerator is None or ctx.accelerator.is_main_process:
            logger.info("beamsim's search under ZeRO-3: weights gathered %s (eval.gather=%s)",
                        "once per search" if ctx.search_gather == "once" else "at every step",
                        ctx.cfg.eval.gather)  # fmt: skip
    # ZeRO-3 weights gathered once for the search (hooks off, no synced steps), or at every step
    with decoding_weights(model, ctx.search_gather or "per_step", ids.device) as gather:
        search = simulate_beam_search(
            net, ids, mask, labels, ctx.trie,
            beam_width=cfg.beam_width, eos_token_id=ctx.catalog.eos_token_id, mask="before" if cfg.masked else "after",
            tau=cfg.tau, synced=ctx.zero3 and gather != "once",
            prompt_state=prompt_state_of_forward(mask, labels, out.prompt_logits, out.cache),
        )  # fmt: skip
    hidden = out.hidden  # [B, L, H]
    del out  # the forward's KV cache is no longer needed
    h, y, s = select_response(hidden, labels, ctx.trie)  # [N, H], [N], [N]
    with lm_head_context(model) as head:
        result = response_loss(h, head, y, s, ctx.trie, cfg, search=search)
        pruned = search.pruned.float().sum()
        yield MicroBatchLoss(
            loss=result.loss,
            sums=result.sums,
            zero=lambda: h.float().sum() * 0.0 + head.weight.float().sum() * 0.0,
            extras={"sim_pruned_frac": (pruned, pruned.new_tensor(float(search.pruned.numel())))},
            timings={"search": search.search_s},
        )


register_loss("beamsim", beamsim_micro_batch_loss, extra_metrics=("sim_pruned_frac",))


def load_micro_batch(
    examples: EncodedExamples, indices: np.ndarray, pad_token_id: int, device: torch.device, where: str
) -> MicroBatch:
    tensors = {k: v.to(device) for k, v in collate(examples.input_ids, examples.labels, indices, pad_token_id).items()}
    return MicroBatch(**tensors, indices=indices, where=where)


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


__all__ = [
    "LOSSES",
    "LossContext",
    "LossSpec",
    "MicroBatch",
    "MicroBatchLoss",
    "StepTotals",
    "beamsim_micro_batch_loss",
    "load_micro_batch",
    "loss_spec",
    "micro_batch_loss",
    "register_loss",
    "token_loss",
]

# losses defined in their own modules register themselves on import
import bear_ds.training.preference  # noqa: E402, F401  (loss.name=sdpo)
