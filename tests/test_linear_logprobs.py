"""linear_logprobs on every CPU-runnable backend against a float64 reference: values, entropies, all gradients."""

from __future__ import annotations

import inspect

import pytest
import torch
from reference import naive_logprobs, reference_logprobs, rel_err

import aam_fast
from aam_fast.ops import IGNORE_INDEX, LogprobParams, native_backend, torch_backend
from aam_fast.ops.backends import Backend, resolve_backend

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
    well a float32 kernel can do there; float16/bfloat16 allow naive's error plus 1e-3, as docs/design.md §2.8.)
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
        if dtype == torch.float32:  # within 2x naive float32's own entropy error (or the backend's fixed bar)
            _, naive_ent = naive_logprobs(hidden, weight, targets, b, temperature, with_entropy=True)
            ent_tol = max(F32_TOL[backend], 2 * rel_err(naive_ent, ref_ent))
        else:
            ent_tol = max(tol, 1e-4)
        assert ent.dtype == torch.float32 and rel_err(ent, ref_ent) <= ent_tol
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
        (dict(weight=torch.randn(13, 8, device="meta")), "weight is on the meta device"),
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


def test_hidden_size_zero_is_refused_by_name():
    with pytest.raises(ValueError, match="hidden size D"):
        aam_fast.linear_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0, 1, 2]))


def _available_backends():
    names = ["torch", "triton"]
    if native_backend.native_available():
        names.append("native")
    return names


def test_backends_declare_their_entries():
    """The local-loss mode and gradient filtering are entries of the Backend, not checks of its name."""
    cpu = torch.device("cpu")
    torch_entry = resolve_backend("torch", cpu)
    assert torch_entry.local_loss is not None and torch_entry.grad_filter
    triton_entry = resolve_backend("triton", cpu)  # under the interpreter (conftest)
    assert triton_entry.local_loss is not None and triton_entry.grad_filter
    if native_backend.native_available():
        native_entry = resolve_backend("native", cpu)
        assert native_entry.local_loss is None and not native_entry.grad_filter


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, True), (False, True, False)])
def test_backend_contract_with_params_and_needs(backend, needs):
    """forward(h, W, b, y, params) and backward(..., params, needs) called directly: values, and None where the
    matching flag of `needs` is off."""
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(11, 12, generator=gen) * 0.5, torch.randn(37, 12, generator=gen)
    bias = torch.randn(37, generator=gen)
    targets = torch.randint(0, 37, (11,), generator=gen)
    entry = resolve_backend(backend, torch.device("cpu"))
    params = LogprobParams(backend=entry, inv_temperature=1 / 0.9, ignore_index=IGNORE_INDEX, with_entropy=True)
    lse, target_logit, mean_z = entry.forward(hidden, weight, bias, targets, params)
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_logp, ref_entropy = reference_logprobs(*leaves[:2], targets, leaves[2], 0.9)
    assert rel_err(target_logit.double() - lse.double(), ref_logp) <= 1e-4
    assert rel_err(lse.double() - mean_z.double(), ref_entropy) <= 1e-4
    grad_logp, grad_entropy = torch.randn(11, generator=gen), torch.randn(11, generator=gen)
    grads = entry.backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params, needs)
    ((ref_logp * grad_logp.double()).sum() + (ref_entropy * grad_entropy.double()).sum()).backward()
    for name, grad, leaf, need in zip(("hidden", "weight", "bias"), grads, leaves, needs, strict=True):
        if not need:
            assert grad is None, name
        else:
            assert rel_err(grad, leaf.grad) <= 3e-4, name


def test_local_loss_takes_the_backend_entry_or_falls_back(monkeypatch):
    """`linear_local_loss` calls the resolved backend's `local_loss` entry (whatever its name), and a backend
    without one gets forward, token gradients, then backward: the same values either way."""
    import importlib

    op_module = importlib.import_module("aam_fast.ops.linear_logprobs")  # the module, not the function it exports
    torch_entry = resolve_backend("torch", torch.device("cpu"))
    calls = []

    def spy(*args):
        calls.append(args[5])
        return torch_entry.local_loss(*args)

    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 9, 16, generator=gen) * 0.5, torch.randn(53, 16, generator=gen)
    targets = torch.randint(0, 53, (2, 9), generator=gen)
    targets[:, :2] = IGNORE_INDEX
    coef = torch.randn(2, 9, generator=gen)

    def token_loss(logp, entropy):
        return (coef * logp).sum() + 0.3 * entropy.sum()

    results = {}
    for label, entry in (
        ("entry", Backend("custom", torch_entry.forward, torch_entry.backward, local_loss=spy)),
        ("fallback", Backend("torch", torch_entry.forward, torch_entry.backward)),
    ):
        monkeypatch.setattr(op_module, "resolve_backend", lambda name, device, entry=entry: entry)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, logp, entropy = aam_fast.linear_local_loss(h, w, targets, token_loss, with_entropy=True)
        loss.backward()
        results[label] = (loss.detach(), logp, entropy, h.grad, w.grad)
    assert len(calls) == 1 and calls[0].backend.name == "custom"
    ref_h, ref_w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = reference_logprobs(ref_h, ref_w, targets)
    ref_loss = (coef.double() * ref_logp).sum() + 0.3 * ref_entropy.sum()
    ref_loss.backward()
    for label, (loss, logp, entropy, grad_h, grad_w) in results.items():
        assert abs(loss.item() - ref_loss.item()) <= 1e-4 * max(1.0, abs(ref_loss.item())), label
        assert rel_err(logp, ref_logp) <= 3e-5 and rel_err(entropy, ref_entropy) <= 3e-5, label
        assert rel_err(grad_h, ref_h.grad) <= 1e-4 and rel_err(grad_w, ref_w.grad) <= 1e-4, label


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_local_loss_widens_a_low_precision_weight_slab_by_slab(dtype, monkeypatch):
    """The torch local-loss entry takes bfloat16/float16 weights, widened to float32 `_SLAB` rows at a time."""
    from aam_fast.ops import torch_chunked

    monkeypatch.setattr(torch_chunked, "_SLAB", 64)  # 301 rows: five slabs, the last ragged
    monkeypatch.setattr(torch_chunked, "_CHUNK_BUDGET_BYTES", 2 * 4 * 301 * 7)  # 7-row chunks
    gen = torch.Generator().manual_seed(9)
    hidden = (torch.randn(3, 8, 24, generator=gen) * 0.5).to(dtype)
    weight, bias = torch.randn(301, 24, generator=gen).to(dtype), torch.randn(301, generator=gen).to(dtype)
    targets = torch.randint(0, 301, (3, 8), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    coef = torch.randn(3, 8, generator=gen)

    def token_loss(logp, entropy):
        return (coef * logp).sum() - 0.2 * entropy.sum()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, logp, entropy = aam_fast.linear_local_loss(
        leaves[0], leaves[1], targets, token_loss, bias=leaves[2], temperature=0.9, with_entropy=True, backend="torch"
    )
    loss.backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_logp, ref_entropy = reference_logprobs(ref_leaves[0], ref_leaves[1], targets, ref_leaves[2], 0.9)
    token_loss(ref_logp, ref_entropy).backward()
    # float32 arithmetic on the low-precision inputs: only the final cast of each gradient rounds
    assert rel_err(logp, ref_logp) <= 1e-5 and rel_err(entropy, ref_entropy) <= 1e-5
    for leaf, ref in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad.dtype == dtype and rel_err(leaf.grad, ref.grad) <= 8e-3


def test_ops_import_nothing_outside_ops():
    """`aam_fast.ops` depends on torch (and triton) only: no import of the package root or of a sibling module."""
    import ast
    from pathlib import Path

    folder = Path(aam_fast.ops.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: from {'.' * node.level}{node.module} leaves ops"
                assert node.level == 1 or not (node.module or "").startswith("aam_fast"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("aam_fast") for alias in node.names), path.name


def test_one_ignore_index():
    from aam_fast import losses

    assert losses.IGNORE_INDEX is IGNORE_INDEX == aam_fast.IGNORE_INDEX == -100
    assert inspect.signature(aam_fast.linear_logprobs).parameters["ignore_index"].default == IGNORE_INDEX
    assert inspect.signature(aam_fast.grpo_loss).parameters["ignore_index"].default == IGNORE_INDEX


def test_sequence_logprobs_never_reads_ignored_positions():
    token = torch.tensor([[-1.0, float("nan"), -3.0], [float("-inf"), -0.5, float("nan")]], requires_grad=True)
    targets = torch.tensor([[4, -100, 5], [-100, 2, -100]])
    out = aam_fast.sequence_logprobs(token, targets)
    assert torch.equal(out, torch.tensor([-2.0, -0.5]))
    out.sum().backward()
    assert torch.isfinite(token.grad).all()
