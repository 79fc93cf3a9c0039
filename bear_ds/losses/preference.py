"""Softmax-DPO (S-DPO, Chen et al. 2024) over catalog negatives; K = 1 is DPO (Rafailov et al. 2023).

For an example with prompt x, positive item y and negatives y_1..y_K (all full trie paths):

    r(y)  = dpo_beta * (log pi(y|x) - log pi_ref(y|x))     log pi(y|x) = sum over y's response tokens
    L     = -log sigmoid(-log sum_j exp(r(y_j) - r(y)))    = softplus(logsumexp_j(r(y_j) - r(y)))
    loss  = mean over the micro-batch's examples of L  +  sft_weight * CE(positive)

CE(positive) is the mean over the positives' response tokens of -log p (the same softmax as the
item log-probabilities). The per-token softmax is the loss's mask mode: with `loss.masked` the
trie-restricted softmax of MSL with temperature `loss.tau`, else the plain LM softmax over the
vocabulary (tau 1). K = 1: -log sigmoid(r(y) - r(y_1)), the DPO loss.

Item log-probabilities come from hidden states at response positions through the chunked head
(C = loss.chunk_size positions projected at a time, each chunk under activation checkpointing):
the [B, L, V] logits are never built. Reference log-probabilities are inputs (precomputed by a
pass of the frozen reference, `bear_ds.training.preference_pairs`), so this module has no second model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bear_ds.catalog import IGNORE_INDEX
from bear_ds.config import LossConfig
from bear_ds.losses.functional import LossSums, log_probs, zero_through
from bear_ds.losses.head import LMHead, _as_lm_head, _check_response
from bear_ds.trie import TokenTrie


# ---------------------------------------------------------------------------------------- pure
@dataclass
class PreferenceTerms:
    """Per-example quantities of `sdpo_terms`."""

    loss: torch.Tensor  # [B] float32, carries gradient
    rewards: torch.Tensor  # [B, 1 + K] float32 (column 0: the positive), carries gradient

    @property
    def margin(self) -> torch.Tensor:
        """[B] r(y) - mean_j r(y_j), detached."""
        r = self.rewards.detach()
        return r[:, 0] - r[:, 1:].mean(-1)

    @property
    def correct(self) -> torch.Tensor:
        """[B, K] bool: negative j has a strictly lower reward than the positive (ties count as wrong)."""
        r = self.rewards.detach()
        return r[:, 1:] < r[:, :1]


def sdpo_terms(policy_logps: torch.Tensor, reference_logps: torch.Tensor, *, beta: float) -> PreferenceTerms:
    """S-DPO per example from item log-probabilities [B, 1 + K] (column 0 the positive, then K negatives)."""
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"policy_logps must be [B, 1 + K] with K >= 1, got shape {tuple(policy_logps.shape)}")
    if reference_logps.shape != policy_logps.shape:
        raise ValueError(
            f"reference_logps {tuple(reference_logps.shape)} must have the shape of policy_logps "
            f"{tuple(policy_logps.shape)}"
        )
    if beta <= 0:
        raise ValueError(f"beta (loss.dpo_beta) must be > 0, got {beta}")
    rewards = beta * (policy_logps.float() - reference_logps.float().detach())  # [B, 1 + K]
    gaps = rewards[:, 1:] - rewards[:, :1]  # [B, K]: r(y_j) - r(y)
    # -log sigmoid(-a) = softplus(a), with a = logsumexp_j gaps: stable for any sign of a
    return PreferenceTerms(loss=F.softplus(torch.logsumexp(gaps, dim=-1)), rewards=rewards)


def sdpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Mean over B of -log sigmoid(-log sum_j exp(r(y_j) - r(y))); see the module docstring."""
    terms = sdpo_terms(policy_logps, reference_logps, beta=beta)
    if terms.loss.numel() == 0:
        return zero_through(policy_logps)
    return terms.loss.mean()


# ---------------------------------------------------------------------------------------- sum form
@dataclass
class PreferenceSums:
    """Raw sums of a micro-batch; the trainer logs them as `token_sums()` plus (numerator, denominator) extras.

    Tensors marked (grad) carry gradient; the others are detached float32 scalars.
    """

    pref: torch.Tensor  # (grad) sum over examples of the S-DPO loss
    ce: torch.Tensor  # (grad) sum over the positives' response tokens of -log p
    ce_positions: torch.Tensor  # positives' response tokens
    examples: torch.Tensor  # examples (one positive each)
    margin: torch.Tensor  # sum over examples of r(y) - mean_j r(y_j)
    correct: torch.Tensor  # negatives with r(y_j) < r(y)
    negatives: torch.Tensor  # negatives
    # the pruning-risk diagnostic of `LossSums`, over the positives' tokens: positions with more than
    # one trie-valid next token, and those whose gold token ranks outside the top loss.beam_width
    risk_positions: torch.Tensor
    outside_topb: torch.Tensor

    def token_sums(self) -> LossSums:
        """The positives' tokens as `LossSums` (ce = their mean CE; the pruning-risk diagnostic)."""
        zero = self.ce.new_zeros(()).detach()
        return LossSums(
            ce_all=self.ce, ce_counted=self.ce, weighted_ce=zero, reg=zero, weight=zero,
            positions=self.ce_positions, counted=self.ce_positions, risk_positions=self.risk_positions,
            outside_topb=self.outside_topb,
        )  # fmt: skip

    def loss(self, sft_weight: float) -> torch.Tensor:
        """Mean S-DPO loss over the examples + sft_weight * mean CE over the positives' tokens."""
        pref = self.pref / self.examples.clamp(min=1.0)
        if sft_weight == 0.0:
            return pref
        return pref + sft_weight * self.ce / self.ce_positions.clamp(min=1.0)

    def metrics(self) -> dict[str, float]:
        """Loggable floats: pref_loss, reward_margin, reward_accuracy (0..1), ce, examples."""
        examples = max(float(self.examples), 1.0)
        return {
            "pref_loss": float(self.pref.detach()) / examples,
            "reward_margin": float(self.margin) / examples,
            "reward_accuracy": float(self.correct) / max(float(self.negatives), 1.0),
            "ce": float(self.ce.detach()) / max(float(self.ce_positions), 1.0),
            "examples": float(self.examples),
        }


def preference_sums(
    terms: PreferenceTerms,
    positive_token_logps: torch.Tensor,
    positive_risk: torch.Tensor | None = None,
    positive_outside: torch.Tensor | None = None,
) -> PreferenceSums:
    """The sums of a set of examples from their `sdpo_terms` and the log p of their positives' tokens [P].

    positive_risk, positive_outside [P] (bool): the pruning-risk diagnostic of those tokens (0 when None).
    """
    correct = terms.correct
    zero = terms.loss.new_zeros(()).detach()
    return PreferenceSums(
        pref=terms.loss.sum(),
        ce=-positive_token_logps.sum(),
        ce_positions=positive_token_logps.new_tensor(positive_token_logps.numel(), dtype=torch.float32),
        examples=terms.loss.new_tensor(terms.loss.numel()).detach(),
        margin=terms.margin.sum(),
        correct=correct.sum().float(),
        negatives=terms.loss.new_tensor(correct.numel()).detach(),
        risk_positions=zero if positive_risk is None else positive_risk.float().sum(),
        outside_topb=zero if positive_outside is None else positive_outside.float().sum(),
    )


# ---------------------------------------------------------------------------------------- chunked head
def _chunk_token_logps(
    hidden: torch.Tensor,  # [C, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,
    targets: torch.Tensor,  # [C]
    states: torch.Tensor,  # [C]
    trie: TokenTrie,
    masked: bool,
    tau: float,
    beam_width: int,
    scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of the gold tokens [C], and the pruning-risk flags [C] (counted, outside the top-B)."""
    logits = LMHead(weight, bias, scale, softcap).logits(hidden)  # [C, V]
    valid = trie.allowed_mask(states, logits.shape[-1])  # [C, V] bool
    log_p = log_probs(logits, valid if masked else None, tau if masked else 1.0)  # [C, V] float32
    with torch.no_grad():  # rank of the gold token among the trie-valid ones (unchanged by tau and the mask)
        z = logits.float()
        better = ((z > z.gather(1, targets[:, None])) & valid).sum(-1)  # [C]
        risk = valid.sum(-1) > 1
        outside = (better >= beam_width) & risk
    return log_p.gather(1, targets[:, None]).squeeze(1), risk, outside


def token_logps(
    hidden: torch.Tensor,
    lm_head: LMHead | tuple | torch.Tensor,
    targets: torch.Tensor,
    states: torch.Tensor,
    trie: TokenTrie,
    *,
    masked: bool,
    tau: float = 1.0,
    chunk_size: int = 1024,
    beam_width: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of each gold token [N] (float32, with gradient) from hidden states [N, H], chunk by chunk,
    and the pruning-risk flags [N] (bool: more than one valid token; gold outside the top beam_width).

    masked: softmax(z restricted to the trie-valid tokens / tau) (MSL); else softmax(z) (LM).
    Responses must follow the trie (the same checks as `response_loss`).
    """
    head = _as_lm_head(lm_head)
    _check_response(hidden, head, targets, states, trie)
    trie = trie if trie.device == hidden.device else trie.to(hidden.device)
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        parts.append(
            checkpoint(
                _chunk_token_logps,
                hidden[start:end],
                head.weight,
                head.bias,
                targets[start:end],
                states[start:end],
                trie,
                masked,
                tau,
                beam_width,
                head.scale,
                head.softcap,
                use_reentrant=False,
            )
        )
    if not parts:
        empty = torch.zeros(0, dtype=torch.bool, device=hidden.device)
        return hidden.new_zeros(0, dtype=torch.float32), empty, empty
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def sequence_logps(token_logp: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum of the token log-probabilities of each sequence [num_sequences] (index_add keeps the gradient)."""
    out = token_logp.new_zeros(num_sequences)
    return out.index_add(0, sequence_index, token_logp)


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar float32, carries gradient
    sums: PreferenceSums
    policy_logps: torch.Tensor  # [B, 1 + K] item log-probabilities (with gradient)

    @property
    def metrics(self) -> dict[str, float]:
        return self.sums.metrics()


def preference_loss(
    hidden: torch.Tensor,
    lm_head: LMHead | tuple | torch.Tensor,
    targets: torch.Tensor,
    states: torch.Tensor,
    sequence_index: torch.Tensor,
    reference_logps: torch.Tensor,
    trie: TokenTrie,
    loss_cfg: LossConfig,
) -> PreferenceOutput:
    """S-DPO of one micro-batch from the hidden states of its response positions.

    The micro-batch holds B examples as B * (1 + K) sequences, example b's positive at row
    b * (1 + K) and its negatives in the K rows after it. hidden [N, H], targets [N], states [N]:
    the response positions of all rows (`select_response`); sequence_index [N]: each position's
    row; reference_logps [B, 1 + K]: log pi_ref of the same items. Every rank reaches every
    parameter even with no example (a 0 that touches the hidden states and the head).
    """
    head = _as_lm_head(lm_head)
    if reference_logps.dim() != 2 or reference_logps.shape[1] < 2:
        raise ValueError(f"reference_logps must be [B, 1 + K] with K >= 1, got {tuple(reference_logps.shape)}")
    b, width = reference_logps.shape
    if sequence_index.shape != targets.shape:
        raise ValueError(f"sequence_index must be [N]={targets.shape[0]}, got {tuple(sequence_index.shape)}")
    logp, risk, outside = token_logps(
        hidden, head, targets, states, trie, masked=loss_cfg.masked, tau=loss_cfg.tau,
        chunk_size=loss_cfg.chunk_size, beam_width=loss_cfg.beam_width,
    )  # [N] each  # fmt: skip
    policy = sequence_logps(logp, sequence_index, b * width).view(b, width)  # [B, 1 + K]
    terms = sdpo_terms(policy, reference_logps.to(policy.device), beta=loss_cfg.dpo_beta)
    positive = sequence_index % width == 0  # [N]
    sums = preference_sums(terms, logp[positive], risk[positive], outside[positive])
    touch = zero_through(hidden, head.weight, head.bias)
    return PreferenceOutput(loss=sums.loss(loss_cfg.sft_weight) + touch, sums=sums, policy_logps=policy)


def response_rows(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The row of each response position of a batch [N], in `select_response`'s (row-major) order."""
    return (labels[:, 1:] != ignore_index).nonzero()[:, 0]
