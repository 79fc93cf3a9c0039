"""The Accelerate/DeepSpeed training loop, checkpoints, resume, logging and the consolidated export."""

from bear_ds.training.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "train"]
