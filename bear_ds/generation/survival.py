"""The beam-search survival thresholds theta_s of the beamsim loss, from the evaluator's own search.

For an example with prompt x and gold response y = (y_1 .. y_T) (the quoted title, then EOS), run
`constrained_beam_search` of width B on x (no gradient, current weights, the loss's scoring: the
trie mask before or after the softmax, temperature tau, no length penalty, so every score is a
plain sum of log-probs). theta_s, s = 1 .. T, is what the gold prefix y_<=s must reach (its
cumulative log-prob g_s >= theta_s) for the search to keep it at step s:

- s < T: the B-th best UNFINISHED candidate of step s (the live beams HF keeps: the B best
  candidates that do not end in EOS; EOS candidates are never live, so they do not compete with an
  unfinished gold prefix).
- s = T (the gold's EOS step): the gold item must rank among the B best of ALL candidates of the
  step (HF turns an EOS candidate into a finished item only when it is among the first B of the
  2B kept, else drops it) AND must not be pushed out of the B finished items the search returns,
  by items finished earlier or later. So theta_T = max(B-th best candidate of step T, EOS ones
  included; B-th best returned item, or -inf when fewer than B are returned).
- Fewer than B finite candidates: the lowest one (the condition then holds for any candidate).
- A trie of one item: -inf at every step (nothing to choose, nothing ever pruned: no survival term).
- Steps the search did not run (the user stopped early: B items finished that no live prefix can
  beat, exactly so without a length penalty; or no live beam was left) use the B-th returned item:
  no prefix below it can still be returned. -inf (no returned item) means "no constraint".

With these, the gold item is returned by the search iff g_s >= theta_s for every s <= T (ties
aside), which is eq. 3.1 of the paper with HF's finished hypotheses taken into account.
`SimulatedSearch.pruned` is read from the search itself (the gold group is not among those
returned): a float comparison of g_s (teacher-forced forward) with theta_s (cached decoding)
would misjudge the frequent case where the gold prefix is itself the B-th candidate.
"""

from __future__ import annotations

import time

import torch

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.generation.beam import PromptState, constrained_beam_search
from bear_ds.losses.beamsim import SimulatedSearch
from bear_ds.masking import NEG_INF
from bear_ds.trie import TokenTrie


def batch_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of a training micro-batch, left-padded for the beam search.

    input_ids, attention_mask, labels [U, L] as `collate` gives them (right padding; labels
    `IGNORE_INDEX` on the prompt and on padding). A prompt = the real tokens labelled IGNORE_INDEX
    before the first response token. Returns (ids [U, P], mask [U, P]) left-padded (pad id 0).
    """
    if labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
            f"{tuple(labels.shape)} must have one shape"
        )
    is_response = labels != IGNORE_INDEX  # [U, L]
    if input_ids.shape[0] and not bool(is_response.any(dim=1).all()):
        row = int((~is_response.any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"micro-batch row {row} has no response token (labels are all {IGNORE_INDEX})")
    in_prompt = _prompt_positions(attention_mask, labels)  # [U, L]
    lengths = in_prompt.sum(dim=1)  # [U]
    width = int(lengths.max()) if lengths.numel() else 1
    cols = torch.arange(width, device=input_ids.device)[None, :]  # [1, P]
    start = width - lengths[:, None]  # [U, 1] first real column after left padding
    mask = (cols >= start).long()  # [U, P]
    source = (cols - start).clamp(min=0)  # [U, P] column in input_ids (prompts start at column 0)
    ids = input_ids.gather(1, source.clamp(max=input_ids.shape[1] - 1)).masked_fill(mask == 0, 0)
    return ids, mask


def _prompt_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [U, L]: the real tokens before each row's first response token."""
    before_response = torch.cumsum((labels != IGNORE_INDEX).long(), dim=1) == 0
    return before_response & (attention_mask != 0)


def prompt_ends(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """int64 [U]: each row's last prompt position in a right-padded micro-batch (where the logits
    that score the first response token are)."""
    return _prompt_positions(attention_mask, labels).sum(dim=1) - 1


def prompt_state_of_forward(
    attention_mask: torch.Tensor, labels: torch.Tensor, prompt_logits: torch.Tensor, cache
) -> PromptState | None:
    """The search's starting point from the training forward of the same micro-batch
    (`bear_ds.losses.model.backbone_forward` with `prompt_ends`): its logits at the prompt ends and
    its KV cache with only the prompt positions unmasked. None when the forward kept no cache."""
    if cache is None:
        return None
    return PromptState(prompt_logits, cache, _prompt_positions(attention_mask, labels).long())


def batch_responses(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gold responses packed to the left: (targets [U, T] with IGNORE_INDEX after each end, lengths [U])."""
    keep = labels != IGNORE_INDEX  # [U, L]
    lengths = keep.sum(dim=1)  # [U]
    width = int(lengths.max()) if lengths.numel() else 0
    packed = torch.full((labels.shape[0], width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    rows = keep.nonzero()[:, 0]
    column = (torch.cumsum(keep, dim=1) - 1)[keep]
    packed[rows, column] = labels[keep]
    return packed, lengths


def survival_thresholds(
    live_thresholds: torch.Tensor,
    candidate_thresholds: torch.Tensor,
    final_scores: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """theta [U, T] (T = max length) from a search's per-step thresholds (see the module docstring).

    live_thresholds, candidate_thresholds [U, S] (`BeamResult`, NaN where a step was not run),
    final_scores [U, B] (`BeamResult.scores` without length penalty, best first, -inf padding),
    lengths [U] response lengths. Columns at or beyond an example's length are -inf.
    """
    num_users, steps = live_thresholds.shape
    width = int(lengths.max()) if lengths.numel() else 0
    if width > steps:  # steps the search could never run (a title longer than its step limit)
        pad = live_thresholds.new_full((num_users, width - steps), float("nan"))
        live_thresholds = torch.cat([live_thresholds, pad], dim=1)
        candidate_thresholds = torch.cat([candidate_thresholds, pad], dim=1)
    live, cand = live_thresholds[:, :width], candidate_thresholds[:, :width]
    returned = final_scores[:, -1:]  # [U, 1] the B-th returned item (-inf when fewer were returned)
    live = torch.where(torch.isnan(live), returned, live)
    last = torch.where(torch.isnan(cand), returned, torch.maximum(cand, returned))
    cols = torch.arange(width, device=lengths.device)[None, :]
    theta = torch.where(cols == (lengths[:, None] - 1), last, live)
    return theta.masked_fill(cols >= lengths[:, None], NEG_INF)


def simulate_beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    trie: TokenTrie,
    *,
    beam_width: int,
    eos_token_id: int,
    mask: str,
    tau: float,
    synced: bool = False,
    prompt_state: PromptState | None = None,
) -> SimulatedSearch:
    """Run the evaluator's beam search on a training micro-batch and return theta and the verdicts.

    model: the Hugging Face model (unwrapped; ZeRO-3 partitioned ones need `synced=True`, and every
    rank must call this once per micro-batch). Runs in eval mode without gradient; the model's
    mode is restored. input_ids, attention_mask, labels [U, L] right-padded as `collate` gives them.
    `prompt_state` (`prompt_state_of_forward`): start from the training forward's encoding of the
    prompts instead of encoding them again (the same weights; that forward's train-mode dropout,
    if any, then also shapes theta, as it shapes g_s).
    """
    started = time.perf_counter()
    prompt_ids, prompt_mask = batch_prompts(input_ids, attention_mask, labels)
    targets, lengths = batch_responses(labels)
    was_training = model.training
    model.eval()
    try:
        result = constrained_beam_search(
            model,
            prompt_ids,
            prompt_mask,
            trie,
            num_beams=beam_width,
            eos_token_id=eos_token_id,
            mask=mask,
            length_penalty=0.0,  # plain sums of log-probs, as g_s
            synced=synced,
            temperature=tau,
            return_thresholds=True,
            prompt_state=prompt_state,
        )
    finally:
        model.train(was_training)
    trie = trie if trie.device == targets.device else trie.to(targets.device)
    states = trie.states_along(targets, ignore_index=IGNORE_INDEX)  # [U, T] state before each token
    last = (lengths - 1).clamp(min=0)[:, None]
    end = trie.advance(states.gather(1, last).squeeze(1), targets.gather(1, last).squeeze(1))  # [U]
    gold = trie.terminal_group(end)  # [U]
    if bool((gold < 0).any()):
        row = int((gold < 0).nonzero()[0, 0])
        raise ValueError(f"micro-batch row {row}: the gold response does not end a catalog title (no trie item)")
    pruned = ~(result.groups == gold[:, None]).any(dim=1)
    theta = survival_thresholds(result.live_thresholds, result.candidate_thresholds, result.scores, lengths)
    if int((trie.terminal >= 0).sum()) == 1:  # a one-item trie has no choice: the search always returns it
        theta = torch.full_like(theta, NEG_INF)  # no step constrains the gold prefix, as no position counts in CE
    steps = int(result.steps.max()) if result.steps.numel() else 0
    return SimulatedSearch(theta, lengths, pruned, time.perf_counter() - started, steps)


__all__ = [
    "SimulatedSearch",
    "batch_prompts",
    "batch_responses",
    "prompt_ends",
    "prompt_state_of_forward",
    "simulate_beam_search",
    "survival_thresholds",
]
