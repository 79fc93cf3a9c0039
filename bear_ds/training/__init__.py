"""Training: the `Trainer` (trainer.py), the table of losses and its plug-in point (loss_table.py,
loss_api.py, one loss_*.py per loss), batch schedules, the Accelerator, checkpoints and resume,
run logs, the consolidated export.

`train(cfg)` is the API; `python -m bear_ds.train` and `bear-ds train` are its command lines.
"""

from bear_ds.training.loss_table import LOSSES, loss_spec, register_loss
from bear_ds.training.trainer import NonFiniteLossError, Trainer, TrainState, train

__all__ = ["LOSSES", "NonFiniteLossError", "TrainState", "Trainer", "loss_spec", "register_loss", "train"]
