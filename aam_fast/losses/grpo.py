"""The GRPO token loss on top of the fused local-loss op, the KL estimators and group-relative advantages.

Functional and module forms take the same arguments in the same order; the module stores the configuration.
Alignment: `hidden[..., t, :]` predicts `targets[..., t]` (completion tokens; prompt and padding set to
`ignore_index`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import IGNORE_INDEX, linear_local_loss
from ..ops.validation import check_float32_range, check_materialised, check_number, check_tensors
from .grpo_options import (
    AGGREGATIONS,
    RATIO_BOUND_MAX,
    EntropyGather,
    check_options,
    is_local,
    log_importance_weights,
    normalize_then_sum,
    policy_loss,
)

KL_KINDS = ("k1", "k2", "k3")  # per-token KL estimators (`kl_penalty`)
LOSS_TYPES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # GRPO aggregations
# TRL's GRPOConfig.loss_type names for the same aggregations ("dapo" and "bnpo" differ in TRL only in whether the
# token count spans processes: here that is the `normalizer` the caller passes).
LOSS_TYPE_ALIASES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
SCALE_REWARDS = ("group", "batch", "none")  # how `group_advantages` scales the centred rewards
# k3's exp(−δ) is evaluated on δ clamped to this range, and the estimate is capped, as is usual for this estimator.
_KL_DELTA_CLAMP = 20.0
_KL_MAX = 10.0


@dataclass
class GRPOOutput:
    """Result of `grpo_loss`: the loss, detached token log-probs, and `stats`: sums to reduce by counts across ranks
    and two per-sequence extremes to reduce by min/max (`_grpo_stats`)."""

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate with `δ = ℓ − ℓ_ref`: k1 `δ`, k2 `δ²/2`, k3 `exp(−δ) + δ − 1` (δ clamped, capped)."""
    delta = logps - ref_logps
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta.pow(2)
    if kind == "k3":
        delta = delta.clamp(-_KL_DELTA_CLAMP, _KL_DELTA_CLAMP)
        return (torch.exp(-delta) + delta - 1.0).clamp(max=_KL_MAX)
    raise ValueError(f"kl must be one of {KL_KINDS}, got {kind!r}")


def resolve_loss_type(loss_type: str) -> str:
    """The canonical name (one of `LOSS_TYPES`) of `loss_type`, which may also be a TRL name (`LOSS_TYPE_ALIASES`)."""
    if loss_type in LOSS_TYPES:
        return loss_type
    if isinstance(loss_type, str) and loss_type in LOSS_TYPE_ALIASES:
        return LOSS_TYPE_ALIASES[loss_type]
    raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or TRL's {tuple(LOSS_TYPE_ALIASES)}), got {loss_type!r}")


def _check_grpo_args(
    epsilon, epsilon_high, kl, loss_type, beta, entropy_coef, level="token", delta=None, quantile=1.0
) -> float:
    """ValueError naming the argument: a KL estimator or loss type not listed, a number not finite or negative
    (``epsilon``, ``epsilon_high`` (or None), ``beta``, ``entropy_coef``; the clip ranges at most
    ``RATIO_BOUND_MAX``) or an option out of its range
    (:func:`.grpo_options.check_options`); returns ε_high (``epsilon_high``, default ``epsilon``)."""
    if kl not in KL_KINDS:
        raise ValueError(f"kl must be one of {KL_KINDS}, got {kl!r}")
    resolve_loss_type(loss_type)
    check_number("epsilon", epsilon, minimum=0.0, maximum=RATIO_BOUND_MAX)
    check_number("epsilon_high", epsilon_high, optional=True, minimum=0.0, maximum=RATIO_BOUND_MAX)
    check_number("beta", beta, minimum=0.0)
    check_number("entropy_coef", entropy_coef, minimum=0.0)
    check_float32_range(beta=beta, entropy_coef=entropy_coef)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    check_options(level, delta, quantile, eps_high)
    return eps_high


def _check_normalizer(normalizer) -> float:
    """`normalizer` as a float; ValueError unless it is a positive finite number (or a one-element tensor of one)."""
    if isinstance(normalizer, torch.Tensor) and normalizer.numel() == 1:
        value = float(normalizer)
    elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        value = float(normalizer)
    else:
        raise ValueError(f"normalizer must be a positive finite number or None, got {normalizer!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"normalizer must be a positive finite number (the step's token or sequence count) or None, got {value!r}"
        )
    return value


def default_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> float:
    """The aggregation constant of one batch: tokens, sequences, or sequences × max completion length; a sequence
    counts when it has a completion token (a row masked out entirely is not trained on).

    For exact gradient accumulation sum this over every micro-batch (and rank) of the optimizer step, before the
    micro-batch loop, and pass the total as `normalizer`. `max_completion_length` must be a positive int or None.
    """
    loss_type = resolve_loss_type(loss_type)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):  # 0 divided by zero, a negative one flipped the loss's sign
        raise ValueError(f"max_completion_length must be a positive integer or None, got {max_completion_length!r}")
    if loss_type == "token-mean":
        return float(mask.sum())
    sequences = float(mask.bool().any(dim=-1).sum())
    if loss_type == "seq-mean-token-mean":
        return sequences
    length = max_completion_length if max_completion_length is not None else mask.shape[-1]
    return sequences * float(length)


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    normalizer: float | None = None,
    entropy_gather: EntropyGather | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    entropy_coef: float = 0.0,
    loss_type: str = "token-mean",
    max_completion_length: int | None = None,
    compute_entropy: bool = True,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    top_entropy_quantile: float = 1.0,
) -> GRPOOutput:
    """GRPO clipped-surrogate loss of completion tokens, its gradient formed during the forward pass.

    Per token, `ρ = exp(ℓ − ℓ_old)` (ℓ_old = detached ℓ when `old_logps` is None), `loss_t = −m_t·min(ρ'A,
    clip(ρ, 1−ε, 1+ε_high)A) + β·KL_t − entropy_coef·H_t`: `ρ' = min(ρ, delta)` when `delta` is set (two-sided
    clipping, `delta > 1 + ε_high`), else `ρ`; `importance_sampling_level="sequence"` (GSPO): one ratio per
    sequence, `s_i = exp(mean_t(ℓ_t − ℓ_old,t))`, with the gradient `s_i·∇ℓ_t` at each token; `m_t` = 1, or with
    `top_entropy_quantile = q < 1` whether `H_t` is in the top q of the batch's completion-token entropies (every
    rank's through `entropy_gather`; :mod:`.grpo_options`); q = 1 is the plain loss, bit for bit. Summed over
    completion tokens (targets != ignore_index) and divided by `normalizer`: total tokens ("token-mean"),
    sequences after a per-sequence token mean ("seq-mean-token-mean"), or sequences × max_completion_length
    ("seq-mean-token-sum-norm", Dr. GRPO).
    `normalizer=None` uses this batch's own; a given `normalizer` must be a positive finite number (ValueError
    otherwise). `loss_type` may also be a TRL name (`LOSS_TYPE_ALIASES`). Values of `old_logps`, `ref_logps` and
    `advantages` at ignored positions never reach the loss or its gradient (NaN or −inf there is harmless).
    hidden `[B, T, D]`, targets `[B, T]`, advantages `[B]`, old_logps/ref_logps `[B, T]`. `grad_filter_eps` (off
    by default) as in `linear_logprobs`.
    """
    eps_high = _check_grpo_args(
        epsilon, epsilon_high, kl, loss_type, beta, entropy_coef, importance_sampling_level, delta, top_entropy_quantile
    )
    loss_type = resolve_loss_type(loss_type)
    check_tensors(
        hidden=hidden, weight=weight, targets=targets, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps
    )
    check_tensors(bias=bias)
    advantages = _check_grpo_tensors(targets, advantages, old_logps, ref_logps, beta)
    valid = targets != ignore_index
    mask = valid.float()
    scale = _loss_scale(normalizer, mask, loss_type, max_completion_length)
    with_entropy = compute_entropy or entropy_coef != 0 or top_entropy_quantile < 1.0
    adv = torch.where(valid, advantages[:, None], 0.0)  # selected away, so NaN or −inf there never reaches the loss
    clip = (epsilon, eps_high, importance_sampling_level, delta)

    def token_loss(logps, entropy):
        old = logps.detach() if old_logps is None else torch.where(valid, old_logps.float(), logps.detach())
        per_token = policy_loss(logps, old, adv, valid, clip, entropy, top_entropy_quantile, entropy_gather)
        if beta != 0:
            ref = torch.where(valid, ref_logps.float(), logps.detach())
            per_token = per_token + beta * kl_penalty(logps, ref, kl)
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * entropy
        per_token = torch.where(valid, per_token, 0.0)
        if loss_type == "seq-mean-token-mean":
            return (per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() * scale
        return per_token.sum() * scale

    op = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, grad_filter_eps=grad_filter_eps)
    local = is_local(importance_sampling_level, top_entropy_quantile)
    loss, logps, entropy = linear_local_loss(
        hidden, weight, targets, token_loss, with_entropy=with_entropy, backend=backend, local=local, **op
    )
    stats = _grpo_stats(logps, entropy, valid, advantages, old_logps, ref_logps, clip, kl)
    return GRPOOutput(loss=loss, logps=logps, entropy=entropy, stats=stats)


def _loss_scale(normalizer, mask: torch.Tensor, loss_type: str, max_completion_length: int | None) -> float:
    """1 / the normaliser: the given one (checked), else this batch's own (at least 1: an empty batch)."""
    if normalizer is None:
        return 1.0 / max(default_normalizer(mask, loss_type, max_completion_length), 1.0)
    return 1.0 / _check_normalizer(normalizer)


def _check_grpo_tensors(targets, advantages, old_logps, ref_logps, beta) -> torch.Tensor:
    """ValueError naming the tensor whose shape does not fit (or that is on the meta device); returns the float32
    advantages ``[B]``."""
    check_materialised(targets=targets, advantages=advantages, old_logps=old_logps, ref_logps=ref_logps)
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T], got shape {tuple(targets.shape)}")
    batch = targets.shape[0]
    if tuple(advantages.shape) not in ((batch,), (batch, 1)):  # the shape given, not a flattened one ([2, 2] for B=4)
        raise ValueError(f"advantages must be [B]=[{batch}] (or [B, 1]), got shape {tuple(advantages.shape)}")
    advantages = advantages.reshape(-1).float()
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if tensor is not None and tuple(tensor.shape) != tuple(targets.shape):
            raise ValueError(f"{name} must be shaped like targets {tuple(targets.shape)}, got {tuple(tensor.shape)}")
    if beta != 0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's token log-probs)")
    return advantages


@torch.no_grad()
def _grpo_stats(logps, entropy, valid, advantages, old_logps, ref_logps, clip, kl):
    """Sums over completion tokens (reduce across micro-batches and ranks by adding, then divide by `tokens`), and
    two per-sequence extremes (reduce by min and max): `clip_low_seq_min`, the smallest fraction of a sequence's
    tokens that are low-clipped, and `clip_high_seq_max`, the largest high-clipped fraction, over the sequences with
    a completion token (+inf and −inf when there is none), as TRL's `clip_ratio/low_min` and `high_max`.

    Ignored positions are selected away before any arithmetic, as in the loss. ``clip``: ``(ε, ε_high,
    importance_sampling_level, delta)``; a token is clipped when the ratio the loss clips (its sequence's, under
    ``"sequence"``) is outside the range on its advantage's side."""
    epsilon, eps_high, level, _ = clip
    old = logps if old_logps is None else torch.where(valid, old_logps.float(), logps)
    ratio = torch.exp(log_importance_weights(logps, old, valid, level, detach=True))
    adv = torch.where(valid, advantages[:, None], 0.0)
    low = (ratio < 1.0 - epsilon) & (adv < 0) & valid
    high = (ratio > 1.0 + eps_high) & (adv > 0) & valid
    lengths = valid.sum(-1)
    present = lengths > 0
    low_fraction = (low.sum(-1).float() / lengths.clamp_min(1))[present]
    high_fraction = (high.sum(-1).float() / lengths.clamp_min(1))[present]
    stats = {
        "tokens": valid.sum().float(),
        "clip_low_sum": low.sum().float(),
        "clip_high_sum": high.sum().float(),
        "clip_region_sum": (low | high).sum().float(),
        "clip_low_seq_min": low_fraction.min() if low_fraction.numel() else logps.new_tensor(math.inf),
        "clip_high_seq_max": high_fraction.max() if high_fraction.numel() else logps.new_tensor(-math.inf),
    }
    if ref_logps is not None:
        ref = torch.where(valid, ref_logps.float(), logps)
        stats["kl_sum"] = torch.where(valid, kl_penalty(logps, ref, kl), 0.0).sum()
    if entropy is not None:
        stats["entropy_sum"] = torch.where(valid, entropy, 0.0).sum()
    return stats


class GRPOLoss(nn.Module):
    """Module form of `grpo_loss`: configuration in the constructor, tensors in `forward` (same order)."""

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        kl: str = "k3",
        entropy_coef: float = 0.0,
        loss_type: str = "token-mean",
        max_completion_length: int | None = None,
        compute_entropy: bool = True,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        grad_filter_eps: float | None = None,
        importance_sampling_level: str = "token",
        delta: float | None = None,
        top_entropy_quantile: float = 1.0,
    ):
        super().__init__()
        options = (importance_sampling_level, delta, top_entropy_quantile)
        _check_grpo_args(epsilon, epsilon_high, kl, loss_type, beta, entropy_coef, *options)
        self.config = dict(
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            beta=beta,
            kl=kl,
            entropy_coef=entropy_coef,
            loss_type=loss_type,
            max_completion_length=max_completion_length,
            compute_entropy=compute_entropy,
            temperature=temperature,
            ignore_index=ignore_index,
            backend=backend,
            grad_filter_eps=grad_filter_eps,
            importance_sampling_level=importance_sampling_level,
            delta=delta,
            top_entropy_quantile=top_entropy_quantile,
        )

    def forward(
        self,
        hidden,
        weight,
        targets,
        advantages,
        *,
        old_logps=None,
        ref_logps=None,
        bias=None,
        normalizer=None,
        entropy_gather=None,
    ) -> GRPOOutput:
        return grpo_loss(
            hidden,
            weight,
            targets,
            advantages,
            old_logps=old_logps,
            ref_logps=ref_logps,
            bias=bias,
            normalizer=normalizer,
            entropy_gather=entropy_gather,
            **self.config,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


def group_advantages(
    rewards: torch.Tensor, num_generations: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages of `[B]` rewards laid out as consecutive groups of `num_generations` completions.

    `"group"`: `(R − mean_g R) / (std_g R + eps)`; `"batch"`: the std over the whole batch; `"none"`: only centred
    (Dr. GRPO). A group whose rewards are all equal gets advantage exactly 0. Stds are unbiased (as TRL).
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    rewards = rewards.reshape(-1).float()
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(
            f"rewards ({rewards.shape[0]}) must be a whole number of groups of num_generations={num_generations}"
        )
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    zero_spread = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(centred[:, :1])
        advantages = centred / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = centred / (std + eps)
    else:
        advantages = centred
    return torch.where(zero_spread, torch.zeros_like(advantages), advantages).reshape(-1)


def multi_objective_advantages(
    table: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    *,
    aggregation: str = "sum_then_normalize",
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """``[B]`` advantages of several reward sources, ``table [B, K]`` (NaN: no reward from that source) weighted by
    ``weights [K]``. ``"sum_then_normalize"``: :func:`group_advantages` (``scale``) of the NaN-ignoring weighted sum;
    ``"normalize_then_sum"``: each source normalised within its group first, the weighted sum normalised over the
    batch (:func:`.grpo_options.normalize_then_sum`; ``scale`` does not apply)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if table.dim() != 2 or weights.shape != (table.shape[1],):
        raise ValueError(f"table must be [B, K] with K weights, got {tuple(table.shape)} and {tuple(weights.shape)}")
    if aggregation == "sum_then_normalize":
        total = torch.nansum(table.float() * weights.float(), dim=1)
        return group_advantages(total, num_generations, scale=scale, eps=eps)
    if num_generations < 1 or table.shape[0] % num_generations:
        raise ValueError(
            f"rewards ({table.shape[0]}) must be a whole number of groups of num_generations={num_generations}"
        )
    return normalize_then_sum(table, weights, num_generations, eps)
