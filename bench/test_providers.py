"""Every provider computes what the benchmarks claim it computes: values and gradients against float64 references
at a small odd shape (not benchmarks: `--benchmark-only` skips these; `pytest bench/` runs them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .providers import (
    PROVIDER_NAMES,
    GRPOBatch,
    LigerProvider,
    PairBatch,
    Unavailable,
    aam_loss_reference,
    all_providers,
    grpo_loss_reference,
    sequence_mean,
)

PAIRS, SEQ, DIM, VOCAB = 2, 37, 48, 515
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = all_providers()


def _provider(name: str, workload: str):
    provider = PROVIDERS[name]
    try:
        provider.check(workload, DEVICE)
    except Unavailable as exc:
        pytest.skip(str(exc))
    return provider


def _inputs(rows: int, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(rows, SEQ, DIM, generator=gen, device=DEVICE) * 3.0
    weight = torch.randn(VOCAB, DIM, generator=gen, device=DEVICE) / DIM**0.5
    targets = torch.randint(0, VOCAB, (rows, SEQ), generator=gen, device=DEVICE)
    return hidden, weight, targets, gen


def _reference_logprobs(hidden, weight, targets):
    logits = hidden.double() @ weight.double().t()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True)]


# CCE filters small softmax entries out of its gradient by default, as do the aam-*-filter providers (eps = 2⁻¹²);
# everything else is exact to float32.
GRAD_TOL = {"cce": 2e-3, "aam-torch-filter": 2e-3, "aam-triton-filter": 2e-3}


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_token_logprobs_and_gradients(name):
    provider = _provider(name, "logprobs-fwdbwd")
    hidden, weight, targets, gen = _inputs(3, seed=1)
    flat_h = hidden.view(-1, DIM).requires_grad_(True)
    weight.requires_grad_(True)
    flat_t = targets.view(-1)
    upstream = torch.randn(flat_t.shape, generator=gen, device=DEVICE)
    logp, *got = provider.logprobs_and_grads(flat_h, weight, flat_t, upstream)
    assert logp.dtype == torch.float32 and logp.shape == flat_t.shape
    ref = _reference_logprobs(flat_h, weight, flat_t)
    assert _rel_err(logp, ref) < 1e-5
    want = _grads((ref * upstream.double()).sum(), [flat_h, weight])
    for g, w in zip(got, want, strict=True):
        assert _rel_err(g, w) < GRAD_TOL.get(name, 1e-4)


def _pair_batch(trained: bool):
    hidden, weight, targets, gen = _inputs(2 * PAIRS, seed=2)
    rewards = torch.randn(2 * PAIRS, generator=gen, device=DEVICE).requires_grad_(True)
    ref_logps = -3.0 + torch.randn(2 * PAIRS, generator=gen, device=DEVICE)
    return PairBatch(
        hidden.requires_grad_(trained),
        weight.requires_grad_(trained),
        targets,
        rewards,
        ref_logps,
        beta=0.7,
        sft_weight=0.1 if trained else 0.0,
    )


def _liger_dpo_reference(batch: PairBatch):
    """What Liger's DPO loss computes with our settings: −log σ(β(L_c − L_r)) + α · NLL(chosen tokens)."""
    seq = sequence_mean(_reference_logprobs(batch.hidden, batch.weight, batch.targets), batch.targets)
    chosen_tokens = _reference_logprobs(batch.hidden[:PAIRS], batch.weight, batch.targets[:PAIRS])
    dpo = -F.logsigmoid(batch.beta * (seq[:PAIRS] - seq[PAIRS:])).mean()
    return dpo - batch.sft_weight * chosen_tokens.mean()


@pytest.mark.parametrize("trained", [False, True], ids=["detached", "trained"])
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_pairwise_loss_and_gradients(name, trained):
    provider = _provider(name, "aam-trained" if trained else "aam-detached")
    batch = _pair_batch(trained)
    loss = provider.pairwise_loss(batch, detach_margin=not trained)
    wrt = [batch.rewards, batch.hidden, batch.weight] if trained else [batch.rewards]
    if trained and isinstance(provider, LigerProvider):
        ref = _liger_dpo_reference(batch)
        wrt = wrt[1:]  # the DPO stand-in has no reward terms
    else:
        seq = sequence_mean(_reference_logprobs(batch.hidden, batch.weight, batch.targets), batch.targets)
        ref = aam_loss_reference(seq, batch, detach_margin=not trained)
    assert abs(float(loss) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))
    for g, w in zip(_grads(loss, wrt), _grads(ref, wrt), strict=True):
        assert _rel_err(g, w) < GRAD_TOL.get(name, 1e-4)


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_grpo_loss_and_gradients(name):
    provider = _provider(name, "grpo")
    hidden, weight, targets, gen = _inputs(4, seed=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.no_grad():
        logps = _reference_logprobs(hidden, weight, targets).float()
    noise = lambda scale: scale * torch.randn(logps.shape, generator=gen, device=DEVICE)
    batch = GRPOBatch(
        hidden,
        weight,
        targets,
        torch.randn(4, generator=gen, device=DEVICE),
        old_logps=logps + noise(0.2),
        ref_logps=logps + noise(0.3),
        epsilon=0.2,
        beta=0.04,
    )
    loss = provider.grpo_loss(batch)
    ref = grpo_loss_reference(_reference_logprobs(hidden, weight, targets), batch)
    assert abs(float(loss) - float(ref)) < 1e-4 * max(1.0, abs(float(ref)))
    for g, w in zip(_grads(loss, [hidden, weight]), _grads(ref, [hidden, weight]), strict=True):
        assert _rel_err(g, w) < GRAD_TOL.get(name, 1e-4)
