"""Benchmark inputs that look like a trained model's: peaked softmax, targets sampled from it, fixed seeds.

The head `W [V, D]` has rows of about unit norm and the hidden states are `N(0, LOGIT_STD²)`, so each logit is
about `N(0, LOGIT_STD²)`: with `LOGIT_STD = 6` the softmax entropy is 2 to 2.5 nats at V = 32k..152k and the
largest probability about 0.5, like a trained LM and unlike a random one (entropy ≈ log V). Targets are sampled
from that softmax (completions sampled from the policy), so most have a sizeable probability. The sampling pass
also yields the targets' log-probs, from which the "reference" and "old policy" log-probs of the loss workloads
are drawn as small perturbations. Nothing is ever zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .shapes import Shape

LOGIT_STD = 6.0
SEED = 20251127
# Largest float32 [rows, V] block the sampling pass materialises at once.
_SAMPLE_BLOCK_BYTES = 256 * 2**20


@dataclass
class BaseInputs:
    """Flat inputs of one shape; workloads view `hidden`/`targets` as `[rows, T, D]`/`[rows, T]`."""

    hidden: torch.Tensor  # [N, D] in the shape's dtype
    weight: torch.Tensor  # [V, D] in the shape's dtype
    targets: torch.Tensor  # [N] int64, sampled from softmax(hidden Wᵀ)
    target_logps: torch.Tensor  # [N] float32 log-probs of the targets
    grad_out: torch.Tensor  # [N] float32 arbitrary upstream gradient for the forward+backward workload
    mean_entropy: float  # nats, over all N tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight, self.targets))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


@torch.no_grad()
def make_inputs(shape: Shape, device: torch.device) -> BaseInputs:
    """Deterministic inputs for `shape` on `device` (seeded by the shape, so every provider sees the same)."""
    dtype = _dtype(shape.dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(SEED + shape.tokens * 7 + shape.d * 13 + shape.v)
    weight = (torch.randn(shape.v, shape.d, generator=gen, device=device) / shape.d**0.5).to(dtype)
    hidden = (torch.randn(shape.tokens, shape.d, generator=gen, device=device) * LOGIT_STD).to(dtype)
    targets = torch.empty(shape.tokens, dtype=torch.long, device=device)
    target_logps = torch.empty(shape.tokens, dtype=torch.float32, device=device)
    entropy_sum = 0.0
    block = max(1, _SAMPLE_BLOCK_BYTES // (4 * shape.v))
    for r0 in range(0, shape.tokens, block):
        r1 = min(shape.tokens, r0 + block)
        logp = torch.log_softmax((hidden[r0:r1] @ weight.t()).float(), dim=-1)
        probs = logp.exp()
        picked = torch.multinomial(probs, 1, generator=gen)
        targets[r0:r1] = picked[:, 0]
        target_logps[r0:r1] = logp.gather(1, picked)[:, 0]
        entropy_sum += float(-(probs * logp).sum())
        del logp, probs
    grad_out = torch.randn(shape.tokens, generator=gen, device=device)
    return BaseInputs(hidden, weight, targets, target_logps, grad_out, entropy_sum / shape.tokens)


def perturbed(logps: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """`logps + N(0, scale²)`, clamped to stay a log-probability: a nearby policy's log-probs."""
    gen = torch.Generator(device=logps.device)
    gen.manual_seed(seed)
    noise = torch.randn(logps.shape, generator=gen, device=logps.device) * scale
    return (logps + noise).clamp(max=0.0)
