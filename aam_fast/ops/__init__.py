"""Fused linear log-prob ops: kernels, their autograd wrappers and backend dispatch."""

from .linear_logprobs import linear_logprobs, sequence_logprobs
from .local_loss import linear_local_loss

__all__ = ["linear_logprobs", "linear_local_loss", "sequence_logprobs"]
