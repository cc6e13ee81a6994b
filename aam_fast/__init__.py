"""aam_fast: fused kernels and a lean training core for Act-Adaptive-Margin reward models and GRPO."""

from .losses import (
    IGNORE_INDEX,
    AAMLoss,
    AAMOutput,
    GRPOLoss,
    GRPOOutput,
    aam_loss,
    default_normalizer,
    group_advantages,
    grpo_loss,
    kl_penalty,
)
from .ops import linear_local_loss, linear_logprobs, sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "AAMLoss",
    "AAMOutput",
    "GRPOLoss",
    "GRPOOutput",
    "aam_loss",
    "default_normalizer",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "linear_local_loss",
    "linear_logprobs",
    "sequence_logprobs",
]
