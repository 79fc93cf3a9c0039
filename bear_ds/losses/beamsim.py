"""beamsim: the paper's direct beam-search survival objective (eq. 3.1) as a trainable loss.

For one example with prompt x and gold response y = (y_1 .. y_T) (the quoted title, then EOS):

    g_s     = sum_{r <= s} log p(y_r | x, y_<r)          teacher-forced, with gradient, from the
              same forward and softmax as the CE (trie mask before the softmax when loss.masked,
              temperature tau)
    theta_s = the survival threshold of step s of the constrained beam search of width B run on x
              with the current weights, without gradient, same scoring, no length penalty
              (`bear_ds.generation.survival`: the B-th best unfinished candidate for s < T; at
              s = T the larger of the B-th best candidate, EOS ones included, and the B-th item
              the search returns), detached
    L       = [ sum_{counted t} CE_t + lam * sum_examples sum_{s=1..T} log sigmoid((theta_s - g_s) / xi) ]
              / (number of counted positions)

CE_t = -log p(y_t | ...) is the masked cross-entropy BEAR uses, "counted" its positions with more
than one valid token, and the normalisation that of BEAR's regulariser form (loss.form =
regularizer): the sum of the CE and of the lam-weighted survival terms over the micro-batch,
divided by its counted positions. A step whose theta_s is -inf (no constraint: nothing the search
returns) adds no term. The gold item survives the search iff g_s >= theta_s for every s.

The chunked head (`bear_ds.losses.head.response_loss`) computes log p(y_t) chunk by chunk and
returns them; the survival terms are formed once from them, so the chunked loss and its gradient
equal `beamsim_loss` on the unchunked logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bear_ds.losses.functional import position_terms


@dataclass
class SimulatedSearch:
    """The search's verdict on one micro-batch of U examples (all tensors detached)."""

    thresholds: torch.Tensor  # float32 [U, T]: theta_s at column s - 1 (-inf: no constraint), T >= max length
    lengths: torch.Tensor  # int64 [U]: response length T_u (EOS included)
    pruned: torch.Tensor  # bool [U]: the search does not return the gold item
    search_s: float = 0.0  # wall time of the search
    steps: int = 0  # decoding steps this process's search ran (the longest of its users)


def prefix_log_probs(log_p_gold: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """g [U, T]: cumulative gold log-probs per example; log_p_gold [N] holds the examples' response
    positions one example after the other (row-major, as `select_response` gives them). Columns at
    or beyond an example's length hold its total (they are never used)."""
    if int(lengths.sum()) != log_p_gold.numel():
        raise ValueError(f"{log_p_gold.numel()} response positions but the lengths add up to {int(lengths.sum())}")
    width = int(lengths.max()) if lengths.numel() else 0
    inside = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # [U, T]
    per_token = log_p_gold.new_zeros(inside.shape).masked_scatter(inside, log_p_gold)  # [U, T], with gradient
    return per_token.cumsum(dim=1)


def survival_terms(log_p_gold: torch.Tensor, search: SimulatedSearch, xi: float) -> torch.Tensor:
    """[U, T] log sigmoid((theta_s - g_s) / xi), 0 beyond each length and where theta_s = -inf."""
    if xi <= 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    g = prefix_log_probs(log_p_gold.float(), search.lengths)  # [U, T]
    width = g.shape[1]
    theta = search.thresholds[:, :width].to(g.device).float()
    if theta.shape != g.shape:
        raise ValueError(f"thresholds {tuple(search.thresholds.shape)} do not cover the responses {tuple(g.shape)}")
    inside = torch.arange(width, device=g.device)[None, :] < search.lengths[:, None].to(g.device)
    use = inside & torch.isfinite(theta)
    # where() on a finite stand-in: an unused -inf threshold never reaches the backward
    term = F.logsigmoid((torch.where(use, theta, g.detach()) - g) / xi)
    return torch.where(use, term, 0.0)


def margin_pruned(log_p_gold: torch.Tensor, search: SimulatedSearch, atol: float = 0.0) -> torch.Tensor:
    """bool [U]: some s with g_s < theta_s - atol (eq. 3.1 violated), from the loss's own g_s."""
    g = prefix_log_probs(log_p_gold.detach().float(), search.lengths)
    width = g.shape[1]
    theta = search.thresholds[:, :width].to(g.device).float()
    inside = torch.arange(width, device=g.device)[None, :] < search.lengths[:, None].to(g.device)
    return (inside & (g < theta - atol)).any(dim=1)


def beamsim_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    search: SimulatedSearch,
    *,
    tau: float = 1.0,
    xi: float = 2.75,
    lam: float = 0.25,
) -> torch.Tensor:
    """The beamsim loss (module docstring) on the unchunked logits [N, V] of the N response
    positions of a micro-batch (row-major), gold tokens [N], trie-valid mask [N, V] (None: full
    softmax), and the search's thresholds."""
    terms = position_terms(logits, targets, valid, tau=tau)
    ce = torch.where(terms.counted, terms.ce, 0.0).sum()
    reg = survival_terms(terms.log_p_gold, search, xi).sum()
    return (ce + lam * reg) / terms.counted.sum().clamp(min=1).float()


__all__ = ["SimulatedSearch", "beamsim_loss", "margin_pruned", "prefix_log_probs", "survival_terms"]
