"""The GRPO stage: settings (:mod:`.config`), rewards, row-seeded sampling, rollouts, the trainer and its CLI."""

from .config import GRPOConfig
from .trainer import GRPOTrainer, train_grpo

__all__ = ["GRPOConfig", "GRPOTrainer", "train_grpo"]
