"""The options of TRL's GRPOConfig that act on the token log-probs, the entropies and the rewards, used by
:func:`aam_fast.grpo_loss` and :func:`aam_fast.group_advantages`.

- ``importance_sampling_level``: ``"token"`` (one ratio per token) or ``"sequence"`` (GSPO: one ratio per sequence,
  ``s_i = exp(mean_t(ℓ_t − ℓ_old,t))``, in GSPO's per-token form ``sg[s_i]·exp(ℓ_t − sg[ℓ_t])``: the value ``s_i``
  at every token, the gradient ``s_i·∇ℓ_t``).
- ``delta``: two-sided clipping (INTELLECT-2): the unclipped branch's ratio is capped at ``delta``, which bounds the
  ratio of negative-advantage tokens.
- ``top_entropy_quantile``: only the tokens whose entropy is in the top ``q`` fraction of the batch's completion
  tokens keep the policy-gradient term.
- ``multi_objective_aggregation``: ``"normalize_then_sum"`` normalises each reward source within its group before
  the weighted sum, then normalises the sum over the batch (TRL's GDPO-style aggregation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# The widest ratio clip (epsilon, epsilon_high) and cap (delta): far beyond any in use (0.2-0.28, delta about 4), and
# it keeps 1 +- epsilon a float32 value (a clamp to 1e308 fails in float32 arithmetic)
RATIO_BOUND_MAX = 1e6

EntropyGather = Callable[[torch.Tensor], torch.Tensor]


def check_options(importance_sampling_level: str, delta: float | None, top_entropy_quantile: float, eps_high: float):
    """ValueError naming the option outside its range: a known level, ``1 + epsilon_high < delta <=
    RATIO_BOUND_MAX`` (below it the clip already bounds the ratio and delta would do nothing),
    ``0 < top_entropy_quantile <= 1``."""
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    if delta is not None and not 1.0 + eps_high < delta <= RATIO_BOUND_MAX:
        raise ValueError(
            f"delta must be None or greater than 1 + epsilon_high = {1.0 + eps_high} and at most {RATIO_BOUND_MAX:g}, "
            f"got {delta!r}"
        )
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile!r}")


def is_local(importance_sampling_level: str, top_entropy_quantile: float) -> bool:
    """Whether the token loss's gradient at a token depends on that token alone (the fused op's one-pass mode):
    a sequence-level ratio couples a sequence's tokens, an entropy quantile the whole batch's."""
    return importance_sampling_level == "token" and top_entropy_quantile >= 1.0


def log_importance_weights(
    logps: torch.Tensor, old: torch.Tensor, valid: torch.Tensor, level: str, detach: bool = False
) -> torch.Tensor:
    """``log ρ`` per token ``[B, T]`` (0 at ignored positions): ``ℓ − ℓ_old`` for ``"token"``; for ``"sequence"``
    the sequence's mean log-ratio over its completion tokens as the value, with the gradient of ``ℓ_t`` alone
    (GSPO's ``sg[log s_i] + ℓ_t − sg[ℓ_t]``)."""
    log_ratio = torch.where(valid, logps - old, 0.0)
    if level == "token":
        return log_ratio
    sequence = log_ratio.sum(-1) / valid.sum(-1).clamp_min(1)
    if detach:
        return torch.where(valid, sequence[:, None].detach(), 0.0)
    return torch.where(valid, sequence.detach()[:, None] + (logps - logps.detach()), 0.0)


def clipped_surrogate(ratio, adv, epsilon: float, eps_high: float, delta: float | None) -> torch.Tensor:
    """``min(ρ'A, clip(ρ, 1−ε, 1+ε_high)A)`` with ``ρ' = min(ρ, delta)`` when ``delta`` is set, else ``ρ``."""
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    return torch.minimum(unclipped * adv, ratio.clamp(1.0 - epsilon, 1.0 + eps_high) * adv)


def policy_loss(logps, old, adv, valid, clip: tuple, entropy, quantile: float, gather: EntropyGather | None):
    """The per-token policy-gradient loss ``−m_t·min(ρ'A, clip(ρ, 1−ε, 1+ε_high)A)`` (``clip``: ``(ε, ε_high,
    importance_sampling_level, delta)``; ``m_t`` the :func:`high_entropy_mask` when ``quantile < 1``). With the
    plain settings, exactly GRPO's per-token expression."""
    epsilon, eps_high, level, delta = clip
    if level == "token" and delta is None:
        ratio = torch.exp(logps - old)
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - epsilon, 1.0 + eps_high) * adv)
    else:
        ratio = torch.exp(log_importance_weights(logps, old, valid, level))
        per_token = -clipped_surrogate(ratio, adv, epsilon, eps_high, delta)
    if quantile < 1.0:
        per_token = per_token * high_entropy_mask(entropy, valid, quantile, gather)
    return per_token


@torch.no_grad()
def high_entropy_mask(
    entropy: torch.Tensor, valid: torch.Tensor, quantile: float, gather: EntropyGather | None = None
) -> torch.Tensor:
    """The completion tokens whose entropy is at least the ``1 − quantile`` quantile (linear interpolation, as
    ``torch.quantile``) of the batch's completion-token entropies; ``gather`` maps this process's values to every
    rank's (the quantile is then over the micro-batch of every rank). All of ``valid`` when there is no token."""
    values = entropy.detach()[valid].float()
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return valid
    threshold = torch.quantile(values, 1.0 - quantile)
    return valid & (entropy.detach() >= threshold.to(entropy.device))


def constant_groups(table: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[B / num_generations]`` bool: the groups in which every source's rewards are all equal (NaN equal to NaN),
    which ``normalize_then_sum`` gives advantage exactly 0."""
    grouped = table.float().view(-1, num_generations, table.shape[1])
    first = grouped[:, :1]
    same = (grouped == first) | (torch.isnan(grouped) & torch.isnan(first))
    return same.all(dim=2).all(dim=1)


def normalize_then_sum(table: torch.Tensor, weights: torch.Tensor, num_generations: int, eps: float) -> torch.Tensor:
    """``[B]`` advantages from the per-source rewards ``table [B, K]`` (NaN: no reward from that source) in groups
    of ``num_generations``: each source centred and divided by its group's std (+eps; NaN-ignoring, unbiased), the
    weighted NaN-ignoring sum, then that sum centred and divided by its std over the whole batch (+eps), as TRL.
    A group of :func:`constant_groups` gets exactly 0."""
    grouped = table.float().view(-1, num_generations, table.shape[1])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    if num_generations > 1:
        present = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        squares = torch.nansum((grouped - mean) ** 2, dim=1, keepdim=True)
        std = (squares / (present - 1).clamp_min(1)).sqrt()
    else:
        std = torch.zeros_like(mean)
    normalised = ((grouped - mean) / (std + eps)).view(-1, table.shape[1])
    summed = torch.nansum(normalised * weights.float(), dim=1)
    spread = summed.std() if summed.numel() > 1 else summed.new_zeros(())
    advantages = (summed - summed.mean()) / (spread + eps)
    constant = constant_groups(table, num_generations).repeat_interleave(num_generations)
    return torch.where(constant, torch.zeros_like(advantages), advantages)
