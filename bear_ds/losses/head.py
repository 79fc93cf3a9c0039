"""The loss head: LML/MSL/BEAR from hidden states at response positions, chunk by chunk.

Only response positions are projected to the vocabulary (the prompt's logits are never built) and
only C = loss.chunk_size of them at a time, each chunk under activation checkpointing, so the
head's peak memory is O(C x V) instead of O(B x L x V). Worked example: V = 128k, C = 1024 gives
a float32 [C, V] logits block of 0.5 GiB (plus its log-softmax and the bool trie mask of 128 MiB)
where the released approach holds float32 logits for every position of every sequence.

Exactness: each chunk returns raw sums (`LossSums`); the micro-batch loss is formed once from the
totals. The BEAR weights are detached, so the reweight normalisation sum_t w_t is a constant of
the backward pass and sum_chunks(w*CE) / (sum_chunks(w) + 1e-8) equals the unchunked loss, with
no second pass over the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.config import LossConfig
from bear_ds.losses.beamsim import SimulatedSearch, survival_terms
from bear_ds.losses.functional import LossSums, loss_from_sums, loss_sums, metrics_from_sums, zero_through
from bear_ds.trie import TokenTrie


class LMHead(NamedTuple):
    """The output projection as tensors: logits = softcap(scale * (h @ weight.T + bias))."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0  # Cohere `logit_scale`, 1 / Granite `logits_scaling`
    softcap: float | None = None  # Gemma-2 `final_logit_softcapping`: cap * tanh(logits / cap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] -> [C, V] logits in the hidden dtype (the softmax upcasts to float32)."""
        return self._scaled_and_capped(torch.nn.functional.linear(hidden, self.weight, self.bias))  # [C, V]

    def pair_logits(self, hidden: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float32 logits [P] of (row, token) pairs from hidden states [n, H]: the projection onto
        those tokens only, computed in float32 and rounded to the hidden dtype as `logits` would be."""
        z = (hidden[rows].float() * self.weight[tokens].float()).sum(-1)  # [P]
        if self.bias is not None:
            z = z + self.bias[tokens].float()
        return self._scaled_and_capped(z).to(hidden.dtype).float()

    def _scaled_and_capped(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar float32, carries gradient
    sums: LossSums  # raw sums: add them over micro-batches and ranks, then `metrics_from_sums` once
    loss_cfg: LossConfig

    @property
    def metrics(self) -> dict[str, float]:
        """ce, reg|weight_mean, frac_outside_topb, counted, positions of this micro-batch.

        Reading them copies from the device and so waits for it; a training loop that adds `sums`
        over its micro-batches and reads once per step keeps the GPU queue full.
        """
        return metrics_from_sums(self.sums, name=self.loss_cfg.name, form=self.loss_cfg.form)


def _as_lm_head(lm_head: LMHead | tuple | torch.Tensor) -> LMHead:
    if isinstance(lm_head, LMHead):
        return lm_head
    if isinstance(lm_head, torch.Tensor):
        return LMHead(lm_head)
    if isinstance(lm_head, tuple) and 1 <= len(lm_head) <= 4:
        return LMHead(*lm_head)
    raise TypeError(
        f"lm_head must be an LMHead, a (weight, bias) tuple or a weight tensor, got {type(lm_head).__name__}"
    )


def _chunk_sums(
    hidden: torch.Tensor,  # [C, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [C]
    states: torch.Tensor,  # [C]
    trie: TokenTrie,
    loss_cfg: LossConfig,
    scale: float,
    softcap: float | None,
    pairs: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """One chunk's `LossSums` fields, then log p[y] [C] (checkpoint needs tensors in, tensors out).

    `pairs`: the number of (position, valid token) pairs of the chunk when the host knows it, so the
    mask is built without reading the device."""
    head = LMHead(weight, bias, scale, softcap)
    logits = head.logits(hidden)  # [C, V]
    vocab = logits.shape[-1]
    use_mask = loss_cfg.name == "msl" or (loss_cfg.name in ("bear", "beamsim") and loss_cfg.masked)
    # [C, V] bool, built on the device; LML uses it only for the pruning-risk diagnostic
    valid = trie.allowed_mask(states, vocab, pairs=pairs) if use_mask or loss_cfg.name == "lml" else None
    sums, log_p_gold = loss_sums(
        logits,
        targets,
        valid,
        name=loss_cfg.name,
        beam_width=loss_cfg.beam_width,
        tau=loss_cfg.tau,
        xi=loss_cfg.xi,
        lam=loss_cfg.lam,
        check=False,  # targets and states were checked once for the whole micro-batch
        return_log_p_gold=True,
    )
    return (*(getattr(sums, name) for name in LossSums.__dataclass_fields__), log_p_gold)


def _check_response(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    states: torch.Tensor,
    trie: TokenTrie,
    values: bool = True,
) -> None:
    """Shapes always; the values (reads of the device) only when `values`."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H] (response positions only), got shape {tuple(hidden.shape)}")
    n, h = hidden.shape
    if head.weight.dim() != 2 or head.weight.shape[1] != h:
        raise ValueError(f"lm_head weight must be [V, {h}], got shape {tuple(head.weight.shape)}")
    vocab = head.weight.shape[0]
    if targets.shape != (n,) or states.shape != (n,):
        raise ValueError(f"targets and states must be [N]={n}, got {tuple(targets.shape)} and {tuple(states.shape)}")
    if trie.vocab_size > vocab:
        raise ValueError(f"the trie's vocabulary ({trie.vocab_size}) is larger than the lm_head's ({vocab})")
    if not values:
        return
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target at response position {i} is {int(targets[i])}, outside the vocabulary [0, {vocab})")
    off = states < 0
    if bool(off.any()):
        i = int(off.nonzero()[0, 0])
        raise ValueError(
            f"trie state at response position {i} is {int(states[i])} (off the trie): pass response positions only"
        )
    # the gold token must be a child of its state (else the masked softmax gives it probability 0)
    follows = trie.advance(states, targets) >= 0  # [N]
    if not bool(follows.all()):
        i = int((~follows).nonzero()[0, 0])
        raise ValueError(
            f"gold token {int(targets[i])} at response position {i} is not a trie continuation of state {int(states[i])}"
        )


def response_loss(
    hidden: torch.Tensor,
    lm_head: LMHead | tuple | torch.Tensor,
    targets: torch.Tensor,
    states: torch.Tensor,
    trie: TokenTrie,
    loss_cfg: LossConfig,
    search: SimulatedSearch | None = None,
    children: np.ndarray | None = None,
) -> LossOutput:
    """The configured loss of one micro-batch from the hidden states of its response positions.

    hidden [N, H]: the last hidden states that predict each response token; targets [N]: those
    tokens; states [N]: the trie state before each target (`TokenTrie.states_along`). The loss is
    normalised over the whole micro-batch (LML/MSL: mean over N; BEAR reweight: weights normalised
    over every counted position; BEAR regularizer: mean over counted), whatever the chunk size.
    beamsim needs `search` (`bear_ds.generation.survival.simulate_beam_search` on the same
    micro-batch): its survival terms are formed from the chunks' log p[y] (`bear_ds.losses.beamsim`).

    children [N] (host): the number of trie children of each state, known when the states were
    computed from the encoded examples (`ResponsePositions`); given, the masks are built without
    reading the device and the targets and states are taken as checked (they were, when walked).

    With N == 0 the loss is 0 * (sum of hidden and head parameters): it still reaches every
    parameter, so gradient synchronisation (DDP, ZeRO) sees the same parameters on every rank.
    """
    head = _as_lm_head(lm_head)
    _check_response(hidden, head, targets, states, trie, values=children is None)
    trie = trie if trie.device == hidden.device else trie.to(hidden.device)
    if (loss_cfg.name == "beamsim") != (search is not None):
        raise ValueError(f"loss.name={loss_cfg.name}: `search` must be given exactly for the beamsim loss")
    touch = zero_through(hidden, head.weight, head.bias)  # a 0 that reaches every input
    totals = LossSums.zeros(hidden)
    gold_log_probs: list[torch.Tensor] = []
    n = hidden.shape[0]
    chunk = loss_cfg.chunk_size
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        parts = checkpoint(
            _chunk_sums,
            hidden[start:end],  # [C, H]
            head.weight,
            head.bias,
            targets[start:end],
            states[start:end],
            trie,
            loss_cfg,
            head.scale,
            head.softcap,
            None if children is None else int(children[start:end].sum()),
            use_reentrant=False,
        )
        totals = totals + LossSums(*parts[:-1])
        gold_log_probs.append(parts[-1])
    if search is not None:
        log_p_gold = torch.cat(gold_log_probs) if gold_log_probs else hidden.new_zeros(0, dtype=torch.float32)
        totals.reg = survival_terms(log_p_gold, search, loss_cfg.xi).sum()
    loss = loss_from_sums(totals, name=loss_cfg.name, form=loss_cfg.form, lam=loss_cfg.lam) + touch
    return LossOutput(loss=loss, sums=totals, loss_cfg=loss_cfg)


@dataclass
class ResponsePositions:
    """A micro-batch's response positions, computed on the host from its encoded examples (whose trie
    states were walked once, at encoding): `select_response` then reads nothing from the device."""

    index: torch.Tensor  # [N] row * L + (j - 1) for each response label j: its hidden state in [B * L, H]
    targets: torch.Tensor  # [N] the response tokens
    states: torch.Tensor  # [N] the trie state before each
    children: np.ndarray  # [N] on the host: the number of trie children of each state (`response_loss`)

    def pin_memory(self) -> ResponsePositions:
        """The host tensors in page-locked memory (copied to a GPU without waiting)."""
        return ResponsePositions(self.index.pin_memory(), self.targets.pin_memory(), self.states.pin_memory(),
                                 self.children)  # fmt: skip

    def to(self, device: torch.device, non_blocking: bool = False) -> ResponsePositions:
        move = {"device": device, "non_blocking": non_blocking}
        return ResponsePositions(self.index.to(**move), self.targets.to(**move), self.states.to(**move), self.children)


def select_response(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    trie: TokenTrie,
    ignore_index: int = IGNORE_INDEX,
    positions: ResponsePositions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, targets and trie states of the response positions of a batch.

    hidden [B, L, H] (last hidden states), labels [B, L] (`ignore_index` on prompt and padding,
    the response ids, contiguous, on the response; `bear_ds.catalog.encode_example`). Position
    j - 1 predicts label j. Returns hidden [N, H], targets [N], states [N] in row-major order.
    With `positions` (computed on the host) nothing is read from the device; without, the mask of
    the labels and the trie walk over the targets wait for it.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, L, H] and labels [B, L], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if positions is not None:
        return (
            hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.index),
            positions.targets,
            positions.states,
        )
    shifted = labels[:, 1:]  # [B, L-1]: label predicted at each position
    keep = shifted != ignore_index  # [B, L-1]
    targets = shifted[keep]  # [N], row-major
    # Walk the trie over the responses packed to the left ([B, T], T = longest response, ~10-40)
    # rather than over all L-1 positions (~300): the walk is one small step per column.
    rows = keep.nonzero()[:, 0]  # [N]
    column = (torch.cumsum(keep, dim=1) - 1)[keep]  # [N] index within the row's response
    width = int(column.max()) + 1 if column.numel() else 0
    packed = torch.full((labels.shape[0], width), ignore_index, dtype=labels.dtype, device=labels.device)
    packed[rows, column] = targets
    states = trie.to(labels.device).states_along(packed, ignore_index=ignore_index)  # [B, T]
    return hidden[:, :-1][keep], targets, states[rows, column]
