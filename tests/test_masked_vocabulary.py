"""A masked vocabulary entry (logit −inf, e.g. a bias of −inf) has probability 0: the entropy, the log-probs and
every gradient stay finite in every backend (0·(−inf) never reaches a sum), and equal the float64 reference."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err

import aam_fast
from aam_fast.ops import native_backend, torch_backend

BACKENDS = ["torch", "triton"] + (["native"] if native_backend.native_available() else [])


def masked_reference(hidden, weight, bias, targets, temperature):
    """float64 log-probs and entropies with `p log p` taken as 0 where the logit is −inf. Differentiable."""
    z = (hidden @ weight.t() + bias) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    masked = torch.isinf(z.detach())
    entropy = -(log_p.exp() * log_p.masked_fill(masked, 0.0)).sum(-1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), entropy


def masked_inputs(n=23, dim=16, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen) * 0.5
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    bias[:40] = -float("inf")  # a masked head longer than a small tile: some tiles are all −inf
    bias[71] = bias[90] = -float("inf")
    allowed = torch.tensor([v for v in range(vocab) if torch.isfinite(bias[v])])
    targets = allowed[torch.randint(0, allowed.numel(), (n,), generator=gen)]
    return hidden, weight, bias, targets, torch.randn(2, n, generator=gen)


@pytest.fixture
def small_torch_tiles(monkeypatch):
    """32-column tiles for the torch backend, so its first vocabulary tiles are wholly masked."""
    monkeypatch.setattr(torch_backend, "_MIN_TILE", 32)
    monkeypatch.setattr(torch_backend, "_TILE_BUDGET_BYTES", 2 * 4 * 23 * 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_with_masked_entries(backend, small_torch_tiles):
    hidden, weight, bias, targets, upstream = masked_inputs()
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    logp, entropy = aam_fast.linear_logprobs(
        leaves[0], leaves[1], targets, bias=bias, temperature=0.9, return_entropy=True, backend=backend
    )
    ((logp * upstream[0]).sum() + (entropy * upstream[1]).sum()).backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight)]
    ref_logp, ref_entropy = masked_reference(*ref_leaves, bias.double(), targets, 0.9)
    ((ref_logp * upstream[0].double()).sum() + (ref_entropy * upstream[1].double()).sum()).backward()
    got = [logp, entropy, leaves[0].grad, leaves[1].grad]
    want = [ref_logp, ref_entropy, ref_leaves[0].grad, ref_leaves[1].grad]
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight"], got, want, strict=True):
        assert torch.isfinite(a).all(), f"{backend}: {name} is not finite"
        assert rel_err(a, b) < 1e-4, f"{backend}: {name}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_local_loss_with_masked_entries(backend, small_torch_tiles):
    hidden, weight, bias, targets, upstream = masked_inputs(seed=1)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]

    def token_loss(logp, entropy):
        return (logp * upstream[0]).sum() + (entropy * upstream[1]).sum()

    loss, _, entropy = aam_fast.linear_local_loss(
        leaves[0], leaves[1], targets, token_loss, bias=bias, with_entropy=True, backend=backend
    )
    loss.backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight)]
    ref_logp, ref_entropy = masked_reference(*ref_leaves, bias.double(), targets, 1.0)
    token_loss(ref_logp, ref_entropy).backward()
    for name, a, b in zip(
        ["entropy", "d_hidden", "d_weight"],
        [entropy, *(x.grad for x in leaves)],
        [ref_entropy, *(x.grad for x in ref_leaves)],
        strict=True,
    ):
        assert torch.isfinite(a).all(), f"{backend}: {name} is not finite"
        assert rel_err(a, b) < 1e-4, f"{backend}: {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_logit_still_reaches_the_entropy(backend):
    """The masking must not hide a NaN: a NaN in the bias gives NaN entropies, as a materialised softmax does."""
    hidden, weight, bias, targets, _ = masked_inputs(seed=2)
    bias[50] = float("nan")
    _, entropy = aam_fast.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    assert torch.isnan(entropy).all()
