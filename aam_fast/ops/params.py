"""What every backend call shares besides the tensors: `LogprobParams`, and the one `IGNORE_INDEX`.

Kept free of backend imports so that the backends, the autograd wrappers and the losses can all import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: backends.py imports the backend modules, which import this one
    from .backends import Backend

# Targets equal to this are skipped: 0 log-prob, 0 entropy, 0 gradient (the label PyTorch's losses ignore).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LogprobParams:
    """Everything but the tensors, the same for forward and backward.

    `inv_temperature = 1/τ` scales the logits `z = (h Wᵀ + b)/τ`; `with_entropy` asks the forward for `mean_z`;
    `grad_filter_eps > 0` lets the backward drop off-target logits-gradient entries whose `p < eps`.
    """

    backend: Backend
    inv_temperature: float
    ignore_index: int = IGNORE_INDEX
    with_entropy: bool = False
    grad_filter_eps: float = 0.0
