"""AAM and GRPO losses against formulas written out directly in float64 (materialised logits)."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from reference import reference_logprobs, rel_err

import aam_fast
from aam_fast.losses import KL_KINDS, LOSS_TYPES

BACKENDS = ["torch", "triton"]


def pair_batch(pairs=3, length=6, dim=16, vocab=41, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, dim, generator=gen) * 0.5
    weight = torch.randn(vocab, dim, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    targets[:, :2] = -100  # prompt
    targets[1, -1] = -100  # padding
    rewards = torch.randn(2 * pairs, generator=gen)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=gen)
    return hidden, weight, targets, rewards, ref_hidden


def seq_logps64(hidden, weight, targets, norm="mean", bias=None, temperature=1.0):
    token, _ = reference_logprobs(hidden, weight, targets, bias, temperature)
    mask = (targets != -100).double()
    total = (token * mask).sum(-1)
    return total if norm == "sum" else total / mask.sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "margin,gamma,norm", [("pr", None, "mean"), ("pr", None, "sum"), ("ld", None, "mean"), ("pr", 0.5, "mean")]
)
def test_adaptive_margin_matches_formula(backend, margin, gamma, norm):
    hidden, weight, targets, rewards, ref_hidden = pair_batch()
    beta = 0.7
    out = aam_fast.aam_loss(
        hidden,
        weight,
        targets,
        rewards.unsqueeze(1),
        ref_hidden=ref_hidden,
        ref_weight=weight,
        margin=margin,
        beta=beta,
        gamma=gamma,
        length_norm=norm,
        backend=backend,
    )
    g = {"pr": 1.0, "ld": 0.0}[margin] if gamma is None else gamma
    pol = seq_logps64(hidden, weight, targets, norm)
    ref = seq_logps64(ref_hidden, weight, targets, norm)
    m = beta * ((pol[:3] - pol[3:]) - g * (ref[:3] - ref[3:]))
    r = rewards.double()
    expected = -F.logsigmoid(r[:3] - r[3:] - m).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert rel_err(out.margin, m) <= 1e-4  # a difference of differences of O(1) log-probs
    assert rel_err(out.reward_gap, r[:3] - r[3:]) <= 1e-7
    assert torch.equal(out.accuracy, (r[:3] > r[3:]).float())
    assert rel_err(out.logps, pol) <= 1e-5


def test_bt_with_margin_equals_logsigmoid_of_gap_minus_margin():
    rewards = torch.tensor([1.0, 0.2, -0.3, 0.5, 0.2, 0.1])
    data_margin = torch.tensor([0.3, -0.1, 0.9])
    out = aam_fast.aam_loss(None, None, None, rewards, data_margin=data_margin, margin="fixed")
    rc, rr = rewards[:3], rewards[3:]
    assert torch.allclose(out.loss, -F.logsigmoid(rc - rr - data_margin).mean())
    bt = aam_fast.aam_loss(None, None, None, rewards, margin="bt")
    assert torch.allclose(bt.loss, -F.logsigmoid(rc - rr).mean())
    assert torch.equal(bt.accuracy, torch.tensor([1.0, 0.0, 0.0]))  # a tie (0.2 vs 0.2) is wrong


def test_ref_logps_and_ref_hidden_agree():
    hidden, weight, targets, rewards, ref_hidden = pair_batch(seed=3)
    ref_logps = seq_logps64(ref_hidden, weight, targets).float()
    a = aam_fast.aam_loss(hidden, weight, targets, rewards, ref_logps=ref_logps, margin="pr")
    b = aam_fast.aam_loss(hidden, weight, targets, rewards, ref_hidden=ref_hidden, ref_weight=weight, margin="pr")
    assert torch.allclose(a.loss, b.loss, atol=1e-6)


def test_detached_margin_sends_no_gradient_to_the_lm_head():
    hidden, weight, targets, rewards, ref_hidden = pair_batch(seed=4)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    rewards.requires_grad_(True)
    out = aam_fast.aam_loss(hidden, weight, targets, rewards, ref_hidden=ref_hidden, ref_weight=weight.detach())
    out.loss.backward()
    assert hidden.grad is None and weight.grad is None
    assert rewards.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_trained_through_margin_sft_and_centering_gradients(backend):
    hidden, weight, targets, rewards, ref_hidden = pair_batch(seed=5)
    kwargs = dict(margin="pr", beta=0.5, detach_margin=False, margin_clip=0.8, sft_weight=0.3, center_rewards=0.1)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, rewards)]
    out = aam_fast.aam_loss(
        leaves[0], leaves[1], targets, leaves[2], ref_hidden=ref_hidden, ref_weight=weight, backend=backend, **kwargs
    )
    out.loss.backward()

    h, w, r = [t.detach().double().requires_grad_(True) for t in (hidden, weight, rewards)]
    pol = seq_logps64(h, w, targets)
    ref = seq_logps64(ref_hidden, weight, targets)
    m = (0.5 * ((pol[:3] - pol[3:]) - (ref[:3] - ref[3:]))).clamp(-0.8, 0.8)
    expected = -F.logsigmoid(r[:3] - r[3:] - m).mean() + 0.3 * (-pol[:3]).mean() + 0.1 * (r[:3] + r[3:]).pow(2).mean()
    expected.backward()
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    for leaf, ref_leaf in zip(leaves, (h, w, r), strict=True):
        assert rel_err(leaf.grad, ref_leaf.grad) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", ["bt", "pr", "ld"])
def test_sft_term_alone_takes_the_local_loss_mode(backend, margin, monkeypatch):
    """With a detached margin (or none) the SFT term is the only one trained through: it runs through
    linear_local_loss (its token gradient is local, three products) and matches the float64 formula, gradients
    included, with a bias and a temperature."""
    import aam_fast.losses.aam as aam_module

    calls = []
    local = aam_module.linear_local_loss
    monkeypatch.setattr(aam_module, "linear_local_loss", lambda *a, **k: calls.append(1) or local(*a, **k))
    hidden, weight, targets, rewards, ref_hidden = pair_batch(seed=6)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(7)) * 0.3
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias, rewards)]
    reference = {} if margin == "bt" else {"ref_hidden": ref_hidden, "ref_weight": weight, "ref_bias": bias}
    out = aam_fast.aam_loss(
        leaves[0],
        leaves[1],
        targets,
        leaves[3],
        bias=leaves[2],
        margin=margin,
        beta=0.5,
        sft_weight=0.3,
        temperature=0.8,
        backend=backend,
        **reference,
    )
    out.loss.backward()
    assert calls == [1]

    h, w, b, r = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias, rewards)]
    pol = seq_logps64(h, w, targets, bias=b, temperature=0.8)
    m = torch.zeros(3, dtype=torch.float64)
    if margin != "bt":
        ref = seq_logps64(ref_hidden, weight, targets, bias=bias, temperature=0.8)
        gamma = 1.0 if margin == "pr" else 0.0
        m = 0.5 * ((pol[:3] - pol[3:]) - gamma * (ref[:3] - ref[3:])).detach()
    expected = -F.logsigmoid(r[:3] - r[3:] - m).mean() + 0.3 * (-pol[:3]).mean()
    expected.backward()
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    assert rel_err(out.sft_loss, (-pol[:3]).mean()) <= 1e-5
    for leaf, ref_leaf in zip(leaves, (h, w, b, r), strict=True):
        assert rel_err(leaf.grad, ref_leaf.grad) <= 1e-4


def test_aam_errors():
    hidden, weight, targets, rewards, _ = pair_batch()
    with pytest.raises(ValueError, match="data_margin"):
        aam_fast.aam_loss(None, None, None, rewards, margin="fixed")
    with pytest.raises(ValueError, match="reference"):
        aam_fast.aam_loss(hidden, weight, targets, rewards, margin="pr")
    with pytest.raises(ValueError, match=r"\[2B\]"):
        aam_fast.aam_loss(hidden, weight, targets, rewards[:5], margin="ld")
    with pytest.raises(ValueError, match="margin must be"):
        aam_fast.aam_loss(hidden, weight, targets, rewards, margin="gpt")
    with pytest.raises(ValueError, match="needs hidden"):
        aam_fast.aam_loss(None, None, None, rewards, margin="ld")
    with pytest.raises(ValueError, match="2B=6 rows"):
        aam_fast.aam_loss(hidden[:4], weight, targets[:4], rewards, margin="ld")


def test_ld_needs_no_reference_and_module_matches_functional():
    hidden, weight, targets, rewards, _ = pair_batch(seed=7)
    module = aam_fast.AAMLoss(margin="ld", beta=2.0)
    a = module(hidden, weight, targets, rewards)
    b = aam_fast.aam_loss(hidden, weight, targets, rewards, margin="ld", beta=2.0)
    assert torch.equal(a.loss, b.loss)
    pol = seq_logps64(hidden, weight, targets)
    assert rel_err(a.margin, 2.0 * (pol[:3] - pol[3:])) <= 1e-5


def test_module_and_functional_share_argument_order():
    for module, functional in ((aam_fast.AAMLoss, aam_fast.aam_loss), (aam_fast.GRPOLoss, aam_fast.grpo_loss)):
        forward = list(inspect.signature(module.forward).parameters)[1:]
        config = list(inspect.signature(module.__init__).parameters)[1:]
        params = list(inspect.signature(functional).parameters)
        assert params[: len(forward)] == forward  # tensors first, same order
        tensor_kw = [p for p in params if p not in config]
        assert tensor_kw == forward
        assert [p for p in params if p in config] == [p for p in config if p in params]


# ---------------------------------------------------------------- GRPO


def grpo_batch(batch=4, length=7, dim=12, vocab=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen) * 0.6
    weight = torch.randn(vocab, dim, generator=gen) * 0.6
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    targets[:, :2] = -100
    targets[0, -2:] = -100
    advantages = torch.randn(batch, generator=gen)
    with torch.no_grad():
        base, _ = reference_logprobs(hidden, weight, targets)
    old = (base + 0.3 * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float()
    ref = (base + 0.2 * torch.randn(base.shape, generator=gen, dtype=torch.float64)).float()
    return hidden, weight, targets, advantages, old, ref


def direct_grpo(
    hidden,
    weight,
    targets,
    advantages,
    old,
    ref,
    *,
    eps,
    eps_high,
    beta,
    kl,
    ent_coef,
    loss_type,
    normalizer,
    max_len=None,
):
    """The per-token GRPO loss written out (float64), aggregated as the three modes define."""
    logp, entropy = reference_logprobs(hidden, weight, targets)
    mask = (targets != -100).double()
    ratio = torch.exp(logp - old.double())
    a = advantages.double()[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
    delta = logp - ref.double()
    kl_t = {"k1": delta, "k2": delta**2 / 2, "k3": torch.exp(-delta) + delta - 1}[kl]
    per = (-surrogate + beta * kl_t - ent_coef * entropy) * mask
    if loss_type == "token-mean":
        return per.sum() / (normalizer or mask.sum())
    if loss_type == "seq-mean-token-mean":
        return (per.sum(-1) / mask.sum(-1)).sum() / (normalizer or mask.shape[0])
    return per.sum() / (normalizer or mask.shape[0] * (max_len or mask.shape[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", KL_KINDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_matches_direct_formula(backend, kl, loss_type):
    hidden, weight, targets, advantages, old, ref = grpo_batch(seed=len(kl) + len(loss_type))
    cfg = dict(eps=0.2, eps_high=0.28, beta=0.05, kl=kl, ent_coef=0.01, loss_type=loss_type, normalizer=None)
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
        kl=kl,
        entropy_coef=0.01,
        loss_type=loss_type,
        backend=backend,
    )
    out.loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    expected = direct_grpo(h64, w64, targets, advantages, old, ref, **cfg)
    expected.backward()
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert rel_err(h.grad, h64.grad) <= 1e-4
    assert rel_err(w.grad, w64.grad) <= 1e-4
    assert out.logps.grad_fn is None and out.stats["tokens"].item() == (targets != -100).sum().item()


def test_grpo_on_policy_ratio_is_one_and_gradient_is_advantage_weighted():
    hidden, weight, targets, advantages, _, _ = grpo_batch(seed=11)
    h = hidden.clone().requires_grad_(True)
    out = aam_fast.grpo_loss(h, weight, targets, advantages)
    out.loss.backward()
    h64 = hidden.double().requires_grad_(True)
    logp, _ = reference_logprobs(h64, weight, targets)
    mask = (targets != -100).double()
    (-(logp * advantages.double()[:, None] * mask).sum() / mask.sum()).backward()
    assert rel_err(h.grad, h64.grad) <= 1e-4
    assert out.stats["clip_region_sum"].item() == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_two_micro_batches_accumulate_to_one_batch(loss_type):
    hidden, weight, targets, advantages, old, ref = grpo_batch(batch=6, seed=21)
    cfg = dict(old_logps=None, beta=0.1, kl="k3", loss_type=loss_type, max_completion_length=7)
    mask = targets != -100
    normalizer = aam_fast.default_normalizer(mask.float(), loss_type, 7)

    w_full = weight.clone().requires_grad_(True)
    full = aam_fast.grpo_loss(
        hidden, w_full, targets, advantages, **{**cfg, "old_logps": old}, ref_logps=ref, normalizer=normalizer
    )
    full.loss.backward()

    w_acc = weight.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 6)):  # unequal token counts per micro-batch
        part = aam_fast.grpo_loss(
            hidden[rows],
            w_acc,
            targets[rows],
            advantages[rows],
            **{**cfg, "old_logps": old[rows]},
            ref_logps=ref[rows],
            normalizer=normalizer,
        )
        part.loss.backward()
        total += part.loss.item()
    assert abs(total - full.loss.item()) <= 1e-6
    assert rel_err(w_acc.grad, w_full.grad) <= 1e-5


def test_grpo_module_matches_functional_and_errors():
    hidden, weight, targets, advantages, old, ref = grpo_batch(seed=31)
    module = aam_fast.GRPOLoss(beta=0.04, kl="k2", loss_type="seq-mean-token-mean")
    a = module(hidden, weight, targets, advantages, old_logps=old, ref_logps=ref)
    b = aam_fast.grpo_loss(
        hidden,
        weight,
        targets,
        advantages,
        old_logps=old,
        ref_logps=ref,
        beta=0.04,
        kl="k2",
        loss_type="seq-mean-token-mean",
    )
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="ref_logps"):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, beta=0.1)
    with pytest.raises(ValueError, match="kl must be"):
        aam_fast.GRPOLoss(kl="k4")
    with pytest.raises(ValueError, match="loss_type"):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, loss_type="sum")
    with pytest.raises(ValueError, match="advantages"):
        aam_fast.grpo_loss(hidden, weight, targets, advantages[:2])
    with pytest.raises(ValueError, match="old_logps"):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old[:, :3])


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = aam_fast.group_advantages(rewards, 3)
    first = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(adv[:3], (first - 2.0) / (first.std() + 1e-4))
    assert torch.equal(adv[3:], torch.zeros(3))  # zero spread: exactly 0, not 0/eps noise
    batch = aam_fast.group_advantages(rewards, 3, scale="batch")
    assert torch.allclose(batch[:3], (first - 2.0) / (rewards.std() + 1e-4))
    assert torch.allclose(aam_fast.group_advantages(rewards, 3, scale="none")[:3], first - 2.0)
    assert torch.equal(aam_fast.group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3), torch.zeros(3))
    with pytest.raises(ValueError, match="groups"):
        aam_fast.group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale"):
        aam_fast.group_advantages(rewards, 3, scale="rank")


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = logp - ref
    assert torch.allclose(aam_fast.kl_penalty(logp, ref, "k1"), d)
    assert torch.allclose(aam_fast.kl_penalty(logp, ref, "k2"), d**2 / 2)
    assert torch.allclose(aam_fast.kl_penalty(logp, ref, "k3"), torch.exp(-d) + d - 1)
    assert aam_fast.kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "k3").item() == 10.0


@pytest.mark.parametrize("chunk_bytes", [2 * 4 * 50 * 5, 2**30])  # 5-row chunks (ragged), or one chunk
def test_local_loss_chunked_path_matches_float64(monkeypatch, chunk_bytes):
    """The torch backend's three-product path for local losses: bias, temperature, entropy, ignored rows."""
    from aam_fast.ops import torch_chunked

    monkeypatch.setattr(torch_chunked, "_CHUNK_BUDGET_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(41)
    hidden = torch.randn(3, 9, 10, generator=gen)
    weight = torch.randn(50, 10, generator=gen) * 0.7
    bias = torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (3, 9), generator=gen)
    targets[:, :3] = -100
    coef = torch.randn(3, 9, generator=gen)

    def token_loss(logp, entropy):
        mask = (targets != -100).float()
        return ((coef * logp + 0.3 * torch.exp(logp) - 0.2 * entropy) * mask).sum() / mask.sum()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, logp, entropy = aam_fast.linear_local_loss(
        leaves[0], leaves[1], targets, token_loss, bias=leaves[2], temperature=0.8, with_entropy=True, backend="torch"
    )
    loss.backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_logp, ref_entropy = reference_logprobs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], 0.8)
    ref_loss = token_loss(ref_logp, ref_entropy)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert rel_err(logp, ref_logp) <= 3e-5 and rel_err(entropy, ref_entropy) <= 3e-5
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert rel_err(leaf.grad, ref_leaf.grad) <= 1e-4
    assert torch.all(leaves[0].grad[targets == -100] == 0)


def test_grpo_loss_scaled_upstream_gradient():
    """backward of 2.5 * loss scales the precomputed gradients; backward of loss hands them over unchanged."""
    hidden, weight, targets, advantages, old, _ = grpo_batch(seed=51)
    w1, w2 = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    aam_fast.grpo_loss(hidden, w1, targets, advantages, old_logps=old).loss.backward()
    (2.5 * aam_fast.grpo_loss(hidden, w2, targets, advantages, old_logps=old).loss).backward()
    assert torch.allclose(w2.grad, 2.5 * w1.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("normalizer", [0, 0.0, -3.0, float("inf"), float("nan"), True, "12", torch.tensor([1.0, 2.0])])
def test_grpo_refuses_a_normalizer_that_is_not_positive_and_finite(normalizer):
    hidden, weight, targets, advantages, old, _ = grpo_batch(seed=61)
    with pytest.raises(ValueError, match="normalizer"):
        aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, normalizer=normalizer)
    with pytest.raises(ValueError, match="normalizer"):
        aam_fast.GRPOLoss()(hidden, weight, targets, advantages, old_logps=old, normalizer=normalizer)


def test_grpo_normalizer_is_used_as_given():
    """A positive normalizer below 1 divides as it is (it used to be raised to 1); a 0-d tensor is accepted."""
    hidden, weight, targets, advantages, old, _ = grpo_batch(seed=62)
    plain = aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, normalizer=1.0).loss
    half = aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, normalizer=0.5).loss
    tensor = aam_fast.grpo_loss(hidden, weight, targets, advantages, old_logps=old, normalizer=torch.tensor(4.0)).loss
    assert torch.allclose(half, 2 * plain) and torch.allclose(tensor, plain / 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("-inf"), float("inf")])
def test_grpo_values_at_ignored_positions_never_reach_the_loss(backend, poison):
    """NaN or ±inf in old_logps / ref_logps at ignored positions (and the advantage of a row with no completion
    token): the loss, its gradients and the stats equal those of the same batch with zeros there."""
    hidden, weight, targets, advantages, old, ref = grpo_batch(seed=63)
    targets[3] = -100  # a row with no completion token
    ignored = targets == -100
    clean = [torch.where(ignored, 0.0, t) for t in (old, ref)]
    poisoned = [torch.where(ignored, poison, t) for t in (old, ref)]
    adv_poisoned = advantages.clone()
    adv_poisoned[3] = poison
    results = []
    for (old_t, ref_t), adv in ((clean, advantages), (poisoned, adv_poisoned)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = aam_fast.grpo_loss(
            h, w, targets, adv, old_logps=old_t, ref_logps=ref_t, beta=0.1, entropy_coef=0.01, backend=backend
        )
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, out.stats))
    (loss_c, gh_c, gw_c, stats_c), (loss_p, gh_p, gw_p, stats_p) = results
    assert torch.isfinite(loss_p) and torch.isfinite(gh_p).all() and torch.isfinite(gw_p).all()
    assert torch.equal(loss_p, loss_c) and torch.equal(gh_p, gh_c) and torch.equal(gw_p, gw_c)
    for key, value in stats_c.items():
        assert torch.equal(stats_p[key], value), key


@pytest.mark.parametrize("alias,canonical", sorted(aam_fast.losses.LOSS_TYPE_ALIASES.items()))
def test_trl_loss_type_names_are_aliases(alias, canonical):
    hidden, weight, targets, advantages, old, _ = grpo_batch(seed=64)
    kwargs = dict(old_logps=old, max_completion_length=9)
    via_alias = aam_fast.grpo_loss(hidden, weight, targets, advantages, loss_type=alias, **kwargs).loss
    direct = aam_fast.grpo_loss(hidden, weight, targets, advantages, loss_type=canonical, **kwargs).loss
    assert torch.equal(via_alias, direct)
    assert aam_fast.losses.resolve_loss_type(alias) == canonical
    with pytest.raises(ValueError, match="loss_type"):
        aam_fast.GRPOLoss(loss_type="grpo-mean")


def test_stage_constants_are_declared_once_in_losses():
    from aam_fast import losses

    assert losses.MARGINS == ("bt", "fixed", "pr", "ld")
    assert losses.NAMED_GAMMA == {"pr": 1.0, "ld": 0.0}
    assert losses.LENGTH_NORMS == ("mean", "sum")
    assert losses.KL_KINDS == ("k1", "k2", "k3")
    assert losses.SCALE_REWARDS == ("group", "batch", "none")
    assert set(losses.LOSS_TYPE_ALIASES.values()) <= set(losses.LOSS_TYPES)
    assert all(hasattr(losses, name) for name in losses.__all__)


def test_aam_refuses_a_list_data_margin_by_name():
    _, _, _, rewards, _ = pair_batch()
    with pytest.raises(ValueError, match="data_margin must be a torch.Tensor"):
        aam_fast.aam_loss(None, None, None, rewards, margin="fixed", data_margin=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"data_margin must be \[B\]"):
        aam_fast.aam_loss(None, None, None, rewards, margin="fixed", data_margin=torch.ones(4))
    out = aam_fast.aam_loss(None, None, None, rewards, margin="fixed", data_margin=torch.tensor([0.1, 0.2, 0.3]))
    gap = rewards[:3] - rewards[3:]
    assert torch.allclose(out.loss, -F.logsigmoid(gap - torch.tensor([0.1, 0.2, 0.3])).mean())


def test_aam_refuses_hidden_size_zero_by_name():
    _, _, targets, rewards, _ = pair_batch()
    with pytest.raises(ValueError, match="hidden size D"):
        aam_fast.aam_loss(torch.randn(6, 6, 0), torch.randn(41, 0), targets, rewards, margin="ld")
