"""LML, MSL and BEAR losses: pure functions, the chunked hidden-state head, and the model coupling."""

from bear_ds.losses.functional import (
    BearDetails,
    LossSums,
    beam_threshold,
    bear_loss,
    lml_loss,
    log_probs,
    loss_from_sums,
    loss_sums,
    metrics_from_sums,
    msl_loss,
    position_terms,
)
from bear_ds.losses.head import LMHead, LossOutput, response_loss, select_response
from bear_ds.losses.model import backbone_hidden_states, lm_head_context, logit_transform

__all__ = [
    "BearDetails",
    "LMHead",
    "LossOutput",
    "LossSums",
    "backbone_hidden_states",
    "beam_threshold",
    "bear_loss",
    "lm_head_context",
    "lml_loss",
    "log_probs",
    "logit_transform",
    "loss_from_sums",
    "loss_sums",
    "metrics_from_sums",
    "msl_loss",
    "position_terms",
    "response_loss",
    "select_response",
]
