"""LML, MSL and BEAR losses as pure tensor functions, plus their sum form for exact chunking.

All functions take N target positions: logits z [N, V] (any float dtype; computed in float32),
gold tokens y [N] and, for MSL/BEAR, an optional bool mask valid [N, V] of the trie-valid next
tokens. Notation follows /work/shared/notes/bear-method.md:

    p_t    = softmax(z_t masked to -inf outside valid / tau)      (full softmax when valid is None)
    CE_t   = -log p_t[y_t]
    beta_t = the beam_width-th largest entry of p_t (no gradient); where fewer than beam_width
             tokens have non-zero probability, the smallest non-zero probability instead
    counted positions: more than one valid token (every position when valid is None)

Conventions fixed here (and tested):
- A gold token tied with beta_t counts as inside the top-B (`outside_topb` is log p < log beta).
- "Non-zero probability" is decided in log space (log p > -inf), so a valid token whose logit is
  -inf is not a candidate for beta_t; a float32 underflow of p to 0 with finite log p still is.
- A gold token outside `valid`, or outside [0, V), is a ValueError naming the first bad position.
- No counted position: the loss is 0 with zero (finite) gradients.

`loss_sums` returns the raw sums (CE over counted, w*CE, w, counts, ...) of a set of positions;
`loss_from_sums` turns sums into the loss. Summing the sums of disjoint chunks and normalising once
is exact, which is what the chunked head in `bear_ds.losses.head` relies on.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F

from bear_ds.masking import trie_log_softmax

LossName = Literal["lml", "msl", "bear", "beamsim"]
BearForm = Literal["reweight", "regularizer"]

WEIGHT_EPS = 1e-8  # added to the weight sum before normalising, as released


@dataclass
class PositionTerms:
    """Per-position quantities of one softmax, every tensor [N]."""

    ce: torch.Tensor  # -log p[y], float32, carries gradient
    log_p_gold: torch.Tensor  # log p[y], float32, carries gradient
    log_beta: torch.Tensor  # log beta_t, float32, detached
    counted: torch.Tensor  # bool: more than one valid token

    @property
    def margin(self) -> torch.Tensor:
        """log beta_t - log p_t[y_t] (detached): > 0 means the gold token is outside the top-B."""
        return (self.log_beta - self.log_p_gold).detach()

    @property
    def outside_topb(self) -> torch.Tensor:
        """bool [N]: gold token strictly below the B-th largest probability (ties count as inside)."""
        return self.log_p_gold.detach() < self.log_beta


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    n, v = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N]={n}, got shape {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    out_of_range = (targets < 0) | (targets >= v)
    if bool(out_of_range.any()):
        i = int(out_of_range.nonzero()[0, 0])
        raise ValueError(
            f"target at position {i} is {int(targets[i])}, outside the vocabulary [0, {v}) "
            "(ignore_index positions must be removed before calling the loss)"
        )
    if valid is not None:
        if valid.shape != logits.shape:
            raise ValueError(f"valid must have the shape of logits {tuple(logits.shape)}, got {tuple(valid.shape)}")
        if valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool mask, got {valid.dtype}")
        gold_valid = valid.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]
        if not bool(gold_valid.all()):
            i = int((~gold_valid).nonzero()[0, 0])
            raise ValueError(
                f"gold token {int(targets[i])} at position {i} is not a valid (trie) token there: "
                "the gold response must follow the trie"
            )


def log_probs(logits: torch.Tensor, valid: torch.Tensor | None = None, tau: float = 1.0) -> torch.Tensor:
    """float32 log softmax(z / tau) over the valid tokens ([N, V]; -inf outside valid): the trie's
    "before" mask mode (`bear_ds.masking`), the full softmax when `valid` is None."""
    return trie_log_softmax(logits, "before", allowed=valid, tau=tau)  # [N, V]


def beam_threshold(log_p: torch.Tensor, beam_width: int) -> torch.Tensor:
    """log beta_t [N] (detached): the beam_width-th largest log-probability of each row.

    Rows with fewer than beam_width tokens of non-zero probability get their smallest non-zero
    probability instead (so the gold token is never outside a beam that keeps every candidate).
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    log_p = log_p.detach()
    n, v = log_p.shape
    if n == 0:
        return log_p.new_zeros(0)
    k = min(beam_width, v)
    kth = log_p.topk(k, dim=-1).values[:, -1]  # [N]
    alive = torch.isfinite(log_p)  # [N, V]: non-zero probability
    n_alive = alive.sum(-1)  # [N]
    smallest_alive = log_p.masked_fill(~alive, float("inf")).min(-1).values  # [N]
    return torch.where(n_alive < beam_width, smallest_alive, kth)


def position_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beam_width: int = 10,
    tau: float = 1.0,
    check: bool = True,
) -> PositionTerms:
    """CE_t, log p_t[y_t], log beta_t and the counted flag for each of N positions."""
    if check:
        _check_inputs(logits, targets, valid)
    log_p = log_probs(logits, valid, tau)  # [N, V]
    log_p_gold = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)  # [N]
    if valid is None:
        counted = torch.ones_like(targets, dtype=torch.bool)
    else:
        counted = valid.sum(-1) > 1  # [N]
    return PositionTerms(
        ce=-log_p_gold,
        log_p_gold=log_p_gold,
        log_beta=beam_threshold(log_p, beam_width),
        counted=counted,
    )


def _bear_weights(terms: PositionTerms, xi: float, lam: float) -> torch.Tensor:
    """Unnormalised released weights w_t = 1 + lam * sigmoid((log p - log beta) / xi), detached."""
    return 1.0 + lam * torch.sigmoid((terms.log_p_gold.detach() - terms.log_beta) / xi)  # [N]


def _bear_reg(terms: PositionTerms, xi: float) -> torch.Tensor:
    """Paper regulariser term log sigmoid((log beta - log p) / xi) per position [N] (beta fixed)."""
    return F.logsigmoid((terms.log_beta - terms.log_p_gold) / xi)


def zero_through(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A float32 0 whose graph reaches every given tensor (None ones skipped).

    Added to a loss, or backpropagated instead of one, it makes every parameter behind those
    tensors take part in the backward, so gradient synchronisation (DDP, ZeRO) sees the same
    parameters on every rank whatever the micro-batch held. It is 0 only for finite tensors (or
    empty ones: the loss of no positions); -inf * 0 is NaN.
    """
    terms = [t.float().sum() * 0.0 for t in tensors if t is not None]
    if not terms:
        raise ValueError("zero_through needs at least one tensor")
    return functools.reduce(operator.add, terms)


def lml_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Language-model cross-entropy: mean over N of -log softmax(z)[y]."""
    _check_inputs(logits, targets, None)
    if targets.numel() == 0:
        return zero_through(logits)
    return -log_probs(logits).gather(1, targets.unsqueeze(1)).mean()


def msl_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Masked-softmax loss: mean over ALL N positions of -log softmax(z|valid / tau)[y].

    As released, a position with a single valid token has CE 0 and still counts in the mean.
    """
    if valid is None:
        raise ValueError("msl_loss needs the valid mask; use lml_loss for the full softmax")
    _check_inputs(logits, targets, valid)
    if targets.numel() == 0:
        return zero_through(logits)
    return -log_probs(logits, valid, tau).gather(1, targets.unsqueeze(1)).mean()


@dataclass
class BearDetails:
    """Per-position details of `bear_loss` (all [N], detached)."""

    margin: torch.Tensor  # log beta_t - log p_t[y_t]
    outside_topb: torch.Tensor  # bool: gold outside the top-beam_width (pruning risk)
    ce: torch.Tensor  # CE_t
    counted: torch.Tensor  # bool
    weights: torch.Tensor  # reweight: normalised w_t (0 where not counted); regularizer: 1/#counted


def bear_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    beam_width: int = 10,
    tau: float = 1.0,
    xi: float = 2.75,
    lam: float = 0.25,
    form: BearForm = "reweight",
    return_details: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, BearDetails]:
    """BEAR loss over N positions (masked softmax when `valid` is given, else the full softmax).

    form="reweight" (released): w_t = 1 + lam*sigmoid((log p_t[y] - log beta_t)/xi), detached,
    normalised over the counted positions (sum + 1e-8); loss = sum_counted w_t * CE_t.
    form="regularizer" (paper): mean over counted of CE_t + lam*log sigmoid((log beta_t - log p_t[y])/xi).
    """
    if form not in ("reweight", "regularizer"):
        raise ValueError(f"form must be 'reweight' or 'regularizer', got {form!r}")
    if xi <= 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    terms = position_terms(logits, targets, valid, beam_width=beam_width, tau=tau)
    counted = terms.counted.float()  # [N]
    if form == "reweight":
        w = _bear_weights(terms, xi, lam) * counted  # [N]
        weights = w / (w.sum() + WEIGHT_EPS)
        # where() rather than a product: an uncounted CE never leaks a NaN or inf into the sum
        loss = torch.where(terms.counted, weights * terms.ce, 0.0).sum()
    else:
        n_counted = counted.sum().clamp(min=1.0)
        per_position = terms.ce + lam * _bear_reg(terms, xi)  # [N]
        loss = torch.where(terms.counted, per_position, 0.0).sum() / n_counted
        weights = counted / n_counted
    if targets.numel() == 0:
        loss = zero_through(logits)
    if not return_details:
        return loss
    details = BearDetails(
        margin=terms.margin,
        outside_topb=terms.outside_topb,
        ce=terms.ce.detach(),
        counted=terms.counted,
        weights=weights.detach(),
    )
    return loss, details


# ---------------------------------------------------------------------------- sum form
@dataclass
class LossSums:
    """Raw sums over a set of positions; add the sums of disjoint chunks, then `loss_from_sums`.

    Tensors marked (grad) carry gradient; the others are detached float32 scalars.
    """

    ce_all: torch.Tensor  # (grad) sum of CE over all positions (LML, MSL)
    ce_counted: torch.Tensor  # (grad) sum of CE over counted positions (BEAR regularizer)
    weighted_ce: torch.Tensor  # (grad) sum over counted of w_t * CE_t, unnormalised (BEAR reweight)
    reg: torch.Tensor  # (grad) sum over counted of log sigmoid((log beta - log p)/xi)
    weight: torch.Tensor  # sum over counted of w_t
    positions: torch.Tensor  # number of positions
    counted: torch.Tensor  # number of counted positions
    # The pruning-risk diagnostic, the same for every loss: positions with more than one trie-valid
    # next token, and those whose gold token ranks outside the top-B among the valid tokens (the
    # ranking beam search applies, whatever the loss; with no mask: among all tokens).
    risk_positions: torch.Tensor
    outside_topb: torch.Tensor

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def zeros(cls, like: torch.Tensor) -> LossSums:
        zero = like.new_zeros((), dtype=torch.float32)
        return cls(**{f.name: zero for f in fields(cls)})

    def as_tensor(self) -> torch.Tensor:
        """[9] float32 vector (detached) in field order, e.g. for an all-reduce of the metrics."""
        return torch.stack([getattr(self, f.name).detach().float() for f in fields(self)])

    @classmethod
    def from_tensor(cls, vector: torch.Tensor) -> LossSums:
        """The inverse of `as_tensor` (e.g. after adding the vectors of micro-batches and ranks)."""
        names = [f.name for f in fields(cls)]
        if vector.shape != (len(names),):
            raise ValueError(f"expected a [{len(names)}] vector ({', '.join(names)}), got shape {tuple(vector.shape)}")
        return cls(**dict(zip(names, vector.unbind(), strict=True)))


def loss_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    name: LossName,
    beam_width: int = 10,
    tau: float = 1.0,
    xi: float = 2.75,
    lam: float = 0.25,
    check: bool = True,
    return_log_p_gold: bool = False,
) -> LossSums | tuple[LossSums, torch.Tensor]:
    """Raw sums of one chunk of positions for loss `name` (LML's loss ignores valid and tau).

    The BEAR weights w_t are detached, so the normalised reweight loss of a micro-batch is
    sum_chunks(weighted_ce) / (sum_chunks(weight) + 1e-8), exactly, without a second pass.
    `valid`, when given, also defines the pruning-risk diagnostic for every loss, LML included.
    beamsim: the CE sums of BEAR; its survival terms span whole responses, so `reg` is 0 here and
    `return_log_p_gold=True` also returns log p[y] [N] (with gradient) to form them from.
    """
    risk_valid = valid
    if name == "lml":
        valid, tau = None, 1.0
    elif name == "msl" and valid is None:
        raise ValueError("the msl loss needs the valid mask")
    terms = position_terms(logits, targets, valid, beam_width=beam_width, tau=tau, check=check)
    counted = terms.counted
    w = _bear_weights(terms, xi, lam)  # [N], detached
    if risk_valid is not None and valid is None:  # LML: rank the gold token among the trie-valid tokens
        with torch.no_grad():
            z = logits.float()  # [N, V]
            gold = z.gather(1, targets[:, None])  # [N, 1]
            better = ((z > gold) & risk_valid).sum(-1)  # [N] valid tokens strictly above gold (ties: inside)
            risk_counted = risk_valid.sum(-1) > 1
            risk_outside = (better >= beam_width) & risk_counted
    else:  # same ranking as the loss's own softmax (order is unchanged by tau)
        risk_counted, risk_outside = counted, terms.outside_topb & counted
    zero = terms.ce.new_zeros(())
    sums = LossSums(
        ce_all=terms.ce.sum(),
        ce_counted=torch.where(counted, terms.ce, 0.0).sum(),
        weighted_ce=torch.where(counted, w * terms.ce, 0.0).sum(),
        reg=torch.where(counted, _bear_reg(terms, xi), 0.0).sum() if name != "beamsim" else zero,
        weight=torch.where(counted, w, 0.0).sum().detach(),
        positions=counted.new_tensor(counted.numel(), dtype=torch.float32),
        counted=counted.sum().float(),
        risk_positions=risk_counted.sum().float(),
        outside_topb=risk_outside.sum().float(),
    )
    return (sums, terms.log_p_gold) if return_log_p_gold else sums


def loss_from_sums(sums: LossSums, *, name: LossName, form: BearForm = "reweight", lam: float = 0.25) -> torch.Tensor:
    """The loss of the positions summed in `sums` (same normalisation as the pure functions)."""
    if name in ("lml", "msl"):
        return sums.ce_all / sums.positions.clamp(min=1.0)
    if name == "beamsim":  # BEAR's regulariser normalisation; reg holds the survival terms
        return (sums.ce_counted + lam * sums.reg) / sums.counted.clamp(min=1.0)
    if form == "reweight":
        return sums.weighted_ce / (sums.weight + WEIGHT_EPS)
    if form == "regularizer":
        return (sums.ce_counted + lam * sums.reg) / sums.counted.clamp(min=1.0)
    raise ValueError(f"form must be 'reweight' or 'regularizer', got {form!r}")


def metrics_from_sums(sums: LossSums, *, name: LossName, form: BearForm = "reweight") -> dict[str, float]:
    """Loggable floats: ce (mean CE over counted positions), reg or weight_mean, frac_outside_topb, counts."""
    counted = max(float(sums.counted), 1.0)
    out = {
        "ce": float(sums.ce_counted.detach()) / counted,
        "frac_outside_topb": float(sums.outside_topb) / max(float(sums.risk_positions), 1.0),
        "counted": float(sums.counted),
        "positions": float(sums.positions),
    }
    if name == "beamsim" or (name == "bear" and form == "regularizer"):
        out["reg"] = float(sums.reg.detach()) / counted
    elif name == "bear":
        out["weight_mean"] = float(sums.weight) / counted
    return out
