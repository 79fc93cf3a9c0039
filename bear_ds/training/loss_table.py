"""The table of training losses: `loss.name` -> `LossSpec`, the only registry of losses.

The built-in losses are listed here; `register_loss` adds one from outside the package (see
`bear_ds/training/loss_api.py` for what a loss gets and returns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bear_ds.training.loss_api import LossContext, LossSpec, MicroBatchLossFn
from bear_ds.training.loss_beamsim import beamsim_micro_batch_loss
from bear_ds.training.loss_sdpo import PREFERENCE_METRICS, _epoch_start, _setup, sdpo_loss
from bear_ds.training.loss_token import token_loss

LOSSES: dict[str, LossSpec] = {
    "lml": LossSpec(token_loss),
    "msl": LossSpec(token_loss),
    "bear": LossSpec(token_loss),
    "beamsim": LossSpec(beamsim_micro_batch_loss, extra_metrics=("sim_pruned_frac",)),
    "sdpo": LossSpec(sdpo_loss, extra_metrics=PREFERENCE_METRICS, setup=_setup, epoch_start=_epoch_start),
}


def register_loss(
    name: str,
    compute: MicroBatchLossFn,
    *,
    extra_metrics: tuple[str, ...] = (),
    setup: Callable[[Any, LossContext], Any] | None = None,
    epoch_start: Callable[[Any, LossContext, int, int], None] | None = None,
) -> None:
    """Make `loss.name=name` train with `compute` (see the module docstring)."""
    LOSSES[name] = LossSpec(compute, tuple(extra_metrics), setup, epoch_start)


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r} has no training loss registered (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


__all__ = ["LOSSES", "loss_spec", "register_loss"]
