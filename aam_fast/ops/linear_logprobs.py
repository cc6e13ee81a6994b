"""`linear_logprobs`: token log-probs (and entropies) straight from hidden states and the LM-head weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .backends import Backend, resolve_backend
from .validation import check_grad_filter_eps, check_linear_logprobs_inputs


@dataclass(frozen=True)
class LogprobParams:
    """Everything but the tensors: the same for forward and backward."""

    backend: Backend
    inv_temperature: float
    ignore_index: int
    with_entropy: bool
    grad_filter_eps: float = 0.0


def logprob_params(
    device: torch.device,
    backend: str,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    grad_filter_eps: float | None,
) -> LogprobParams:
    """Checked `LogprobParams` for tensors on `device` (ValueError naming the argument that does not fit)."""
    resolved = resolve_backend(backend, device)
    eps = check_grad_filter_eps(grad_filter_eps)
    if eps > 0.0 and resolved.name == "native":
        raise ValueError("grad_filter_eps is not implemented by backend='native'; use backend='torch' or 'triton'")
    return LogprobParams(
        backend=resolved,
        inv_temperature=1.0 / float(temperature),
        ignore_index=int(ignore_index),
        with_entropy=bool(with_entropy),
        grad_filter_eps=eps,
    )


def valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows to compute, or None when every row counts (no copy needed)."""
    keep = targets != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().view(-1)


def unit_inner_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its last dim is unit-strided (vectorised loads, fast GEMMs), else a contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def logprob_forward(hidden2d, weight, bias, targets1d, params: LogprobParams):
    """Forward on flat inputs: `(logp [N], entropy [N] or None, saved)` where `saved` feeds `logprob_backward`.

    Ignored rows are dropped before the backend runs (prompt tokens cost nothing) and get 0 log-prob and entropy.
    """
    rows = valid_rows(targets1d, params.ignore_index)
    h = hidden2d if rows is None else hidden2d.index_select(0, rows)
    y = targets1d if rows is None else targets1d.index_select(0, rows)
    if params.backend.name == "triton":  # the (hidden, weight, bias, targets, params) contract
        lse, target_logit, mean_z = params.backend.forward(h, weight, bias, y, params)
    else:
        lse, target_logit, mean_z = params.backend.forward(
            h, weight, bias, y, inv_temperature=params.inv_temperature, with_entropy=params.with_entropy
        )
    # a backend may keep lse in float64 so that z_y − lse cancels exactly for near-certain tokens
    logp_rows = (target_logit.to(lse.dtype) - lse).float()
    entropy_rows = (lse - mean_z.to(lse.dtype)).float() if params.with_entropy else None
    if rows is None:
        return logp_rows, entropy_rows, (rows, lse, mean_z)
    n = targets1d.shape[0]
    logp = logp_rows.new_zeros(n).index_copy_(0, rows, logp_rows)
    entropy = None if entropy_rows is None else entropy_rows.new_zeros(n).index_copy_(0, rows, entropy_rows)
    return logp, entropy, (rows, lse, mean_z)


def logprob_backward(hidden2d, weight, bias, targets1d, saved, grad_logp, grad_entropy, params, needs):
    """Gradients `(d_hidden [N, D], d_weight [V, D], d_bias [V])` for upstream `grad_logp`, `grad_entropy` ([N])."""
    rows, lse, mean_z = saved
    if rows is not None:
        hidden_rows, targets1d = hidden2d.index_select(0, rows), targets1d.index_select(0, rows)
        grad_logp = grad_logp.index_select(0, rows)
        grad_entropy = None if grad_entropy is None else grad_entropy.index_select(0, rows)
    else:
        hidden_rows = hidden2d
    if params.backend.name == "triton":  # the (..., params, needs) contract
        d_hidden_rows, d_weight, d_bias = params.backend.backward(
            hidden_rows, weight, bias, targets1d, lse, mean_z, grad_logp, grad_entropy, params, tuple(needs)
        )
    else:
        d_hidden_rows, d_weight, d_bias = _legacy_backward(
            params, hidden_rows, weight, bias, targets1d, lse, mean_z, grad_logp, grad_entropy, needs
        )
    d_hidden = d_hidden_rows
    if d_hidden_rows is not None and rows is not None:
        d_hidden = d_hidden_rows.new_zeros(hidden2d.shape).index_copy_(0, rows, d_hidden_rows)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def _legacy_backward(params, hidden_rows, weight, bias, targets1d, lse, mean_z, grad_logp, grad_entropy, needs):
    """The keyword-argument backward contract of the torch and native backends."""
    return params.backend.backward(
        hidden_rows,
        weight,
        bias,
        targets1d,
        lse,
        mean_z,
        grad_logp,
        grad_entropy,
        inv_temperature=params.inv_temperature,
        needs_hidden_grad=needs[0],
        needs_weight_grad=needs[1],
        needs_bias_grad=needs[2],
        grad_filter_eps=params.grad_filter_eps,
    )


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs and the per-row logsumexp; backward recomputes the logits tiles."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, params: LogprobParams):
        logp, entropy, saved = logprob_forward(hidden2d, weight, bias, targets1d, params)
        rows, lse, mean_z = saved
        ctx.params = params
        ctx.has_rows = rows is not None
        ctx.save_for_backward(hidden2d, weight, bias, targets1d, rows, lse, mean_z)
        if params.with_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden2d, weight, bias, targets1d, rows, lse, mean_z = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if grad_logp is None:
            grad_logp = torch.zeros(targets1d.shape[0], dtype=torch.float32, device=targets1d.device)
        d_hidden, d_weight, d_bias = logprob_backward(
            hidden2d,
            weight,
            bias,
            targets1d,
            (rows, lse, mean_z),
            grad_logp,
            grad_entropy,
            ctx.params,
            needs,
        )
        return d_hidden, d_weight, d_bias, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
):
    """Token log-probs `ℓ = z[y] − logsumexp(z)` with `z = (hidden Wᵀ + bias) / temperature`, never materialising z.

    hidden `[..., D]`, weight `[V, D]`, targets `[...]` (integer; `hidden[..., t, :]` predicts `targets[..., t]`),
    bias `[V]` or None. Returns float32 log-probs shaped like `targets` (0 where `targets == ignore_index`) and,
    with `return_entropy=True`, the float32 entropy `H = logsumexp(z) − Σ_v p_v z_v` as a second output (0 at
    ignored positions). Differentiable in hidden, weight and bias; gradients at ignored positions are exactly 0.
    A call that needs no gradient saves nothing for backward. backend: "auto" (triton on CUDA, else torch),
    "torch", "triton" or "native". `grad_filter_eps` (off by default): the backward may drop the logits-gradient
    entries whose probability `p_v < grad_filter_eps` (off the target), an error of at most `eps·|∂L/∂ℓ|` per unit
    of `‖W_v‖` each, which on a peaked softmax skips most of the backward's products (torch and triton backends).
    """
    check_linear_logprobs_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    params = logprob_params(hidden.device, backend, temperature, ignore_index, return_entropy, grad_filter_eps)
    hidden2d = unit_inner_stride(hidden.reshape(-1, hidden.shape[-1]))
    weight = unit_inner_stride(weight)
    targets1d = targets.reshape(-1).long()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        out = LinearLogprobsFunction.apply(hidden2d, weight, bias, targets1d, params)
        logp, entropy = out if return_entropy else (out, None)
    else:
        logp, entropy, _ = logprob_forward(hidden2d, weight, bias, targets1d, params)
    logp = logp.view(targets.shape)
    if return_entropy:
        return logp, entropy.view(targets.shape)
    return logp


def sequence_logprobs(
    token_logprobs: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, length_norm: str = "mean"
) -> torch.Tensor:
    """Response log-prob `Σ_t m_t ℓ_t` over the last dim (`"sum"`), or that sum over `Σ_t m_t` (`"mean"`).

    `m_t = targets != ignore_index`; a row with no response token gets 0 under "mean".
    """
    if length_norm not in ("mean", "sum"):
        raise ValueError(f"length_norm must be 'mean' or 'sum', got {length_norm!r}")
    if token_logprobs.shape != targets.shape:
        raise ValueError(
            f"token_logprobs shape {tuple(token_logprobs.shape)} must equal targets shape {tuple(targets.shape)}"
        )
    mask = (targets != ignore_index).to(token_logprobs.dtype)
    total = (token_logprobs * mask).sum(-1)
    if length_norm == "sum":
        return total
    return total / mask.sum(-1).clamp_min(1.0)
