"""loss.name=beamsim: the simulated beam search of the micro-batch, then the survival loss
(`bear_ds/losses/beamsim.py`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from bear_ds.generation.survival import prompt_ends, prompt_state_of_forward, simulate_beam_search
from bear_ds.generation.zero3_gather import choose_gather, decoding_weights
from bear_ds.losses import backbone_forward, lm_head_context, response_loss, select_response
from bear_ds.models import unwrap_model
from bear_ds.training.loss_api import LossContext, MicroBatch, MicroBatchLoss, head_zero

logger = logging.getLogger(__name__)


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
    h, y, s = select_response(hidden, labels, ctx.trie, positions=batch.response)  # [N, H], [N], [N]
    with lm_head_context(model) as head:
        result = response_loss(h, head, y, s, ctx.trie, cfg, search=search, children=batch.response_children())
        pruned = search.pruned.float().sum()
        yield MicroBatchLoss(
            loss=result.loss,
            sums=result.sums,
            zero=head_zero(h, head),
            extras={"sim_pruned_frac": (pruned, pruned.new_tensor(float(search.pruned.numel())))},
            timings={"search": search.search_s},
        )


__all__ = ["beamsim_micro_batch_loss"]
