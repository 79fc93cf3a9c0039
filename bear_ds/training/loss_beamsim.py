"""loss.name=beamsim: the simulated beam search of the micro-batch, then the survival loss
(`bear_ds/losses/beamsim.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from bear_ds.generation.survival import prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.losses import backbone_forward, lm_head_context, response_loss, select_response
from bear_ds.models import unwrap_model
from bear_ds.training.loss_api import LossContext, MicroBatch, MicroBatchLoss, head_zero


@contextlib.contextmanager
def beamsim_micro_batch_loss(model: Any, batch: MicroBatch, ctx: LossContext) -> Iterator[MicroBatchLoss]:
    """beamsim (`bear_ds/losses/beamsim.py`): the training forward (also keeping its KV cache), the
    simulated beam search of the micro-batch's prompts started from it (no gradient, the current
    weights; under ZeRO-3 every rank runs it and the ranks' decoding steps are synced), then the
    chunked head with the survival terms. Extra metric `sim_pruned_frac`: examples whose gold item
    the search does not return / examples; timing `search`."""
    cfg = ctx.cfg.loss
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    out = backbone_forward(model, ids, mask, prompt_ends(mask, labels))
    search = simulate_beam_search(
        unwrap_model(model), ids, mask, labels, ctx.trie,
        beam_width=cfg.beam_width, eos_token_id=ctx.catalog.eos_token_id, mask="before" if cfg.masked else "after",
        tau=cfg.tau, synced=ctx.zero3, prompt_state=prompt_state_of_forward(mask, labels, out.prompt_logits, out.cache),
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
            zero=head_zero(h, head),
            extras={"sim_pruned_frac": (pruned, pruned.new_tensor(float(search.pruned.numel())))},
            timings={"search": search.search_s},
        )


__all__ = ["beamsim_micro_batch_loss"]
