"""The Triton local-loss mode (three products: logits stored once, dZ formed in place) under the interpreter: values
and the three gradients against float64, against the torch backend's local mode, chunking, float16, gradient
filtering, and that GRPOLoss with backend triton (or auto on CUDA) takes it."""

from __future__ import annotations

import pytest
import torch
from reference import reference_logprobs, rel_err
from test_triton_backward import inputs

import aam_fast
from aam_fast.ops import triton_chunks, triton_local_loss
from aam_fast.ops.backends import resolve_backend


def make_inputs(n, dim, vocab, *, seed, dtype=torch.float32, ignore_every=5):
    """The backward tests' inputs (odd sizes, bias, ignored rows), and three per-token vectors for the loss."""
    hidden, weight, bias, targets, _ = inputs(n, dim, vocab, seed=seed, dtype=dtype, ignore_every=ignore_every)
    side = torch.randn(3, n, generator=torch.Generator().manual_seed(seed + 1000))  # old, reference offsets, weights
    return hidden, weight, bias, targets, side


def token_loss_of(side, with_entropy):
    """A local token loss with the shapes of GRPO's: a ratio term, a squared distance and an entropy bonus."""
    old_offset, ref_offset, coef = side

    def token_loss(logp, entropy):
        ratio = torch.exp(logp - (logp.detach() + 0.1 * old_offset))
        loss = -(coef * ratio).sum() + 0.05 * ((logp - (logp.detach() + ref_offset)) ** 2).sum()
        if with_entropy:
            loss = loss - 0.3 * entropy.sum()
        return loss

    return token_loss


def run_local(backend, hidden, weight, bias, targets, side, *, with_entropy, temperature=0.8, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, logp, entropy = aam_fast.linear_local_loss(
        leaves[0], leaves[1], targets, token_loss_of(side, with_entropy), bias=leaves[2], temperature=temperature,
        with_entropy=with_entropy, backend=backend, **kwargs,
    )  # fmt: skip
    loss.backward()
    return [loss.detach(), logp] + ([entropy] if with_entropy else []) + [leaf.grad for leaf in leaves]


def run_reference(hidden, weight, bias, targets, side, *, with_entropy, temperature=0.8):
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, entropy = reference_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature)
    valid = targets != -100
    # the op hands the loss 0 at ignored positions, and the loss sums over every position
    loss = token_loss_of(side.double(), with_entropy)(torch.where(valid, logp, 0.0), entropy)
    loss.backward()
    return [loss.detach(), logp.detach()] + ([entropy.detach()] if with_entropy else []) + [x.grad for x in leaves]


NAMES = ["loss", "logp", "entropy", "hidden", "weight", "bias"]


@pytest.mark.parametrize("chunk_mb", [None, "0.01"], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_values_and_gradients_against_float64(chunk_mb, with_entropy, monkeypatch):
    """Ragged shapes (no multiple of any tile), bias, temperature, ignored rows; one chunk, and 16-row chunks
    (0.01 MB / (157 x 4 B) rounds down to one 16-row token block: 37 = 2 x 16 + 5)."""
    if chunk_mb:
        monkeypatch.setenv(triton_chunks.CHUNK_ENV, chunk_mb)
    args = make_inputs(37, 40, 157, seed=11)
    got = run_local("triton", *args, with_entropy=with_entropy)
    want = run_reference(*args, with_entropy=with_entropy)
    names = NAMES if with_entropy else [n for n in NAMES if n != "entropy"]
    for name, a, b in zip(names, got, want, strict=True):
        assert rel_err(a.reshape(-1), b.reshape(-1)) < 1e-4, name
    assert torch.all(got[-3][args[3] == -100] == 0), "ignored rows get no hidden gradient"


def test_equals_the_torch_local_mode_and_the_forward(monkeypatch):
    """The same loss through the torch backend's local mode (both in chunks); in one chunk the log-probs and
    entropies are bit for bit the Triton forward's (the same kernel; chunks split the vocabulary differently)."""
    args = make_inputs(53, 24, 157, seed=12, ignore_every=0)
    whole = run_local("triton", *args, with_entropy=True, temperature=1.3)
    hidden, weight, bias, targets, _ = args
    logp, entropy = aam_fast.linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=1.3, return_entropy=True, backend="triton"
    )
    assert torch.equal(whole[1], logp) and torch.equal(whole[2], entropy)
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "0.03")
    got = run_local("triton", *args, with_entropy=True, temperature=1.3)
    other = run_local("torch", *args, with_entropy=True, temperature=1.3)
    for name, a, b in zip(NAMES, got, other, strict=True):
        assert rel_err(a.reshape(-1), b.reshape(-1)) < 3e-5, name


def test_two_runs_are_bit_equal(monkeypatch):
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "0.01")
    args = make_inputs(37, 16, 99, seed=13)
    first = run_local("triton", *args, with_entropy=True)
    second = run_local("triton", *args, with_entropy=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# the interpreter casts masked lanes too (−1e30, never stored) and numpy warns that float16 overflows there
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_keeps_the_precision_of_its_inputs():
    """float16 operands: the logits are stored as z − m_tile in float16, dZ scaled by a power of two; the error is
    that of the float16 inputs' rounding (the reference sees the rounded inputs)."""
    args = make_inputs(37, 32, 211, seed=14, dtype=torch.float16)
    got = run_local("triton", *args, with_entropy=True)
    want = run_reference(*args, with_entropy=True)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(a).all() and rel_err(a.reshape(-1), b.reshape(-1)) < 2e-3, name


def test_without_parameter_gradients_it_still_computes_the_loss():
    hidden, weight, bias, targets, side = make_inputs(21, 16, 67, seed=15)
    leaf = hidden.clone().requires_grad_(True)
    loss, logp, _ = aam_fast.linear_local_loss(
        leaf, weight, targets, token_loss_of(side, False), bias=bias, backend="triton"
    )
    loss.backward()
    ref_leaf = hidden.double().requires_grad_(True)
    ref_logp, _ = reference_logprobs(ref_leaf, weight.double(), targets, bias.double())
    token_loss_of(side.double(), False)(ref_logp, None).backward()
    assert rel_err(logp, ref_logp) < 1e-5 and rel_err(leaf.grad, ref_leaf.grad) < 1e-4


def test_grpo_loss_with_backend_triton_takes_the_triton_local_mode(monkeypatch):
    """GRPOLoss on a CUDA-less machine with TRITON_INTERPRET=1 and backend="triton" runs the Triton local-loss
    entry (not forward + backward), and gives the torch backend's loss and gradients."""
    calls = []
    original = triton_local_loss.triton_local_loss

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(triton_local_loss, "triton_local_loss", spy)
    gen = torch.Generator().manual_seed(16)
    hidden, weight = torch.randn(3, 7, 24, generator=gen) * 0.3, torch.randn(131, 24, generator=gen)
    targets = torch.randint(0, 131, (3, 7), generator=gen)
    targets[:, :2] = -100
    advantages = torch.randn(3, generator=gen)
    ref = torch.randn(3, 7, generator=gen) * 0.1 - 5.0
    results = {}
    for backend in ("triton", "torch"):
        loss_fn = aam_fast.GRPOLoss(epsilon=0.2, beta=0.04, entropy_coef=0.01, backend=backend)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = loss_fn(h, w, targets, advantages, ref_logps=ref)
        out.loss.backward()
        results[backend] = (out.loss.detach(), h.grad, w.grad)
    assert len(calls) == 1, "the triton backend's local-loss entry ran once"
    for a, b in zip(results["triton"], results["torch"], strict=True):
        assert rel_err(a.reshape(-1), b.reshape(-1)) < 3e-5


def test_auto_on_cuda_resolves_to_the_triton_local_mode():
    entry = resolve_backend("auto", torch.device("cuda"))  # resolves without touching a device
    assert entry.name == "triton" and entry.local_loss is triton_local_loss.triton_local_loss


def test_chunks_fit_the_budget_at_the_main_shape(monkeypatch):
    """N = 8192, D = 4096, V = 128256 in bfloat16 with 128-row token blocks: two chunks of 4096 rows, whose dZ
    buffer fits the default 1 GiB (the tile maxima, 4096 x 2004 x 4 B at 64-column tiles, add 33 MB: 1.08 GB in all,
    under the 1.1 GB goal); d_weight then accumulates in bfloat16 (a float32 one would not fit in half the budget)."""
    monkeypatch.delenv(triton_chunks.CHUNK_ENV, raising=False)
    row_bytes = 128256 * 2
    plan = triton_chunks.plan_chunks(8192, row_bytes, 128, weight_grad_bytes=4 * 128256 * 4096)
    assert plan.rows == 4096 and not plan.float32_weight_grad
    assert plan.rows * (row_bytes + 4 * 2004) <= 1.1e9
    small = triton_chunks.plan_chunks(32768, 32000 * 2, 128, weight_grad_bytes=4 * 32000 * 1024)
    assert small.float32_weight_grad and small.rows * 32000 * 2 + 4 * 32000 * 1024 <= 2**30
