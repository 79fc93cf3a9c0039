"""Training: the `Trainer` (trainer.py), the per-micro-batch loss registry (micro_batch.py), batch
schedules, the Accelerator, checkpoints and resume, run logs, the consolidated export.

`train(cfg)` is the API; `python -m bear_ds.train` and `bear-ds train` are its command lines.
"""

from bear_ds.training.loss_table import register_loss
from bear_ds.training.trainer import NonFiniteLossError, Trainer, TrainState, train

__all__ = ["NonFiniteLossError", "TrainState", "Trainer", "register_loss", "train"]
