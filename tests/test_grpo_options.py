"""TRL's GRPO options (issue 23, item 1): each loss option against a float64 formula (loss and gradients), the
truncation mask, the reference sync, DAPO's dynamic sampling, the multi-objective aggregation, and their combination
on the tiny model (runs, resumes exactly, 2 ranks = 1 process)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_logprobs, rel_err

import aam_fast
from aam_fast.losses import LOSS_TYPES, multi_objective_advantages
from aam_fast.ops import native_backend

BACKENDS = ["torch", "native"]


def needs_backend(backend: str) -> None:
    if backend == "native" and not native_backend.native_available():
        pytest.skip(f"native library not built: {native_backend.BUILD_HINT}")


def grpo_batch(batch=4, length=7, dim=12, vocab=29, seed=0, spread=0.3):
    """Random inputs; old log-probs `spread` away from the current ones, so that some ratios are clipped."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen) * 0.6
    weight = torch.randn(vocab, dim, generator=gen) * 0.6
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    targets[:, :2] = -100
    targets[0, -2:] = -100
    advantages = torch.randn(batch, generator=gen)
    with torch.no_grad():
        base, _ = reference_logprobs(hidden, weight, targets)
    old = (base + spread * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float()
    ref = (base + 0.2 * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float()
    return hidden, weight, targets, advantages, old, ref


def direct(hidden, weight, targets, advantages, old, ref, *, level, delta, quantile, loss_type, eps=0.2, eps_high=0.28):
    """The loss written out in float64. Sequence level: `s_i = exp(mean_t(ℓ − ℓ_old))`; without the entropy mask
    GSPO's sequence objective (differentiated through the mean, broadcast to its tokens), which equals GSPO-token's
    per-token form when a sequence's tokens are weighted alike; with the mask GSPO-token's `sg[s_i]·exp(ℓ_t −
    sg[ℓ_t])`, whose gradient at a token is `s_i·∇ℓ_t` (the mask makes the two differ)."""
    logp, entropy = reference_logprobs(hidden, weight, targets)
    valid = targets != -100
    mask = valid.double()
    log_ratio = (logp - old.double()) * mask
    if level == "sequence":
        sequence = (log_ratio.sum(-1) / mask.sum(-1))[:, None]
        if quantile < 1:
            sequence = sequence.detach() + logp - logp.detach()
        log_ratio = sequence.expand_as(logp)
    ratio = torch.exp(log_ratio)
    a = advantages.double()[:, None]
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    policy = -torch.minimum(unclipped * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
    if quantile < 1:
        threshold = torch.quantile(entropy.detach()[valid], 1 - quantile)
        policy = policy * (entropy.detach() >= threshold).double()
    d = logp - ref.double()
    per = (policy + 0.05 * (torch.exp(-d) + d - 1) - 0.01 * entropy) * mask
    if loss_type == "token-mean":
        return per.sum() / mask.sum()
    if loss_type == "seq-mean-token-mean":
        return (per.sum(-1) / mask.sum(-1)).sum() / mask.shape[0]
    return per.sum() / (mask.shape[0] * mask.shape[1])


def fused(hidden, weight, targets, advantages, old, ref, *, backend, loss_type, **options):
    """`grpo_loss` with the same settings as `direct`; `(output, hidden grad, weight grad)`."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = aam_fast.grpo_loss(
        h,
        w,
        targets,
        advantages,
        old_logps=old,
        ref_logps=ref,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=0.05,
        entropy_coef=0.01,
        loss_type=loss_type,
        backend=backend,
        **options,
    )
    out.loss.backward()
    return out, h.grad, w.grad


CASES = [
    dict(importance_sampling_level="sequence"),
    dict(delta=1.5),
    dict(top_entropy_quantile=0.2),
    dict(importance_sampling_level="sequence", delta=1.4, top_entropy_quantile=0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_the_float64_formula(backend, loss_type, options):
    needs_backend(backend)
    spread = 0.8 if "delta" in options else 0.3  # ratios far enough from 1 that delta caps some
    inputs = grpo_batch(seed=len(loss_type) + len(options), spread=spread)
    out, h_grad, w_grad = fused(*inputs, backend=backend, loss_type=loss_type, **options)
    h64, w64 = inputs[0].double().requires_grad_(True), inputs[1].double().requires_grad_(True)
    expected = direct(
        h64,
        w64,
        *inputs[2:],
        level=options.get("importance_sampling_level", "token"),
        delta=options.get("delta"),
        quantile=options.get("top_entropy_quantile", 1.0),
        loss_type=loss_type,
    )
    expected.backward()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert rel_err(h_grad, h64.grad) <= 1e-4
    assert rel_err(w_grad, w64.grad) <= 1e-4


def test_options_change_the_loss_where_they_apply():
    """The cases above are not vacuous: delta caps some ratios, the sequence ratio differs from the token ones,
    the entropy quantile drops tokens' policy gradient."""
    inputs = grpo_batch(seed=3, spread=0.8)
    plain, h_plain, _ = fused(*inputs, backend="torch", loss_type="token-mean")
    for options in CASES:
        out, h_grad, _ = fused(*inputs, backend="torch", loss_type="token-mean", **options)
        assert rel_err(h_grad, h_plain) > 1e-3, options


def test_quantile_one_is_the_plain_loss_bit_for_bit():
    inputs = grpo_batch(seed=5)
    plain, h_plain, w_plain = fused(*inputs, backend="torch", loss_type="token-mean")
    same, h_same, w_same = fused(*inputs, backend="torch", loss_type="token-mean", top_entropy_quantile=1.0)
    assert torch.equal(plain.loss, same.loss) and torch.equal(h_plain, h_same) and torch.equal(w_plain, w_same)
    assert torch.equal(plain.logps, same.logps)


def test_sequence_level_clip_statistics_count_the_sequence_ratio():
    """Under GSPO a token counts as clipped when its sequence's ratio is outside the range (on its advantage's
    side): whole sequences are clipped or not."""
    hidden, weight, targets, _, old, ref = grpo_batch(seed=2, spread=0.8)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out, _, _ = fused(
        hidden, weight, targets, advantages, old, ref, backend="torch", loss_type="token-mean",
        importance_sampling_level="sequence",
    )  # fmt: skip
    valid = targets != -100
    with torch.no_grad():
        logp, _ = reference_logprobs(hidden, weight, targets)
    s = torch.exp(((logp.float() - old) * valid).sum(-1) / valid.sum(-1))
    low = (s < 0.8) & (advantages < 0)
    high = (s > 1.28) & (advantages > 0)
    assert out.stats["clip_low_sum"].item() == (valid.sum(-1) * low).sum().item()
    assert out.stats["clip_high_sum"].item() == (valid.sum(-1) * high).sum().item()


def test_entropy_quantile_over_every_rank():
    """Two halves of a batch, each given the other's entropies by `entropy_gather`, sum to the whole batch's loss
    and gradient (the quantile is over every rank's tokens)."""
    hidden, weight, targets, advantages, old, ref = grpo_batch(batch=6, seed=7)
    options = dict(loss_type="token-mean", top_entropy_quantile=0.3)
    whole, h_whole, w_whole = fused(hidden, weight, targets, advantages, old, ref, backend="torch", **options)
    _, entropy = aam_fast.linear_logprobs(hidden, weight, targets, return_entropy=True)
    valid = targets != -100
    count = valid.sum().item()
    parts, h_parts, w_total = [], [], torch.zeros_like(weight)
    for rows, others in ((slice(0, 3), slice(3, 6)), (slice(3, 6), slice(0, 3))):
        other = entropy[others][valid[others]]

        def gather(values, other=other):
            return torch.cat([values, other])

        h = hidden[rows].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = aam_fast.grpo_loss(
            h, w, targets[rows], advantages[rows], old_logps=old[rows], ref_logps=ref[rows], epsilon=0.2,
            epsilon_high=0.28, beta=0.05, entropy_coef=0.01, backend="torch", normalizer=count,
            entropy_gather=gather, **options,
        )  # fmt: skip
        out.loss.backward()
        parts.append(out.loss.item())
        h_parts.append(h.grad)
        w_total += w.grad
    assert sum(parts) == pytest.approx(whole.loss.item(), rel=1e-6)
    assert rel_err(torch.cat(h_parts), h_whole) <= 1e-6 and rel_err(w_total, w_whole) <= 1e-6


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(importance_sampling_level="word"), "importance_sampling_level must be one of"),
        (dict(delta=1.1), "delta must be None or greater than 1 \\+ epsilon_high"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile must be in \\(0, 1\\]"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile must be in \\(0, 1\\]"),
    ],
)
def test_option_ranges_are_refused(options, message):
    hidden, weight, targets, advantages, _, _ = grpo_batch()
    with pytest.raises(ValueError, match=message):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, **options)
    with pytest.raises(ValueError, match=message):
        aam_fast.GRPOLoss(**options)


def test_module_and_functional_take_the_options_in_the_same_order():
    import inspect

    functional = list(inspect.signature(aam_fast.grpo_loss).parameters)
    module = list(inspect.signature(aam_fast.GRPOLoss.__init__).parameters)[1:]
    options = ["importance_sampling_level", "delta", "top_entropy_quantile"]
    assert [p for p in functional if p in options] == [p for p in module if p in options] == options
    inputs = grpo_batch(seed=9)
    hidden, weight, targets, advantages, old, ref = inputs
    settings = dict(importance_sampling_level="sequence", delta=1.5, top_entropy_quantile=0.5)
    a = aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, **settings)
    b = aam_fast.GRPOLoss(**settings)(hidden, weight, targets, advantages, old_logps=old)
    assert torch.equal(a.loss, b.loss)


# -- multi-objective aggregation -------------------------------------------------------------------------------


def test_sum_then_normalize_is_group_advantages_of_the_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(12, 2, generator=gen)
    table[3, 1] = float("nan")
    weights = torch.tensor([1.0, 0.5])
    total = torch.nansum(table * weights, dim=1)
    for scale in ("group", "batch", "none"):
        expected = aam_fast.group_advantages(total, 4, scale=scale)
        got = multi_objective_advantages(table, weights, 4, scale=scale)
        assert torch.equal(got, expected)


def test_normalize_then_sum_normalises_each_source_in_its_group_then_the_sum_over_the_batch():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(12, 3, generator=gen) * torch.tensor([1.0, 10.0, 0.1])
    table[5, 2] = float("nan")
    table[8:12, :] = 2.0  # a group where every source is constant: advantage exactly 0
    weights = torch.tensor([1.0, 0.5, 2.0])
    got = multi_objective_advantages(table, weights, 4, aggregation="normalize_then_sum")
    t = table.double().view(3, 4, 3)
    normalised = torch.zeros_like(t)
    for g in range(3):
        for k in range(3):
            column = t[g, :, k]
            present = column[~torch.isnan(column)]
            mean = present.mean()
            std = present.std() if present.numel() > 1 else torch.zeros((), dtype=torch.float64)
            normalised[g, :, k] = (column - mean) / (std + 1e-4)
    summed = torch.nansum(normalised.view(12, 3) * weights.double(), dim=1)
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    expected[8:12] = 0.0
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert torch.equal(got[8:12], torch.zeros(4))
    # the sources' scales no longer matter: source 1 (x10) does not dominate as it does in the plain sum
    scaled = table.clone()
    scaled[:, 1] *= 100.0
    again = multi_objective_advantages(scaled, weights, 4, aggregation="normalize_then_sum")
    assert torch.allclose(again, got, atol=1e-4)
