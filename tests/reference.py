"""Float64 references written out directly (materialised logits): what every kernel is tested against."""

from __future__ import annotations

import torch


def reference_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """Float64 `(logp, entropy)` from materialised logits; 0 at ignored positions. Differentiable."""
    h = hidden.double()
    z = h @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)


def naive_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, *, with_entropy=False):
    """The usual materialising implementation in the inputs' own dtype (the baseline for low-precision error).

    Log-softmax in float32, `H = −Σ p log p`; returns `logp`, or `(logp, entropy)` with `with_entropy`.
    """
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = (z / temperature).float()
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, picked, torch.zeros_like(picked))
    if not with_entropy:
        return logp
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def rel_err(actual, expected, floor: float = 1e-2) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor·√n) in float64; NaN anywhere gives inf.

    The floor (an RMS of 1e-2 per element) keeps a tensor whose entries are all near 0 (a log-prob of a token
    with p ≈ 1 is `z_y − lse`, two O(1) numbers cancelling) from turning float32 rounding into a huge ratio.
    """
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = max(expected.norm().item(), floor * expected.numel() ** 0.5)
    return (actual - expected).norm().item() / (denom if denom > 0 else 1.0)
