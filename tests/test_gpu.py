"""Real-shape checks on a CUDA device (skipped on CPU): Triton in bfloat16 against a float32 reference."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err

import aam_fast

pytestmark = pytest.mark.gpu


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
    errors = {
        "logp": (rel_err(logp, ref[0]), rel_err(naive[0], ref[0])),
        "d_hidden": (rel_err(h.grad, ref[1]), rel_err(naive[1], ref[1])),
        "d_weight": (rel_err(w.grad, ref[2]), rel_err(naive[2], ref[2])),
    }
    print(f"bf16 N={n} D={d} V={v}: " + ", ".join(f"{k} {a:.2e} (naive {b:.2e})" for k, (a, b) in errors.items()))
    for name, (ours, baseline) in errors.items():
        assert ours <= baseline + 1e-3, f"{name}: {ours:.3e} vs naive bf16 {baseline:.3e}"


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
    assert rel_err(a, b) <= 1e-3 and rel_err(ea, eb) <= 1e-3  # GPU float32 dots may use TF32


def test_triton_gradient_filtering_bfloat16_on_a_peaked_softmax():
    """eps = 2^-12 on a trained-model-like softmax (entropy about 2.4 nats): the filtered backward stays within 1e-2
    of the float32 reference's gradients (relative), the forward is untouched."""
    torch.manual_seed(2)
    n, d, v = 4096, 4096, 128256
    weight = (torch.randn(v, d, device="cuda") / d**0.5).bfloat16()
    hidden = (torch.randn(n, d, device="cuda") * 6.0).bfloat16()
    with torch.no_grad():
        probs = torch.softmax(hidden.float() @ weight.float().t(), dim=-1)
        targets = torch.multinomial(probs, 1).view(-1)
        del probs
    grad = torch.randn(n, device="cuda")
    ref = float32_reference(hidden, weight, targets, grad)
    results = {}
    for eps in (None, 2.0**-12):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp = aam_fast.linear_logprobs(h, w, targets, backend="triton", grad_filter_eps=eps)
        (logp * grad).sum().backward()
        results[eps] = (logp.detach(), h.grad, w.grad)
    plain, filtered = results[None], results[2.0**-12]
    assert torch.equal(plain[0], filtered[0])
    for name, i in (("d_hidden", 1), ("d_weight", 2)):
        err, base = rel_err(filtered[i], ref[i]), rel_err(plain[i], ref[i])
        print(f"filtered {name}: {err:.2e} (unfiltered {base:.2e})")
        assert err <= base + 1e-2, f"{name}: {err:.3e} vs unfiltered {base:.3e}"
