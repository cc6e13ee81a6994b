"""Fused linear log-prob ops: kernels, their autograd wrappers and backend dispatch."""

from .linear_logprobs import LENGTH_NORMS, linear_logprobs, sequence_logprobs
from .local_loss import linear_local_loss
from .params import IGNORE_INDEX, LogprobParams

__all__ = [
    "IGNORE_INDEX",
    "LENGTH_NORMS",
    "LogprobParams",
    "linear_local_loss",
    "linear_logprobs",
    "sequence_logprobs",
]
