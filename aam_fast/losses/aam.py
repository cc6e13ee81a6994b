"""The AAM pairwise reward-model loss on top of the fused log-prob ops, and the rule of what each margin needs.

Functional and module forms take the same arguments in the same order; the module stores the configuration.
Alignment: `hidden[..., t, :]` predicts `targets[..., t]` (for a causal LM: `hidden_states[-1][:, :-1]` and
`labels[:, 1:]`, with prompt and padding labels set to `ignore_index`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import IGNORE_INDEX, LENGTH_NORMS, linear_local_loss, linear_logprobs, sequence_logprobs
from ..ops.validation import check_float32_range, check_materialised, check_number, check_tensors

MARGINS = ("bt", "fixed", "pr", "ld")  # AAM margin kinds
NAMED_GAMMA = {"pr": 1.0, "ld": 0.0}  # the adaptive margins, and the reference's weight γ each name implies


@dataclass(frozen=True)
class MarginNeeds:
    """What one loss setting reads besides the rewards: ``policy_logps``, the model's response log-probs
    (``hidden``, ``weight``, ``targets``); ``reference``, the frozen reference's (``ref_logps``, or ``ref_hidden``
    and ``ref_weight``); ``trained_through``, whether the gradient flows through the model's log-probs (an SFT
    term or an undetached margin: the LM head trains); ``gamma``, the reference weight γ in use (0 for bt, fixed)."""

    policy_logps: bool
    reference: bool
    trained_through: bool
    gamma: float


def margin_needs(
    margin: str, *, gamma: float | None = None, sft_weight: float = 0.0, detach_margin: bool = True
) -> MarginNeeds:
    """The rule, stated once, of what a margin needs: ``pr``/``ld`` read the model's log-probs and, when
    ``γ != 0`` (``pr`` by default, ``ld`` only with ``gamma`` set), the reference's; an SFT term reads the model's
    log-probs and trains through them; ``bt`` and ``fixed`` without SFT read neither."""
    adaptive = margin in NAMED_GAMMA
    gamma_value = (NAMED_GAMMA[margin] if gamma is None else float(gamma)) if adaptive else 0.0
    return MarginNeeds(
        policy_logps=adaptive or sft_weight != 0,
        reference=adaptive and gamma_value != 0,
        trained_through=sft_weight != 0 or (adaptive and not detach_margin),
        gamma=gamma_value,
    )


@dataclass
class AAMOutput:
    """Result of `aam_loss`: the scalar loss and per-pair diagnostics (B pairs)."""

    loss: torch.Tensor
    margin: torch.Tensor
    reward_gap: torch.Tensor
    accuracy: torch.Tensor
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sft_loss: torch.Tensor | None = None


def _pair_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `[2B]` (or `[2B, 1]`) rewards into float32 `(r_c [B], r_r [B])`, squeezing before any arithmetic."""
    check_tensors(rewards=rewards)
    check_materialised(rewards=rewards)
    if rewards.dim() == 2 and rewards.shape[1] == 1:
        rewards = rewards.squeeze(1)
    if rewards.dim() != 1 or rewards.shape[0] % 2 or rewards.shape[0] == 0:
        raise ValueError(
            f"rewards must be [2B] (or [2B, 1]) for a [chosen; rejected] batch, got shape {tuple(rewards.shape)}"
        )
    rewards = rewards.float()
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def _check_margin_args(margin, length_norm, beta, margin_clip, gamma, sft_weight, center_rewards):
    """ValueError naming the argument: a margin or length norm not listed, or a number not finite or out of range
    (``beta``, ``sft_weight``, ``center_rewards`` >= 0; ``margin_clip`` > 0 or None; ``gamma`` any finite number
    or None, for pr and ld only; each within float32's range)."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")
    if gamma is not None and margin not in NAMED_GAMMA:
        raise ValueError(f"gamma applies to margin='pr' or 'ld', not {margin!r}")
    check_number("beta", beta, minimum=0.0)
    check_number("gamma", gamma, optional=True)
    check_number("margin_clip", margin_clip, optional=True, above=0.0)
    check_number("sft_weight", sft_weight, minimum=0.0)
    check_number("center_rewards", center_rewards, minimum=0.0)
    check_float32_range(
        beta=beta, gamma=gamma, margin_clip=margin_clip, sft_weight=sft_weight, center_rewards=center_rewards
    )


def aam_loss(
    hidden: torch.Tensor | None,
    weight: torch.Tensor | None,
    targets: torch.Tensor | None,
    rewards: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    data_margin: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    margin: str = "pr",
    beta: float = 1.0,
    gamma: float | None = None,
    length_norm: str = "mean",
    detach_margin: bool = True,
    margin_clip: float | None = None,
    sft_weight: float = 0.0,
    center_rewards: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
) -> AAMOutput:
    """Pairwise reward-model loss with an act-adaptive margin, mean over the B pairs of a `[chosen; rejected]` batch.

    `loss = −log σ(r_c − r_r − m) + sft_weight · SFT_θ(c) + center_rewards · (r_c + r_r)²` with
    - `bt`: `m = 0`; `fixed`: `m = data_margin`;
    - `pr`/`ld`: `m = β · [(L_θ(c) − L_θ(r)) − γ · (L_ref(c) − L_ref(r))]`, `γ = 1` for "pr" and 0 for "ld"
      unless `gamma` overrides it. `L` is the response log-prob from `hidden`, `weight` (and the reference's
      `ref_logps [2B]`, or `ref_hidden` + `ref_weight`, forward only), summed or averaged by `length_norm`.
    `detach_margin` stops gradients through the margin; `margin_clip` clamps it to `[−c, c]`. With a detached
    margin and `sft_weight = 0` the policy log-probs are computed forward-only (nothing saved for backward).
    hidden `[2B, T, D]`, targets `[2B, T]`, rewards `[2B]` or `[2B, 1]`; hidden/weight/targets may be None for
    "bt" and "fixed" without SFT; `data_margin` is a tensor (a list is refused, naming it). `grad_filter_eps` (off
    by default) as in `linear_logprobs`.
    """
    _check_margin_args(margin, length_norm, beta, margin_clip, gamma, sft_weight, center_rewards)
    check_tensors(hidden=hidden, weight=weight, targets=targets, ref_logps=ref_logps, ref_hidden=ref_hidden)
    reward_chosen, reward_rejected = _pair_rewards(rewards)
    pairs = reward_chosen.shape[0]
    reward_gap = reward_chosen - reward_rejected
    needs = margin_needs(margin, gamma=gamma, sft_weight=sft_weight, detach_margin=detach_margin)
    token_logps = logps = ref_seq = sft = None
    if needs.policy_logps:
        options = {"temperature": temperature, "ignore_index": ignore_index, "backend": backend}
        sft_only = sft_weight != 0 and not (margin in NAMED_GAMMA and not detach_margin)
        sft, token_logps = _policy_token_logps(
            hidden, weight, targets, bias, pairs, needs.trained_through, sft_only, grad_filter_eps, **options
        )
        logps = sequence_logprobs(token_logps, targets, ignore_index=ignore_index, length_norm=length_norm)
    if margin == "bt":
        pair_margin = reward_gap.new_zeros(pairs)
    elif margin == "fixed":
        pair_margin = _data_margin(data_margin, pairs, reward_gap.device)
    else:
        reference = (ref_logps, ref_hidden, ref_weight, ref_bias)
        if needs.reference:
            ref_seq = _reference_logps(*reference, targets, pairs, temperature, ignore_index, length_norm, backend)
        pair_margin = _adaptive_margin(logps, ref_seq, pairs, beta, needs.gamma, detach_margin)
    if margin_clip is not None:
        pair_margin = pair_margin.clamp(-float(margin_clip), float(margin_clip))

    loss = -F.logsigmoid(reward_gap - pair_margin).mean()
    if sft_weight != 0:
        if sft is None:
            sft = -sequence_logprobs(token_logps[:pairs], targets[:pairs], ignore_index=ignore_index).mean()
        loss = loss + float(sft_weight) * sft
    if center_rewards != 0:
        loss = loss + float(center_rewards) * (reward_chosen + reward_rejected).pow(2).mean()
    return AAMOutput(
        loss=loss,
        margin=pair_margin.detach(),
        reward_gap=reward_gap.detach(),
        accuracy=(reward_gap > 0).float().detach(),
        logps=None if logps is None else logps.detach(),
        ref_logps=ref_seq,
        sft_loss=None if sft is None else sft.detach(),
    )


def _adaptive_margin(logps, ref_seq, pairs: int, beta: float, gamma: float, detach: bool) -> torch.Tensor:
    """``m = β·[(L_θ(c) − L_θ(r)) − γ·(L_ref(c) − L_ref(r))]`` per pair (``ref_seq`` None when ``γ = 0``)."""
    policy_term = logps[:pairs] - logps[pairs:]
    if ref_seq is not None:
        policy_term = policy_term - gamma * (ref_seq[:pairs] - ref_seq[pairs:])
    pair_margin = float(beta) * policy_term
    return pair_margin.detach() if detach else pair_margin


def _policy_token_logps(hidden, weight, targets, bias, pairs, trained_through, sft_only, grad_filter_eps, **options):
    """``(SFT term or None, the model's token log-probs [2B, T])``. When the SFT term is the only one trained
    through (``sft_only``) its token gradient is local and it comes from :func:`_local_sft` (three products);
    otherwise the log-probs are differentiable only when the loss trains through them (else forward-only: nothing
    saved for backward)."""
    if hidden is None or weight is None or targets is None:
        raise ValueError("a pr/ld margin or an SFT term needs hidden, weight and targets")
    if targets.dim() < 1 or targets.shape[0] != 2 * pairs:
        raise ValueError(
            f"targets must have 2B={2 * pairs} rows (chosen then rejected), got shape {tuple(targets.shape)}"
        )
    if sft_only:
        return _local_sft(hidden, weight, targets, bias, pairs, grad_filter_eps=grad_filter_eps, **options)
    with torch.set_grad_enabled(torch.is_grad_enabled() and trained_through):
        return None, linear_logprobs(hidden, weight, targets, bias=bias, grad_filter_eps=grad_filter_eps, **options)


def _local_sft(hidden, weight, targets, bias, pairs: int, *, ignore_index, **options):
    """``(SFT_θ(c), token log-probs [2B, T] detached)``: the chosen responses' mean per-token negative log-prob,
    averaged over pairs, through ``linear_local_loss``. Its token gradient, ``−1 / (B · n_i)`` on the chosen
    response tokens and 0 elsewhere, is local, so the op forms it in the forward pass (three products, not four)."""

    def sft_of(token_logps, _entropy):
        return -sequence_logprobs(token_logps[:pairs], targets[:pairs], ignore_index=ignore_index).mean()

    sft, token_logps, _ = linear_local_loss(
        hidden, weight, targets, sft_of, bias=bias, ignore_index=ignore_index, **options
    )
    return sft, token_logps


def _data_margin(data_margin, pairs: int, device) -> torch.Tensor:
    """The data's margins as float32 ``[B]`` (``margin="fixed"``)."""
    if data_margin is None:
        raise ValueError("margin='fixed' needs data_margin [B] (the data's margin column)")
    if not isinstance(data_margin, torch.Tensor):
        raise ValueError(
            f"data_margin must be a torch.Tensor [B] (e.g. torch.tensor(margins)), got {type(data_margin).__name__}"
        )
    check_materialised(data_margin=data_margin)
    pair_margin = data_margin.to(device).float().reshape(-1)
    if pair_margin.shape[0] != pairs:
        raise ValueError(f"data_margin must be [B]=[{pairs}], got shape {tuple(data_margin.shape)}")
    return pair_margin


def _reference_logps(
    ref_logps, ref_hidden, ref_weight, ref_bias, targets, pairs, temperature, ignore_index, length_norm, backend
):
    """The frozen reference's sequence log-probs `[2B]`: given, or computed forward-only from its hidden states."""
    if ref_logps is not None:
        check_materialised(ref_logps=ref_logps)
        ref_logps = ref_logps.detach().float().reshape(-1)
        if ref_logps.shape[0] != 2 * pairs:
            raise ValueError(f"ref_logps must be [2B]=[{2 * pairs}], got shape {tuple(ref_logps.shape)}")
        return ref_logps
    if ref_hidden is None or ref_weight is None:
        raise ValueError("a margin with gamma != 0 needs the reference: ref_logps, or ref_hidden and ref_weight")
    with torch.no_grad():
        token_logps = linear_logprobs(
            ref_hidden,
            ref_weight,
            targets,
            bias=ref_bias,
            temperature=temperature,
            ignore_index=ignore_index,
            backend=backend,
        )
    return sequence_logprobs(token_logps, targets, ignore_index=ignore_index, length_norm=length_norm)


class AAMLoss(nn.Module):
    """Module form of `aam_loss`: configuration in the constructor, tensors in `forward` (same order)."""

    def __init__(
        self,
        margin: str = "pr",
        beta: float = 1.0,
        gamma: float | None = None,
        length_norm: str = "mean",
        detach_margin: bool = True,
        margin_clip: float | None = None,
        sft_weight: float = 0.0,
        center_rewards: float = 0.0,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        grad_filter_eps: float | None = None,
    ):
        super().__init__()
        _check_margin_args(margin, length_norm, beta, margin_clip, gamma, sft_weight, center_rewards)
        self.config = dict(
            margin=margin,
            beta=beta,
            gamma=gamma,
            length_norm=length_norm,
            detach_margin=detach_margin,
            margin_clip=margin_clip,
            sft_weight=sft_weight,
            center_rewards=center_rewards,
            temperature=temperature,
            ignore_index=ignore_index,
            backend=backend,
            grad_filter_eps=grad_filter_eps,
        )

    def forward(
        self,
        hidden,
        weight,
        targets,
        rewards,
        *,
        ref_logps=None,
        ref_hidden=None,
        ref_weight=None,
        data_margin=None,
        bias=None,
        ref_bias=None,
    ) -> AAMOutput:
        return aam_loss(
            hidden,
            weight,
            targets,
            rewards,
            ref_logps=ref_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            data_margin=data_margin,
            bias=bias,
            ref_bias=ref_bias,
            **self.config,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
