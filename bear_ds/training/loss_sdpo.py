"""loss.name=sdpo: softmax-DPO of one micro-batch over its examples' positive and negatives
(`bear_ds/losses/preference.py`), with the per-epoch pairs of `bear_ds.training.preference_pairs`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bear_ds.errors import ConfigError
from bear_ds.evaluation.evaluate import check_context
from bear_ds.losses import backbone_hidden_states, lm_head_context, preference_loss, response_rows, select_response
from bear_ds.models import pretrained_folder
from bear_ds.training.loss_api import LossContext, MicroBatch, MicroBatchLoss, head_zero, with_loss_name
from bear_ds.training.loss_token import token_loss
from bear_ds.training.preference_pairs import PreferencePairs, check_reference_model, prompt_ids_of


def sdpo_setup(model: Any, ctx: LossContext) -> PreferencePairs:
    """`ctx.loss_state`: the run's `PreferencePairs` (negatives and reference log-probabilities per epoch)."""
    rows, catalog, cfg = ctx.train_rows, ctx.catalog, ctx.cfg
    k = cfg.loss.num_negatives
    if catalog.num_groups - 1 < k:  # every negative is another title group than the target's
        raise ConfigError(
            f"loss.num_negatives={k} needs at least {k + 1} distinct titles in the catalog, which has "
            f"{catalog.num_groups}: lower loss.num_negatives or use a larger catalog"
        )
    if cfg.model.reference_path is not None:  # before any epoch: the pass that loads it comes later
        check_reference_model(Path(cfg.model.reference_path), ctx.tokenizer, catalog)
    # the trainer fitted the examples with room for the longest title (train.truncate_history)
    prompts = prompt_ids_of(ctx.examples.input_ids, ctx.examples.labels)
    context = int(getattr(getattr(model, "module", model).config, "max_position_embeddings", 0) or 10**9)
    check_context(prompts, catalog.trie.max_depth, context, what="training row")  # any title may be a negative
    pairs = PreferencePairs(
        ctx.cfg, prompts=prompts, target_groups=[catalog.group_of_item(t) for t in rows["target"]],
        history_groups=[[catalog.group_of_item(i) for i in h] for h in rows["history"]], catalog=catalog,
        tokenizer=ctx.tokenizer, zero3=ctx.zero3, policy_folder=pretrained_folder(ctx.cfg.model),
        accelerator=ctx.accelerator,
    )  # fmt: skip
    pairs.prompts_truncated = ctx.examples.truncated_examples
    return pairs


def sdpo_epoch_start(model: Any, ctx: LossContext, epoch: int, step: int) -> None:
    """This epoch's pairs, built (or reloaded on a resume) before its first step."""
    ctx.loss_state.start_epoch(epoch, model, step)


@contextlib.contextmanager
def sdpo_micro_batch_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """S-DPO of one micro-batch: its examples' 1 + K sequences through the backbone and the chunked head
    (the pure loss is `bear_ds.losses.sdpo_loss`)."""
    if ctx.loss_state.sft_epoch:  # self-play: this round's SFT epoch
        with _sft_loss(model, batch, ctx) as out:
            yield out
        return
    pairs = ctx.loss_state.batch(batch.indices, batch.input_ids.device)
    hidden = backbone_hidden_states(model, pairs["input_ids"], pairs["attention_mask"])  # [b(1+K), L, H]
    h, y, s = select_response(hidden, pairs["labels"], ctx.trie)
    rows = response_rows(pairs["labels"])  # [N]: the sequence of each response position
    with lm_head_context(model) as head:
        out = preference_loss(h, head, y, s, rows, pairs["reference_logps"], ctx.trie, ctx.cfg.loss)
        sums = out.sums
        yield MicroBatchLoss(
            loss=out.loss,
            sums=sums.token_sums(),
            zero=head_zero(h, head),
            extras={
                "pref_loss": (sums.pref.detach(), sums.examples),
                "reward_margin": (sums.margin, sums.examples),
                "reward_accuracy": (sums.correct, sums.negatives),
            },
        )


@contextlib.contextmanager
def _sft_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """The positives' CE with the loss's softmax (MSL with tau when loss.masked, else LML); no pairs."""
    with token_loss(model, batch, with_loss_name(ctx, "msl" if ctx.cfg.loss.masked else "lml")) as out:
        none = out.loss.new_zeros(()).detach()  # logged as nan: no pairs in an SFT epoch
        out.extras = {key: (none, none) for key in PREFERENCE_METRICS}
        yield out


PREFERENCE_METRICS = ("pref_loss", "reward_margin", "reward_accuracy")


__all__ = ["PREFERENCE_METRICS", "sdpo_epoch_start", "sdpo_micro_batch_loss", "sdpo_setup"]
