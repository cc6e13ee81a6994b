"""Chunked mode of the torch backend for losses whose per-token gradient is local: three products, not four.

When `∂loss/∂ℓ_t` depends only on the token's own values (the GRPO token loss), a chunk of rows can hold its whole
`[rows, V]` logits block: one product gives `z`, its logsumexp, `ℓ`, `H` and the token gradients at once, and two
more give `∂h = dz W` and `∂W += dzᵀ h`. The separate forward pass over the vocabulary that the general op needs
(its upstream gradient is unknown until backward) disappears. Two float32 `[rows, V]` buffers, sized by
`AAM_FAST_TORCH_CHUNK_MB` (default 512), bound the memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .grad_filter import filtered

_CHUNK_BUDGET_BYTES = int(os.environ.get("AAM_FAST_TORCH_CHUNK_MB", "512")) * 2**20

# token_grads(start, stop, logp_rows, entropy_rows) -> (grad_logp_rows, grad_entropy_rows or None)
TokenGrads = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], tuple]


def chunk_rows(vocab: int) -> int:
    """Rows per chunk whose two float32 `[rows, V]` buffers fit the budget (at least one)."""
    return max(1, _CHUNK_BUDGET_BYTES // (2 * 4 * max(vocab, 1)))


def torch_chunked_local(
    hidden,
    weight,
    bias,
    targets,
    token_grads: TokenGrads,
    *,
    inv_temperature: float,
    with_entropy: bool,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
    grad_filter_eps: float = 0.0,
):
    """Log-probs, entropies and the gradients of a local token loss in one sweep of row chunks.

    Inputs follow the backend contract (float32 weight, every target in `[0, V)`). Returns float32
    `(logp [N], entropy [N] or None, d_hidden [N, D] in hidden.dtype or None, d_weight [V, D] or None,
    d_bias [V] or None)`. Per chunk, with `s = 1/τ`, `p = softmax(z)` and upstream `g = ∂L/∂ℓ`, `e = ∂L/∂H`:
    `dz = s·[g (onehot − p) + e p (mean_z − z)]`, its target column set to `s·[g q + e p_y (mean_z − z_y)]` with
    `q = 1 − p_y = −expm1(ℓ)`, so near-certain tokens do not cancel. With `grad_filter_eps > 0` the off-target
    entries whose `p < grad_filter_eps` may be dropped (`grad_filter`).
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty(n, dtype=torch.float32, device=device) if with_entropy else None
    d_hidden = torch.empty(n, dim, dtype=torch.float32, device=device) if needs_hidden_grad else None
    d_weight = torch.zeros(vocab, dim, dtype=torch.float32, device=device) if needs_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_bias_grad else None
    rows = min(n, chunk_rows(vocab)) if n else 0
    logits_buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    prob_buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    for r0 in range(0, n, max(rows, 1)):
        r1 = min(n, r0 + rows)
        h32 = hidden[r0:r1].float()
        y = targets[r0:r1, None]
        z = logits_buf[: r1 - r0]
        torch.mm(h32, weight.t(), out=z)
        if bias is not None:
            z.add_(bias.float())
        if inv_temperature != 1.0:
            z.mul_(inv_temperature)
        target_z = z.gather(1, y).view(-1)
        row_max = z.amax(dim=1)
        p = torch.sub(z, row_max[:, None], out=prob_buf[: r1 - r0]).exp_()
        total = p.sum(dim=1)
        p.div_(total[:, None])
        lse = row_max.double() + total.double().log()
        logp_rows = (target_z.double() - lse).float()
        logp[r0:r1] = logp_rows
        mean_z = entropy_rows = None
        if with_entropy:
            mean_z = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
            entropy_rows = (lse - mean_z.double()).float()
            entropy[r0:r1] = entropy_rows
        g, e = token_grads(r0, r1, logp_rows, entropy_rows)
        g = g.float() * inv_temperature
        e = None if e is None else e.float() * inv_temperature
        if not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
            continue
        p_target = p.gather(1, y).view(-1)
        keep = p >= grad_filter_eps if grad_filter_eps > 0.0 else None
        target_grad = g * (-torch.expm1(logp_rows))
        if e is not None:
            target_grad = target_grad + e * p_target * (mean_z - target_z)
            # z <- e (mean_z − z) − g, then dz = p · z
            z.neg_().add_(mean_z[:, None]).mul_(e[:, None]).sub_(g[:, None])
            dz = p.mul_(z)
        else:
            dz = p.mul_(-g[:, None])
        dz.scatter_(1, y, target_grad[:, None])
        if keep is not None:
            dz = filtered(dz, keep.scatter_(1, y, True))
        if d_hidden is not None:
            w32 = weight.float() if weight.dtype != torch.float32 else weight
            d_hidden[r0:r1].addmm_(dz, w32, beta=0.0)
        if d_weight is not None:
            d_weight.addmm_(dz.t(), h32)
        if d_bias is not None:
            d_bias.add_(torch.mv(dz.t(), torch.ones_like(g)))
    d_hidden = None if d_hidden is None else d_hidden.to(hidden.dtype)
    return logp, entropy, d_hidden, d_weight, d_bias
