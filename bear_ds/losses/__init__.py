"""LML, MSL, BEAR and beamsim losses: pure functions, the chunked hidden-state head, and the model coupling."""

from bear_ds.losses.beamsim import SimulatedSearch, beamsim_loss, margin_pruned, prefix_log_probs, survival_terms
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
from bear_ds.losses.model import (
    BackboneOutput,
    backbone_forward,
    backbone_hidden_states,
    lm_head_context,
    logit_transform,
)

__all__ = [
    "BackboneOutput",
    "BearDetails",
    "LMHead",
    "LossOutput",
    "LossSums",
    "SimulatedSearch",
    "backbone_forward",
    "backbone_hidden_states",
    "beam_threshold",
    "beamsim_loss",
    "bear_loss",
    "lm_head_context",
    "lml_loss",
    "log_probs",
    "logit_transform",
    "loss_from_sums",
    "loss_sums",
    "margin_pruned",
    "metrics_from_sums",
    "msl_loss",
    "position_terms",
    "prefix_log_probs",
    "response_loss",
    "select_response",
    "survival_terms",
]
