"""Gradient filtering (`grad_filter_eps`): what it may drop, that it drops it, and that off means exact."""

from __future__ import annotations

import pytest
import torch
from reference import reference_logprobs

import aam_fast
from aam_fast.ops import grad_filter, linear_local_loss, torch_backend, torch_chunked, triton_chunks

FILTER_BACKENDS = ["torch", "triton"]


def peaked_inputs(n, dim, vocab, *, scale, seed, ignore_frac=0.2, bias=True):
    """Logits like a trained model's: spread `scale` around a Zipf-like prior `−3 log(1 + v)` (in the bias, or in
    the hidden states through a shared direction), so most probabilities are tiny, and tiny for every token in
    the vocabulary's tail."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen) * scale / dim**0.5
    weight = torch.randn(vocab, dim, generator=gen)
    prior = -3.0 * torch.log1p(torch.arange(vocab, dtype=torch.float32))
    if bias:
        b = torch.randn(vocab, generator=gen) + prior
    else:
        b = None
        weight[:, 0] = prior
        hidden[:, 0] = 1.0
    probs = torch.softmax(hidden @ weight.t() + (b if bias else 0.0), dim=-1)
    targets = torch.multinomial(probs, 1, generator=gen).view(-1)  # sampled: the target is usually likely
    targets[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hidden, weight, b, targets


def dropped_bounds(hidden, weight, bias, targets, temperature, grad_logp, grad_entropy, eps):
    """Per-row bounds on what filtering may change in `(d_hidden, d_weight, d_bias)`, in float64.

    Filtering may drop any off-target entry of `dz` with `p < eps`; dropping a set of entries changes row t of
    `d_hidden` by at most `Σ_dropped |dz_tv| ‖W_v‖`, row v of `d_weight` by `Σ_dropped |dz_tv| ‖h_t‖` and
    `d_bias_v` by `Σ_dropped |dz_tv|`; the bounds sum over every droppable entry.
    """
    h, w = hidden.double(), weight.double()
    z = h @ w.t() + (bias.double() if bias is not None else 0.0)
    z = z / temperature
    p = torch.softmax(z, dim=-1)
    valid = targets != -100
    dz = -grad_logp.double()[:, None] * p
    if grad_entropy is not None:
        mean_z = (p * z).sum(-1, keepdim=True)
        dz = dz + grad_entropy.double()[:, None] * p * (mean_z - z)
    droppable = (p < eps) & valid[:, None]
    droppable[valid.nonzero().view(-1), targets[valid]] = False
    size = (dz.abs() * droppable) / temperature
    return size @ w.norm(dim=1), size.t() @ h.norm(dim=1), size.sum(0)


def gradients(backend, hidden, weight, bias, targets, temperature, grad_logp, grad_entropy, eps):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = aam_fast.linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
        return_entropy=grad_entropy is not None, backend=backend, grad_filter_eps=eps,
    )  # fmt: skip
    logp, ent = out if grad_entropy is not None else (out, None)
    loss = (logp * grad_logp).sum() + ((ent * grad_entropy).sum() if ent is not None else 0.0)
    loss.backward()
    return logp.detach(), [leaf.grad for leaf in leaves]


def reference_gradients(hidden, weight, bias, targets, temperature, grad_logp, grad_entropy):
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = reference_logprobs(*leaves[:2], targets, leaves[2], temperature)
    loss = (logp * grad_logp.double()).sum()
    if grad_entropy is not None:
        loss = loss + (ent * grad_entropy.double()).sum()
    loss.backward()
    return [leaf.grad for leaf in leaves]


@pytest.fixture
def sparse_torch_tiles(monkeypatch):
    """Ragged torch-backend tiles (13 rows x 64 columns), small enough that peaked tiles go sparse; 16-row token
    chunks for the Triton backward (which skips a vocab block only where no token of the chunk finds it likely)."""
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "0.02")  # 0.02 MB / (301 x 4 B) -> 16 rows
    monkeypatch.setattr(torch_backend, "_MAX_ROWS", 13)
    monkeypatch.setattr(torch_backend, "_MIN_TILE", 64)
    monkeypatch.setattr(torch_backend, "_TILE_BUDGET_BYTES", 2 * 4 * 13 * 64)


@pytest.mark.parametrize("backend", FILTER_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_filtered_gradients_stay_within_the_dropped_mass(backend, entropy, sparse_torch_tiles):
    n, dim, vocab, temperature, eps = 45, 24, 301, 0.8, 1e-3
    seed = torch.seed() % 2**31
    hidden, weight, bias, targets = peaked_inputs(n, dim, vocab, scale=4.0, seed=seed)
    grad_logp = torch.randn(n)
    grad_entropy = torch.randn(n) if entropy else None
    args = (hidden, weight, bias, targets, temperature, grad_logp, grad_entropy)
    logp, filtered = gradients(backend, *args, eps)
    logp_off, exact = gradients(backend, *args, None)
    reference = reference_gradients(*args)
    bounds = dropped_bounds(*args, eps)

    assert torch.equal(logp, logp_off), "filtering must not touch the forward pass"
    assert float(bounds[0].sum()) > 0, "the inputs must give the filter something to drop"
    for got, off, ref, bound in zip(filtered, exact, reference, bounds, strict=True):
        base_err = (off.double() - ref).abs().max().item()  # the backend's own rounding, unfiltered
        rows_err = (got.double() - ref).reshape(ref.shape[0], -1).norm(dim=1)
        assert torch.all(rows_err <= bound + 10 * base_err + 1e-6), f"seed {seed}"
    assert torch.all(filtered[0][targets == -100] == 0)
    assert any(not torch.equal(got, off) for got, off in zip(filtered, exact, strict=True)), (
        f"seed {seed}: nothing was filtered"
    )
    if backend == "triton":
        assert triton_chunks.last_filter_stats["skipped"] > 0, f"seed {seed}"


@pytest.mark.parametrize("backend", FILTER_BACKENDS)
def test_zero_eps_is_exactly_the_unfiltered_op(backend):
    hidden, weight, bias, targets = peaked_inputs(37, 16, 157, scale=8.0, seed=3)
    grad_logp = torch.randn(37)
    args = (hidden, weight, bias, targets, 1.0, grad_logp, None)
    _, zero = gradients(backend, *args, 0.0)
    _, off = gradients(backend, *args, None)
    for a, b in zip(zero, off, strict=True):
        assert torch.equal(a, b)


def test_filtered_returns_csr_only_where_sparse_pays():
    tile = torch.rand(40, 50)
    sparse_keep = torch.rand(40, 50) < 0.03
    out = grad_filter.filtered(tile, sparse_keep)
    assert out.layout == torch.sparse_csr
    assert torch.equal(out.to_dense(), torch.where(sparse_keep, tile, 0.0))
    w, h, g = torch.randn(50, 7), torch.randn(40, 7), torch.randn(40)
    masked = torch.where(sparse_keep, tile, 0.0)
    torch.testing.assert_close(torch.zeros(40, 7).addmm_(out, w), masked @ w)
    torch.testing.assert_close(torch.zeros(50, 7).addmm_(out.t(), h), masked.t() @ h)
    torch.testing.assert_close(torch.mv(out.t(), g), masked.t() @ g)
    dense_keep = torch.rand(40, 50) < 0.5
    assert grad_filter.filtered(tile, dense_keep) is tile


@pytest.mark.parametrize("backend", FILTER_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_local_loss_chunks_filter_within_the_dropped_mass(backend, entropy, monkeypatch):
    """The three-product local-loss mode (GRPO) filters each row chunk: the torch backend's sparse tiles, the
    Triton mode's vocab blocks that no row of a 16-row chunk finds likely."""
    monkeypatch.setattr(torch_chunked, "_CHUNK_BUDGET_BYTES", 2 * 4 * 301 * 11)  # 11-row chunks
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "0.02")  # 0.02 MB / (301 x 4 B) -> 16 rows
    n, dim, vocab, eps = 40, 24, 301, 1e-3
    hidden, weight, bias, targets = peaked_inputs(n, dim, vocab, scale=4.0, seed=torch.seed() % 2**31)
    coef = torch.randn(n)
    coef_h = torch.randn(n) if entropy else None

    def token_loss(logp, ent):
        return (coef * logp).sum() + ((coef_h * ent).sum() if ent is not None else 0.0)

    def grads(eps_value):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss, _, _ = linear_local_loss(
            leaves[0], leaves[1], targets, token_loss, bias=leaves[2], with_entropy=entropy, backend=backend,
            grad_filter_eps=eps_value,
        )  # fmt: skip
        loss.backward()
        return [leaf.grad for leaf in leaves]

    filtered, exact = grads(eps), grads(None)
    reference = reference_gradients(hidden, weight, bias, targets, 1.0, coef, coef_h)
    bounds = dropped_bounds(hidden, weight, bias, targets, 1.0, coef, coef_h, eps)
    for got, off, ref, bound in zip(filtered, exact, reference, bounds, strict=True):
        base_err = (off.double() - ref).abs().max().item()
        rows_err = (got.double() - ref).reshape(ref.shape[0], -1).norm(dim=1)
        assert torch.all(rows_err <= bound + 10 * base_err + 1e-6)
    assert not torch.equal(filtered[1], exact[1]), "nothing was filtered"
    if backend == "triton":
        assert triton_chunks.last_filter_stats["skipped"] > 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "2e-4", True])
def test_bad_grad_filter_eps_is_refused_by_name(bad):
    hidden, weight, _, targets = peaked_inputs(4, 8, 16, scale=1.0, seed=0, bias=False)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        aam_fast.linear_logprobs(hidden, weight, targets, backend="torch", grad_filter_eps=bad)


def test_native_backend_refuses_filtering_before_any_work():
    hidden, weight, _, targets = peaked_inputs(4, 8, 16, scale=1.0, seed=0, bias=False)
    with pytest.raises(ValueError, match="grad_filter_eps is not implemented by backend='native'"):
        aam_fast.linear_logprobs(hidden, weight, targets, backend="native", grad_filter_eps=1e-4)


@pytest.mark.parametrize("loss_name", ["aam", "grpo"])
def test_losses_pass_the_threshold_to_the_op(loss_name):
    """AAMLoss (trained-through margin) and GRPOLoss filter their backward; their loss values do not change."""
    pairs, seq, dim, vocab = 3, 7, 16, 211
    hidden, weight, _, targets = peaked_inputs(2 * pairs * seq, dim, vocab, scale=4.0, seed=11, bias=False)
    hidden, targets = hidden.view(2 * pairs, seq, dim), targets.view(2 * pairs, seq)

    def run(eps):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if loss_name == "aam":
            rewards = torch.linspace(-1.0, 1.0, 2 * pairs)
            module = aam_fast.AAMLoss(margin="ld", detach_margin=False, backend="torch", grad_filter_eps=eps)
            loss = module(h, w, targets, rewards).loss
        else:
            module = aam_fast.GRPOLoss(beta=0.0, backend="torch", grad_filter_eps=eps)
            loss = module(h, w, targets, torch.linspace(-1.0, 1.0, 2 * pairs)).loss
        loss.backward()
        return loss.detach(), w.grad

    (loss_on, grad_on), (loss_off, grad_off) = run(0.01), run(None)
    assert torch.equal(loss_on, loss_off)
    assert not torch.equal(grad_on, grad_off)  # the bound itself is checked op by op above
    assert (grad_on - grad_off).norm() < 0.2 * grad_off.norm()
    with pytest.raises(ValueError, match="grad_filter_eps"):
        run(2.0)
