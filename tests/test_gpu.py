"""Real-shape checks on a CUDA device (skipped on CPU): Triton in bfloat16 against a float32 reference.

Every error figure is printed and, where `AAM_FAST_GPU_ERRORS` names a file (as `bench/gpu_check.sh` does), appended
to it as one JSON line per test, so a passing run still shows its numbers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from reference import rel_err

import aam_fast
from aam_fast.ops import triton_chunks

pytestmark = pytest.mark.gpu
ERRORS_ENV = "AAM_FAST_GPU_ERRORS"


def record(test: str, **figures) -> None:
    """Print the figures and append them as a JSON line to $AAM_FAST_GPU_ERRORS (when set)."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get(ERRORS_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(line + "\n")


def float32_reference(hidden, weight, targets, grad):
    """Materialised float32 logits on the GPU (fits at these shapes); gradients by autograd."""
    h = hidden.detach().float().requires_grad_(True)
    w = weight.detach().float().requires_grad_(True)
    log_p = torch.log_softmax(h @ w.t(), dim=-1)
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    (logp * grad).sum().backward()
    return logp.detach(), h.grad, w.grad


def naive_same_dtype(hidden, weight, targets, grad):
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    log_p = torch.log_softmax((h @ w.t()).float(), dim=-1)
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    (logp * grad).sum().backward()
    return logp.detach(), h.grad, w.grad


def check_against_naive(test: str, ours, ref, naive) -> None:
    """Record the relative errors of `(logp, d_hidden, d_weight)` and naive bf16's against the float32 reference;
    each of ours at most naive's + 1e-3."""
    names = ("logp", "d_hidden", "d_weight")
    errors = {k: (rel_err(a, r), rel_err(b, r)) for k, a, b, r in zip(names, ours, naive, ref, strict=True)}
    record(test, **{k: a for k, (a, _) in errors.items()}, **{f"naive_{k}": b for k, (_, b) in errors.items()})
    for name, (mine, baseline) in errors.items():
        assert mine <= baseline + 1e-3, f"{name}: {mine:.3e} vs naive bf16 {baseline:.3e}"


@pytest.mark.parametrize("n,d,v", [(4096, 4096, 128256), (1031, 1000, 32003)])
def test_triton_bfloat16_real_shape(n, d, v):
    torch.manual_seed(0)
    device = "cuda"
    hidden = (torch.randn(n, d, device=device) * 2.0 / d**0.5).bfloat16()
    weight = (torch.randn(v, d, device=device) * 1.0).bfloat16()
    targets = torch.randint(0, v, (n,), device=device)
    grad = torch.randn(n, device=device)
    ref = float32_reference(hidden, weight, targets, grad)
    naive = naive_same_dtype(hidden, weight, targets, grad)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = aam_fast.linear_logprobs(h, w, targets, backend="triton")
    (logp * grad).sum().backward()
    check_against_naive(f"triton_bfloat16_real_shape[N={n},D={d},V={v}]", (logp, h.grad, w.grad), ref, naive)


def test_triton_float32_matches_torch_backend_on_gpu():
    torch.manual_seed(1)
    hidden = torch.randn(777, 513, device="cuda") * 0.1
    weight = torch.randn(5003, 513, device="cuda")
    bias = torch.randn(5003, device="cuda")
    targets = torch.randint(0, 5003, (777,), device="cuda")
    targets[::7] = -100
    a, ea = aam_fast.linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True, backend="triton"
    )
    b, eb = aam_fast.linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True, backend="torch"
    )
    errors = {"logp": rel_err(a, b), "entropy": rel_err(ea, eb)}
    record("triton_float32_matches_torch_backend", **errors)
    assert max(errors.values()) <= 1e-3  # GPU float32 dots may use TF32


def test_triton_backward_is_deterministic_and_chunking_changes_little(monkeypatch):
    """Two runs are bit-equal (no atomics); 4 chunks instead of 1 change the gradients by summation order only."""
    torch.manual_seed(3)
    n, d, v = 2048, 1024, 50257
    hidden = (torch.randn(n, d, device="cuda") * 4.0 / d**0.5).bfloat16()
    weight = (torch.randn(v, d, device="cuda")).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    grad = torch.randn(n, device="cuda")

    def grads():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        (aam_fast.linear_logprobs(h, w, targets, backend="triton") * grad).sum().backward()
        return h.grad, w.grad

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    monkeypatch.setenv(triton_chunks.CHUNK_ENV, str(512 * v * 2 / 2**20))  # 512-row chunks
    chunked = grads()
    errors = {"d_hidden": rel_err(chunked[0], first[0]), "d_weight": rel_err(chunked[1], first[1])}
    record("triton_chunked_vs_one_chunk", **errors)
    assert max(errors.values()) < 1e-2  # other chunk shapes may pick other tiles and cuBLAS algorithms


def test_triton_gradient_filtering_skips_the_rare_token_tail():
    """eps = 2^-12 on a head with a rare-token tail: logits N(0, 3²) around a Zipf prior −2·log(1 + v) in the bias
    (entropy ≈ 1.6 nats; the tail unlikely in every context). Whole 128-column vocab blocks of the 4096-token chunk
    then hold no probability ≥ eps (≈ 80% of them, simulated on CPU): the filter must skip some (the test fails if
    nothing is skipped), the filtered gradients stay within 1e-2 of the float32 reference's (relative), the forward
    is untouched.

    A head without such a tail (the benchmark's: logits N(0, 6²), no prior, every column likely for a few tokens of
    the chunk) leaves nothing to skip at GPU tile sizes; the README says so."""
    torch.manual_seed(2)
    n, d, v = 4096, 4096, 128256
    weight = (torch.randn(v, d, device="cuda") / d**0.5).bfloat16()
    hidden = (torch.randn(n, d, device="cuda") * 3.0).bfloat16()
    bias = (-2.0 * torch.log1p(torch.arange(v, device="cuda", dtype=torch.float32))).bfloat16()
    with torch.no_grad():
        probs = torch.softmax(hidden.float() @ weight.float().t() + bias.float(), dim=-1)
        targets = torch.multinomial(probs, 1).view(-1)
        del probs
    grad = torch.randn(n, device="cuda")
    h32, w32 = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    logp32 = torch.log_softmax(h32 @ w32.t() + bias.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    (logp32 * grad).sum().backward()
    ref = (logp32.detach(), h32.grad, w32.grad)
    del h32, w32, logp32
    results = {}
    for eps in (None, 2.0**-12):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp = aam_fast.linear_logprobs(h, w, targets, bias=bias, backend="triton", grad_filter_eps=eps)
        (logp * grad).sum().backward()
        results[eps] = (logp.detach(), h.grad, w.grad)
    stats = dict(triton_chunks.last_filter_stats)
    plain, filtered = results[None], results[2.0**-12]
    assert torch.equal(plain[0], filtered[0])
    figures = {"skipped_blocks": stats["skipped"], "blocks": stats["blocks"]}
    for name, i in (("d_hidden", 1), ("d_weight", 2)):
        figures[name] = rel_err(filtered[i], ref[i])
        figures[f"unfiltered_{name}"] = rel_err(plain[i], ref[i])
    record("triton_gradient_filtering_rare_tail", **figures)
    assert stats["skipped"] > 0, f"nothing skipped: {stats}"
    for name in ("d_hidden", "d_weight"):
        assert figures[name] <= figures[f"unfiltered_{name}"] + 1e-2, name


@pytest.mark.parametrize("n,d,v", [(8192, 4096, 128256), (1031, 1000, 32003)])
def test_triton_local_loss_bfloat16_real_shape(n, d, v):
    """The local-loss mode (logits stored once as z − m_tile in float16, dZ in place; at the main shape two chunks
    with d_weight accumulated in bfloat16) on `Σ g·logp`: each error at most naive bfloat16's + 1e-3."""
    torch.manual_seed(4)
    hidden = (torch.randn(n, d, device="cuda") * 2.0 / d**0.5).bfloat16()
    weight = torch.randn(v, d, device="cuda").bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    grad = torch.randn(n, device="cuda")
    ref = float32_reference(hidden, weight, targets, grad)
    naive = naive_same_dtype(hidden, weight, targets, grad)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, logp, _ = aam_fast.linear_local_loss(h, w, targets, lambda lp, _: (lp * grad).sum(), backend="triton")
    loss.backward()
    check_against_naive(f"triton_local_loss_bfloat16[N={n},D={d},V={v}]", (logp, h.grad, w.grad), ref, naive)


def test_grpo_loss_on_triton_matches_the_float32_torch_backend():
    """GRPO's token loss at the main shape (8 completions of 1024 tokens, V = 128256, D = 4096) in bfloat16 through
    the Triton local-loss mode, against the torch backend on the same inputs widened to float32."""
    torch.manual_seed(5)
    b, t, d, v = 8, 1024, 4096, 128256
    hidden = (torch.randn(b, t, d, device="cuda") * 2.0 / d**0.5).bfloat16()
    weight = torch.randn(v, d, device="cuda").bfloat16()
    targets = torch.randint(0, v, (b, t), device="cuda")
    targets[:, :100] = -100
    advantages = torch.randn(b, device="cuda")
    ref_logps = torch.full((b, t), -12.0, device="cuda") + torch.randn(b, t, device="cuda") * 0.1
    results = {}
    for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        out = aam_fast.grpo_loss(h, w, targets, advantages, ref_logps=ref_logps, beta=0.04, backend=backend)
        out.loss.backward()
        results[backend] = (out.loss.detach().reshape(1), out.logps, h.grad, w.grad)
        del h, w, out
    names = ("loss", "logps", "d_hidden", "d_weight")
    pairs = zip(names, results["triton"], results["torch"], strict=True)
    errors = {name: rel_err(a.float(), b.float()) for name, a, b in pairs}
    record("grpo_triton_local_vs_float32_torch", **errors)
    assert errors["loss"] <= 1e-3 and errors["logps"] <= 1e-3
    assert errors["d_hidden"] <= 1e-2 and errors["d_weight"] <= 1e-2
