"""The Triton backward (dZ kernel per token chunk + two products) under the interpreter: chunking, determinism,
NaN propagation, float16 scaling, and the forward's grouped grid and wave-sized vocab split."""

from __future__ import annotations

import pytest
import torch
from reference import reference_logprobs, rel_err

import aam_fast
from aam_fast.ops import triton_chunks, triton_forward
from aam_fast.ops.triton_tuning import TileConfig


def inputs(n, dim, vocab, *, seed, dtype=torch.float32, ignore_every=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen) * 2.0 / dim**0.5
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    grads = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets, grads


def run(backend, hidden, weight, bias, targets, grads, *, temperature=0.8, entropy=True, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = aam_fast.linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature, return_entropy=entropy,
        backend=backend, **kwargs,
    )  # fmt: skip
    logp, ent = out if entropy else (out, None)
    loss = (logp * grads[0]).sum() + ((ent * grads[1]).sum() if entropy else 0.0)
    loss.backward()
    return [logp.detach()] + ([ent.detach()] if entropy else []) + [leaf.grad for leaf in leaves]


def reference(hidden, weight, bias, targets, grads, *, temperature=0.8, entropy=True):
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = reference_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature)
    loss = (logp * grads[0].double()).sum() + ((ent * grads[1].double()).sum() if entropy else 0.0)
    loss.backward()
    return [logp.detach()] + ([ent.detach()] if entropy else []) + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("chunk_mb", [None, "0.02"], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("entropy", [False, True])
def test_values_and_gradients_against_float64(chunk_mb, entropy, monkeypatch):
    """Odd shapes (no multiple of any tile), bias, temperature, ignored rows; in one chunk and in 16-row chunks
    (0.02 MB / (301 x 4 B) rounds down to one 16-row token block)."""
    if chunk_mb:
        monkeypatch.setenv(triton_chunks.CHUNK_ENV, chunk_mb)
    args = inputs(45, 40, 301, seed=1, ignore_every=7)
    got = run("triton", *args, entropy=entropy)
    want = reference(*args, entropy=entropy)
    for name, a, b in zip(["logp", "entropy", "hidden", "weight", "bias"][: len(got)], got, want, strict=False):
        assert rel_err(a, b) < 2e-5, name
    assert torch.all(got[-3][args[3] == -100] == 0)


def test_chunked_equals_one_chunk_and_two_runs_are_bit_equal(monkeypatch):
    args = inputs(53, 24, 157, seed=2)
    first = run("triton", *args)
    assert all(torch.equal(a, b) for a, b in zip(first, run("triton", *args), strict=True)), "not deterministic"
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "0.01")  # 16-row chunks: 53 = 3 x 16 + 5
    chunked = run("triton", *args)
    assert all(torch.equal(a, b) for a, b in zip(chunked, run("triton", *args), strict=True))
    for a, b in zip(chunked, first, strict=True):  # only d_weight's summation order differs
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("scale", [1e3, 3e-4])
def test_float16_small_and_large_upstream_keep_their_precision(scale):
    """float16 dZ is stored divided by a power-of-two bound of |dZ|: with an upstream gradient of 3e-4 the entries
    g·p (~1e-6, float16 subnormals) would lose precision if stored as they are (measured: 5.8e-4 and 6.3e-4 error
    in d_hidden and d_weight unscaled, 2.5e-4 and 3.6e-4 scaled)."""
    hidden, weight, bias, targets, _ = inputs(37, 32, 211, seed=3, dtype=torch.float16)
    grads = (torch.full((37,), scale), torch.zeros(37))
    got = run("triton", hidden, weight, bias, targets, grads, entropy=False)
    want = reference(hidden, weight, bias, targets, grads, entropy=False)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b, floor=0.0) < 4.5e-4


@pytest.mark.parametrize("where", ["hidden-row", "weight-row", "bias"])
def test_nan_propagates_like_the_torch_backend(where):
    """A NaN in one hidden row makes that row's log-prob and gradient NaN (and every d_weight row, through dZᵀh);
    a NaN in the weight or bias reaches every log-prob and every gradient: the same NaN pattern as torch's."""
    hidden, weight, bias, targets, grads = inputs(29, 16, 97, seed=4)
    if where == "hidden-row":
        hidden[5, 3] = float("nan")
    elif where == "weight-row":
        weight[40, 2] = float("nan")
    else:
        bias[11] = float("nan")
    got = run("triton", hidden, weight, bias, targets, grads)
    want = run("torch", hidden, weight, bias, targets, grads)
    for name, a, b in zip(["logp", "entropy", "hidden", "weight", "bias"], got, want, strict=True):
        assert torch.isnan(a).any(), name
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        finite = ~torch.isnan(b)
        assert torch.allclose(a[finite], b[finite], rtol=1e-4, atol=1e-5), name
    if where == "hidden-row":
        assert torch.isnan(got[2][5]).all() and not torch.isnan(got[2][6]).any()


def test_nan_is_never_filtered_away():
    hidden, weight, bias, targets, grads = inputs(29, 16, 97, seed=5)
    hidden[3, 0] = float("nan")
    got = run("triton", hidden, weight, bias, targets, grads, grad_filter_eps=0.1)
    assert torch.isnan(got[2][3]).all() and torch.isnan(got[3]).all()


def test_chunks_are_whole_token_blocks_within_the_budget(monkeypatch):
    """The dZ buffer of a chunk fits AAM_FAST_TRITON_CHUNK_MB (default 1024 MiB): at the main shape two chunks of
    4096 rows, the float32 weight-gradient accumulator (2 GiB) not fitting beside it; never below one token block."""
    row_bytes, weight_grad = 128256 * 2, 4 * 128256 * 4096
    monkeypatch.delenv(triton_chunks.CHUNK_ENV, raising=False)
    plan = triton_chunks.plan_chunks(8192, row_bytes, 128, weight_grad)
    assert plan == triton_chunks.ChunkPlan(4096, False) and plan.rows * row_bytes <= 2**30
    assert triton_chunks.plan_chunks(300, row_bytes, 128, weight_grad) == triton_chunks.ChunkPlan(300, False)
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "1")
    assert triton_chunks.plan_chunks(8192, row_bytes, 128).rows == 128
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, "600")  # a 64 MiB float32 accumulator fits in half: taken first
    plan = triton_chunks.plan_chunks(16384, 32000 * 2, 128, 4 * 32000 * 512)
    assert plan.float32_weight_grad and plan.rows * 32000 * 2 + 4 * 32000 * 512 <= 600 * 2**20


def test_vocab_split_fills_whole_waves_at_the_main_shape():
    """N = 8192, V = 128256 with 128 x 128 tiles on 132 SMs (one program each): the grid is within 3% of the work's
    lower bound (token blocks x vocab tiles / slots), and a wave is one group of 8 token blocks."""
    config = TileConfig(128, 128, 64, 8, 3, group_n=8)
    slots = 132 * config.programs_per_sm
    splits, per_split = triton_forward.vocab_split(8192, 128256, config, slots)
    token_blocks, vocab_tiles = 64, 1002
    tiles = per_split // 128
    assert splits * tiles >= vocab_tiles > (splits - 1) * tiles
    cost = -(-token_blocks * splits // slots) * tiles
    assert cost <= 1.03 * token_blocks * vocab_tiles / slots
    assert splits * config.group_n >= slots


def test_forward_grid_covers_every_tile_with_ragged_groups():
    """3 token blocks in groups of 2 (the last group short) x several splits: the 1-D grid must visit each
    (token block, split) once; any gap or overlap changes the logsumexp."""
    args = inputs(45, 40, 1001, seed=7)
    got = run("triton", *args, entropy=True)
    want = reference(*args, entropy=True)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
