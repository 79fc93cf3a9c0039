"""LML, MSL, BEAR and S-DPO losses: pure functions, the chunked hidden-state head, and the model coupling."""

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
from bear_ds.losses.model import backbone_hidden_states, lm_head_context, logit_transform, unwrap_model
from bear_ds.losses.preference import (
    PreferenceOutput,
    PreferenceSums,
    preference_loss,
    response_rows,
    sdpo_loss,
    sdpo_terms,
    sequence_logps,
    token_logps,
)

__all__ = [
    "BearDetails",
    "LMHead",
    "LossOutput",
    "LossSums",
    "PreferenceOutput",
    "PreferenceSums",
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
    "preference_loss",
    "response_loss",
    "response_rows",
    "sdpo_loss",
    "sdpo_terms",
    "select_response",
    "sequence_logps",
    "token_logps",
    "unwrap_model",
]
