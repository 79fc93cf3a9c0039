"""loss.name=lml, msl, bear: the token-level losses of one micro-batch (`bear_ds/losses/functional.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bear_ds.losses import backbone_hidden_states, lm_head_context, response_loss, select_response
from bear_ds.training.loss_api import LossContext, MicroBatch, MicroBatchLoss, head_zero


@contextlib.contextmanager
def token_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """LML / MSL / BEAR: the chunked response head on the backbone's hidden states.

    Hidden state i predicts token i + 1; only response positions are projected to the vocabulary.
    """
    hidden = backbone_hidden_states(model, batch.input_ids, batch.attention_mask)  # [B, L, H]
    h, y, s = select_response(hidden, batch.labels, ctx.trie, positions=batch.response)  # [N, H], [N], [N]
    with lm_head_context(model) as head:
        result = response_loss(h, head, y, s, ctx.trie, ctx.cfg.loss, children=batch.response_children())
        yield MicroBatchLoss(
            loss=result.loss,
            sums=result.sums,
            zero=head_zero(h, head),
        )


__all__ = ["token_loss"]
