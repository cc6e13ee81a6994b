"""linear_logprobs on every CPU-runnable backend against a float64 reference: values, entropies, all gradients."""

from __future__ import annotations

import pytest
import torch
from reference import naive_logprobs, reference_logprobs, rel_err

import aam_fast
from aam_fast.ops import torch_backend

# Triton runs under TRITON_INTERPRET=1 on CPU (set in conftest); bfloat16 tl.dot is wrong there: checked on GPU.
BACKEND_DTYPES = [
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
    ("torch", torch.float16),
    ("triton", torch.float32),
    ("triton", torch.float16),
    ("native", torch.float32),
    ("native", torch.bfloat16),
    ("native", torch.float16),
]
F32_TOL = {"torch": 3e-5, "triton": 1e-4, "native": 3e-5}


@pytest.fixture
def small_tiles(monkeypatch):
    """Force the torch backend into many token chunks and vocabulary tiles, ragged at both ends."""
    monkeypatch.setattr(torch_backend, "_MAX_ROWS", 16)
    monkeypatch.setattr(torch_backend, "_MIN_TILE", 64)
    monkeypatch.setattr(torch_backend, "_TILE_BUDGET_BYTES", 2 * 4 * 16 * 128)


def make_inputs(lead, dim, vocab, dtype, *, bias, ignore_frac=0.2, seed=None, peaked=2.0):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = (torch.randn(*lead, dim, generator=gen) * peaked / dim**0.5).to(dtype)
    weight = torch.randn(vocab, dim, generator=gen).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, lead, generator=gen)
    targets[torch.rand(lead, generator=gen) < ignore_frac] = -100
    return hidden, weight, b, targets


def naive_errors(hidden, weight, targets, bias, temperature, grad_logp, ref_logp, ref_grads):
    """Errors of the materialising implementation in the inputs' dtype: the bar a fused kernel must meet."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logp = naive_logprobs(leaves[0], leaves[1], targets, leaves[2] if bias is not None else None, temperature)
    (logp * grad_logp).sum().backward()
    return rel_err(logp, ref_logp), [rel_err(leaf.grad, ref) for leaf, ref in zip(leaves, ref_grads, strict=True)]


def run_case(backend, dtype, lead, dim, vocab, *, bias, temperature, entropy):
    """Forward and every gradient against float64, within the fixed tolerance or 2x naive's own error in `dtype`.

    (float32 near-certain tokens cancel `z_y − lse` and `1 − p_y` in any implementation: naive float32 bounds how
    well a float32 kernel can do there; float16/bfloat16 allow naive's error plus 1e-3, as DESIGN.md §5.)
    """
    hidden, weight, b, targets = make_inputs(lead, dim, vocab, dtype, bias=bias)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    h, w = leaves[:2]
    bb = leaves[2] if bias else None
    out = aam_fast.linear_logprobs(
        h, w, targets, bias=bb, temperature=temperature, return_entropy=entropy, backend=backend
    )
    logp, ent = out if entropy else (out, None)
    ref_logp, ref_ent = reference_logprobs(*ref_leaves[:2], targets, ref_leaves[2] if bias else None, temperature)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert torch.all(logp[targets == -100] == 0)
    assert torch.all(logp <= 1e-4)

    grad_logp = torch.randn_like(logp)
    upstream = (logp * grad_logp).sum()
    ref_upstream = (ref_logp * grad_logp.double()).sum()
    if entropy:
        grad_ent = torch.randn_like(ent)
        upstream = upstream + (ent * grad_ent).sum()
        ref_upstream = ref_upstream + (ref_ent * grad_ent.double()).sum()
    upstream.backward()
    ref_upstream.backward()

    # naive's error on the log-prob part alone (its entropy is not part of the baseline)
    ref_logp_only = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_lp, _ = reference_logprobs(*ref_logp_only[:2], targets, ref_logp_only[2] if bias else None, temperature)
    (ref_lp * grad_logp.double()).sum().backward()
    naive_logp_err, naive_grad_errs = naive_errors(
        hidden, weight, targets, b, temperature, grad_logp, ref_lp.detach(), [t.grad for t in ref_logp_only]
    )
    if dtype == torch.float32:
        tol = max(F32_TOL[backend], 2 * naive_logp_err)
        gtols = [max(3 * F32_TOL[backend], 2 * err) for err in naive_grad_errs]
    else:
        tol = naive_logp_err + 1e-3
        gtols = [max(2e-2, err + 1e-3) for err in naive_grad_errs]
    assert rel_err(logp, ref_logp) <= tol
    if entropy:
        assert ent.dtype == torch.float32 and rel_err(ent, ref_ent) <= max(tol, 1e-4)
        assert torch.all(ent[targets == -100] == 0)
    for name, leaf, ref_leaf, gtol in zip(("hidden", "weight", "bias"), leaves, ref_leaves, gtols, strict=False):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        err = rel_err(leaf.grad, ref_leaf.grad)
        assert err <= gtol, f"{name}: {err:.3e} > {gtol:.3e}"
    assert torch.all(h.grad[targets == -100] == 0)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("bias,temperature,entropy", [(False, 1.0, False), (True, 0.7, True), (False, 1.3, True)])
def test_matches_float64_reference(backend, dtype, bias, temperature, entropy, small_tiles):
    run_case(backend, dtype, (37,), 48, 301, bias=bias, temperature=temperature, entropy=entropy)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_leading_dims_and_odd_shapes(backend, small_tiles):
    run_case(backend, torch.float32, (3, 7), 17, 1000, bias=True, temperature=1.0, entropy=True)
    run_case(backend, torch.float32, (1,), 5, 3, bias=False, temperature=0.5, entropy=False)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(48, 2 * 40, generator=gen) * 0.3
    hidden = base[:, ::2][:45].requires_grad_(False)  # strided rows and columns
    weight_t = torch.randn(40, 203, generator=gen)
    weight = weight_t.t()  # [V, D] with column-major strides
    targets = torch.randint(0, 203, (90,), generator=gen)[::2][:45]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h_nc = h + 0  # keep the leaf contiguous, feed a view
    logp = aam_fast.linear_logprobs(hidden, weight, targets, backend=backend)
    ref, _ = reference_logprobs(hidden, weight, targets)
    assert rel_err(logp, ref) <= F32_TOL[backend]
    out = aam_fast.linear_logprobs(h_nc.t().contiguous().t(), w, targets, backend=backend)
    out.sum().backward()
    rh, rw = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    reference_logprobs(rh, rw, targets)[0].sum().backward()
    assert rel_err(h.grad, rh.grad) <= 3 * F32_TOL[backend]
    assert rel_err(w.grad, rw.grad) <= 3 * F32_TOL[backend]


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    hidden = torch.randn(4, 6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((4, 6), -100)
    logp = aam_fast.linear_logprobs(hidden, weight, targets)
    assert torch.all(logp == 0)
    logp.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_forward_only_saves_nothing():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (5,))
    with torch.no_grad():
        logp = aam_fast.linear_logprobs(hidden, weight, targets)
    assert logp.grad_fn is None
    logp = aam_fast.linear_logprobs(hidden.detach(), weight.detach(), targets)
    assert logp.grad_fn is None


def test_tied_embedding_gradients_accumulate():
    """An LM head tied to the embedding receives both gradients in one parameter."""
    embedding = torch.nn.Embedding(17, 8)
    ids = torch.randint(0, 17, (2, 5))
    hidden = embedding(ids)
    logp = aam_fast.linear_logprobs(hidden[:, :-1], embedding.weight, ids[:, 1:])
    logp.sum().backward()
    ref_weight = embedding.weight.detach().double().requires_grad_(True)
    ref_hidden = torch.nn.functional.embedding(ids, ref_weight)
    reference_logprobs(ref_hidden[:, :-1], ref_weight, ids[:, 1:])[0].sum().backward()
    assert rel_err(embedding.weight.grad, ref_weight.grad) <= 1e-4


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    calls = []
    original = torch_backend.torch_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "torch_forward", spy)
    aam_fast.linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]))
    assert calls


def test_sequence_logprobs_sum_and_mean():
    token = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    targets = torch.tensor([[4, 5, -100], [-100, -100, -100]])
    assert torch.allclose(aam_fast.sequence_logprobs(token, targets, length_norm="sum"), torch.tensor([-3.0, 0.0]))
    assert torch.allclose(aam_fast.sequence_logprobs(token, targets), torch.tensor([-1.5, 0.0]))
    with pytest.raises(ValueError, match="length_norm"):
        aam_fast.sequence_logprobs(token, targets, length_norm="max")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(targets=torch.zeros(5)), "integer"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 13])), r"\[0, 13\)"),
        (dict(targets=torch.tensor([0, 1, -1, 3, 4])), "ignore_index"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), "leading shape"),
        (dict(weight=torch.randn(13, 9)), "last dim"),
        (dict(weight=torch.randn(13, 8, dtype=torch.float64)), "weight must be"),
        (dict(weight=torch.randn(13, 8).half()), "differs"),
        (dict(bias=torch.randn(12)), "bias must be"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(backend="cuda"), "backend"),
        (dict(weight=torch.randn(13, 8, device="meta")), "one device"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, match):
    args = dict(hidden=torch.randn(5, 8), weight=torch.randn(13, 8), targets=torch.randint(0, 13, (5,)))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        aam_fast.linear_logprobs(hidden, weight, targets, **args)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        aam_fast.linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), backend="triton")
