"""What the fused log-prob op reads of a model's LM head, in one compute dtype."""

from __future__ import annotations

import torch
from torch import nn


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, D], bias [V] or None)`` of a causal LM's output embedding."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def head_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` in one dtype for ``linear_logprobs``: the autocast dtype when training under
    autocast (as autocast would run the LM head, whose final norm may have returned float32; the casts are
    differentiable, so gradients reach float32 master weights), else the weight's dtype."""
    dtype = compute_dtype or weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
