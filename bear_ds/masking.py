"""Next-token log-probabilities restricted to the trie: the one definition, used by the losses,
the beam search and the pruning analysis.

Two mask modes (`eval.mask`; the losses use "before"):
- "after": log-softmax over the whole vocabulary, then the tokens outside the trie get -inf
  (Hugging Face `generate` with `prefix_allowed_tokens_fn`; how an LML-trained model is decoded);
- "before": the logits outside the trie get -inf, then the log-softmax renormalises over the valid
  tokens (HF `renormalize_logits=True`; the released MSL/BEAR softmax and decoding).
A row with no valid token is all -inf (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bear_ds.errors import ConfigError

MASK_MODES = ("after", "before")
NEG_INF = float("-inf")


def check_mask_mode(mask: str) -> str:
    """`mask` if it is a mask mode, else a ValueError naming the modes (the one mask-mode check)."""
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be 'after' or 'before', got {mask!r}")
    return mask


def resolve_mask(mask: str, loss_name: str | None) -> str:
    """eval.mask as decoded: "auto" is the released protocol, "after" for LML and "before" for MSL/BEAR
    (`bear_ds.evaluation.evaluate.choose_mask` adds why, for the outputs of evaluate and analyze)."""
    if mask == "auto":
        if loss_name is None:
            raise ConfigError(
                "eval.mask=auto needs the training loss (loss.name) to choose; set eval.mask=after or before"
            )
        return "after" if loss_name == "lml" else "before"
    return check_mask_mode(mask)


def trie_log_softmax(
    logits: torch.Tensor,
    mask: str,
    *,
    allowed: torch.Tensor | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """float32 log softmax(logits / tau) restricted to the trie, in mask mode `mask`.

    logits [N, V] (any float dtype). Either `allowed` [N, V] bool (None: no restriction, the full
    softmax) -> [N, V] with -inf outside `allowed`; or `pairs` = (rows [P], tokens [P]), every
    allowed (row, token) of the N rows (`TokenTrie.allowed_pairs`) -> [P], the log-probability of
    each pair, without building an [N, V] mask (the exhaustive analysis walks whole catalogs).
    """
    check_mask_mode(mask)
    z = logits.float()  # [N, V]
    if pairs is not None:
        rows, tokens = pairs
        if tau != 1.0:
            z = z / tau
        values = z[rows, tokens]  # [P]
        if mask == "after":
            return values - torch.logsumexp(z, dim=-1)[rows]
        return pair_log_softmax(values, rows, z.shape[0])
    if allowed is None:
        return F.log_softmax(z / tau if tau != 1.0 else z, dim=-1)
    if mask == "after":
        return F.log_softmax(z / tau if tau != 1.0 else z, dim=-1).masked_fill(~allowed, NEG_INF)
    z = z.masked_fill(~allowed, NEG_INF)
    if tau != 1.0:
        z = z / tau
    # the second fill turns the NaN of a row with no valid token into -inf; valid entries are untouched
    return F.log_softmax(z, dim=-1).masked_fill(~allowed, NEG_INF)


def pair_log_softmax(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mask "before" from the allowed pairs' logits alone: values [P] float32 of (row, token) pairs,
    rows [P] in [0, num_rows) -> [P] log softmax of each value among its row's pairs."""
    row_max = torch.full((num_rows,), NEG_INF, device=values.device).scatter_reduce(0, rows, values, reduce="amax")
    sum_exp = torch.zeros_like(row_max).index_add_(0, rows, torch.exp(values - row_max[rows]))  # [N]
    return values - (row_max + torch.log(sum_exp))[rows]


__all__ = ["MASK_MODES", "check_mask_mode", "pair_log_softmax", "resolve_mask", "trie_log_softmax"]
