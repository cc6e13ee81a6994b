"""`linear_local_loss`: a loss whose per-token gradient is local, computed with its gradient in one forward pass.

When `∂loss/∂ℓ_t` (and `∂loss/∂H_t`) depend only on the token's own quantities and constants known in advance
(the GRPO token loss with its normaliser), the gradient of the loss with respect to hidden, weight and bias can be
formed during the forward pass: compute `ℓ` (and `H`), differentiate the cheap `[N]`-sized token loss, and run the
backend's backward kernels at once. Nothing but the finished gradients is kept for backward, which only scales them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .linear_logprobs import logprob_backward, logprob_forward, logprob_params, unit_inner_stride, valid_rows
from .params import IGNORE_INDEX, LogprobParams
from .validation import check_linear_logprobs_inputs

TokenLossFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _token_loss_and_grads(token_loss_fn, logp, entropy):
    """Evaluate `token_loss_fn(logp, entropy)` and its gradients with respect to both `[N]` inputs."""
    with torch.enable_grad():
        logp_leaf = logp.detach().requires_grad_(True)
        entropy_leaf = None if entropy is None else entropy.detach().requires_grad_(True)
        loss = token_loss_fn(logp_leaf, entropy_leaf)
        leaves = [logp_leaf] if entropy_leaf is None else [logp_leaf, entropy_leaf]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grad_logp = grads[0] if grads[0] is not None else torch.zeros_like(logp)
    grad_entropy = grads[1] if entropy_leaf is not None else None
    return loss.detach(), grad_logp, grad_entropy


def _backend_local_loss(hidden2d, weight, bias, targets1d, params: LogprobParams, token_loss_fn, needs):
    """The backend's `local_loss` entry (three products): token gradients taken chunk by chunk while the logits are
    at hand.

    Locality makes the gradient of row t depend only on row t, so a chunk's gradients come from differentiating the
    loss with that chunk's log-probs in place and zeros elsewhere; the loss itself is evaluated once at the end.
    """
    keep = valid_rows(targets1d, params.ignore_index)
    rows = keep if keep is not None else torch.arange(targets1d.shape[0], device=targets1d.device)
    hidden_rows = hidden2d if keep is None else hidden2d.index_select(0, keep)
    target_rows = targets1d if keep is None else targets1d.index_select(0, keep)
    n = targets1d.shape[0]

    def token_grads(start, stop, logp_rows, entropy_rows):
        index = rows[start:stop]
        logp = logp_rows.new_zeros(n).index_copy_(0, index, logp_rows)
        entropy = None if entropy_rows is None else entropy_rows.new_zeros(n).index_copy_(0, index, entropy_rows)
        _, grad_logp, grad_entropy = _token_loss_and_grads(token_loss_fn, logp, entropy)
        return grad_logp.index_select(0, index), None if grad_entropy is None else grad_entropy.index_select(0, index)

    logp_rows, entropy_rows, d_hidden_rows, d_weight, d_bias = params.backend.local_loss(
        hidden_rows, weight, bias, target_rows, token_grads, params, needs
    )
    logp = logp_rows.new_zeros(n).index_copy_(0, rows, logp_rows)
    entropy = None if entropy_rows is None else entropy_rows.new_zeros(n).index_copy_(0, rows, entropy_rows)
    with torch.no_grad():
        loss = token_loss_fn(logp, entropy).detach()
    d_hidden = d_hidden_rows
    if d_hidden_rows is not None and keep is not None:
        d_hidden = d_hidden_rows.new_zeros(hidden2d.shape).index_copy_(0, keep, d_hidden_rows)
    d_weight = None if d_weight is None else d_weight.to(weight.dtype)
    d_bias = None if d_bias is None else d_bias.to(bias.dtype)
    return loss, logp, entropy, (d_hidden, d_weight, d_bias)


class LinearLocalLossFunction(torch.autograd.Function):
    """Forward returns the loss and stores its finished gradients; backward scales them by the upstream grad."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, params: LogprobParams, token_loss_fn, results: dict, local):
        needs = tuple(ctx.needs_input_grad[:3])
        if local and params.backend.local_loss is not None:
            loss, logp, entropy, grads = _backend_local_loss(
                hidden2d, weight, bias, targets1d, params, token_loss_fn, needs
            )
        else:
            logp, entropy, saved = logprob_forward(hidden2d, weight, bias, targets1d, params)
            loss, grad_logp, grad_entropy = _token_loss_and_grads(token_loss_fn, logp, entropy)
            grads = logprob_backward(hidden2d, weight, bias, targets1d, saved, grad_logp, grad_entropy, params, needs)
        ctx.save_for_backward(*grads)
        results["logp"], results["entropy"] = logp, entropy
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors
        if not bool(grad_loss == 1):  # `loss.backward()` passes 1: hand the finished gradients over, no copy
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def linear_local_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_loss_fn: TokenLossFn,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    with_entropy: bool = False,
    backend: str = "auto",
    grad_filter_eps: float | None = None,
    local: bool = True,
):
    """Scalar `token_loss_fn(ℓ, H)` of the token log-probs `ℓ` (and entropies `H`) of `linear_logprobs`.

    `token_loss_fn` receives float32 tensors shaped like `targets` (0 at ignored positions; `H` is None unless
    `with_entropy`) and returns a scalar; its gradient must be local per token (it is differentiated once, in the
    forward pass). Returns `(loss, logp, entropy)` with `logp`/`entropy` detached. Differentiable in hidden, weight
    and bias; the backward pass does no matrix product. `grad_filter_eps` as in `linear_logprobs`. `local=False`
    drops the locality requirement (a token's gradient may depend on other tokens' ℓ and H: sequence means, batch
    quantiles): the loss is then differentiated once on the whole `ℓ`/`H`, between the backend's forward and
    backward products (one more product than the local mode on backends that have it).
    """
    check_linear_logprobs_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    params = logprob_params(hidden.device, backend, temperature, ignore_index, with_entropy, grad_filter_eps)
    hidden2d = unit_inner_stride(hidden.reshape(-1, hidden.shape[-1]))
    weight = unit_inner_stride(weight)
    targets1d = targets.reshape(-1).long()
    shape = targets.shape

    def flat_loss(logp, entropy):
        return token_loss_fn(logp.view(shape), None if entropy is None else entropy.view(shape))

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        results: dict = {}
        loss = LinearLocalLossFunction.apply(hidden2d, weight, bias, targets1d, params, flat_loss, results, local)
        logp, entropy = results["logp"], results["entropy"]
    else:
        logp, entropy, _ = logprob_forward(hidden2d, weight, bias, targets1d, params)
        loss = flat_loss(logp, entropy)
    entropy = None if entropy is None else entropy.view(shape)
    return loss, logp.view(shape), entropy
