"""Training: loop, parallelize (compile, DDP/FSDP2), checkpoints, EMA, metrics."""

from fastflow.train.ema import EMA
from fastflow.train.loop import Trainer, train_from_config

__all__ = ["EMA", "Trainer", "train_from_config"]
