"""The table of training losses: `loss.name` -> `LossSpec`, the only registry of losses.

The built-in losses are listed here, nothing registers itself on import; `register_loss` adds a
loss from outside the package (what a loss gets and returns: `bear_ds/training/loss_api.py`).
`loss.name` accepts any name; the trainer looks it up here before it builds anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bear_ds.errors import ConfigError
from bear_ds.training.loss_api import LossContext, LossSpec, MicroBatchLossFn, as_loss
from bear_ds.training.loss_beamsim import beamsim_micro_batch_loss
from bear_ds.training.loss_sdpo import PREFERENCE_METRICS, sdpo_epoch_start, sdpo_micro_batch_loss, sdpo_setup
from bear_ds.training.loss_token import token_loss

# each built-in compute is bound to its name (`as_loss`), so `loss_spec(name).compute` registered
# under another name still computes this loss
LOSSES: dict[str, LossSpec] = {
    "lml": LossSpec(as_loss("lml", token_loss)),
    "msl": LossSpec(as_loss("msl", token_loss)),
    "bear": LossSpec(as_loss("bear", token_loss)),
    "beamsim": LossSpec(as_loss("beamsim", beamsim_micro_batch_loss), extra_metrics=("sim_pruned_frac",)),
    "sdpo": LossSpec(
        as_loss("sdpo", sdpo_micro_batch_loss),
        extra_metrics=PREFERENCE_METRICS,
        setup=sdpo_setup,
        epoch_start=sdpo_epoch_start,
    ),
}


def register_loss(
    name: str,
    compute: MicroBatchLossFn,
    *,
    extra_metrics: tuple[str, ...] = (),
    setup: Callable[[Any, LossContext], Any] | None = None,
    epoch_start: Callable[[Any, LossContext, int, int], None] | None = None,
) -> None:
    """Make `loss.name=name` train with `compute` (see `bear_ds/training/loss_api.py`); a name
    already in the table is replaced."""
    LOSSES[name] = LossSpec(compute, tuple(extra_metrics), setup, epoch_start)


def loss_spec(name: str) -> LossSpec:
    """The loss registered as `name`; a ConfigError listing the known names otherwise."""
    if name not in LOSSES:
        known = ", ".join(repr(known) for known in LOSSES)
        raise ConfigError(f"loss.name: got {name!r}; known losses: {known} or one added with register_loss")
    return LOSSES[name]


__all__ = ["LOSSES", "loss_spec", "register_loss"]
