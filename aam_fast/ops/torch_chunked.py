"""Chunked mode of the torch backend for losses whose per-token gradient is local: three products, not four.

When `∂loss/∂ℓ_t` depends only on the token's own values (the GRPO token loss), a chunk of rows can hold its whole
`[rows, V]` logits block: one product gives `z`, its logsumexp, `ℓ`, `H` and the token gradients at once, and two
more give `∂h = dz W` (in 512-column pieces added in float64: `add_row_products`) and `∂W += dzᵀ h`. The
separate forward pass over the vocabulary that the general op needs (its upstream gradient is unknown until
backward) disappears. Two float32 `[rows, V]` buffers, sized by
`AAM_FAST_TORCH_CHUNK_MB` (default 512), bound the memory. This is the torch backend's `local_loss` entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .grad_filter import filtered
from .params import LogprobParams
from .torch_backend import LOG_FLOOR, add_row_products

_CHUNK_BUDGET_BYTES = int(os.environ.get("AAM_FAST_TORCH_CHUNK_MB", "512")) * 2**20
# A bfloat16/float16 weight is widened to float32 this many vocabulary rows at a time (a float32 weight is used
# whole); the per-row sums of products run over column slabs of this width too.
_SLAB = 4096

# token_grads(start, stop, logp_rows, entropy_rows) -> (grad_logp_rows, grad_entropy_rows or None)
TokenGrads = Callable[[int, int, torch.Tensor, "torch.Tensor | None"], tuple]


def chunk_rows(vocab: int) -> int:
    """Rows per chunk whose two float32 `[rows, V]` buffers fit the budget (at least one)."""
    return max(1, _CHUNK_BUDGET_BYTES // (2 * 4 * max(vocab, 1)))


def _slabs(weight: torch.Tensor, widen: bool = True):
    """`(v0, v1, rows v0:v1 of weight in float32)`: one slab for a float32 weight, `_SLAB`-row slabs otherwise
    (or the rows as they are when not `widen`: only d_weight and d_bias needed)."""
    vocab = weight.shape[0]
    step = max(vocab, 1) if weight.dtype == torch.float32 else _SLAB
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        yield v0, v1, (weight[v0:v1].float() if widen else None)


def _row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """float64 `Σ_v a_tv b_tv` per row, formed slab by slab in `scratch` and summed with torch's pairwise sum.

    (A float32 `bmm` of the two rows accumulates serially: ~2e-5 relative error at V = 32,000, ~2e-4 at 151,936.)
    """
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    width = scratch.shape[1]
    for v0 in range(0, a.shape[1], width):
        v1 = min(a.shape[1], v0 + width)
        part = torch.mul(a[:, v0:v1], b[:, v0:v1], out=scratch[: a.shape[0], : v1 - v0])
        total.add_(part.sum(dim=1).double())
    return total


def _apply_dz(dz, keep, weight, h32, grads, product_buf) -> None:
    """A chunk's gradient products, slab by slab: `d_hidden_rows = dz W` (float64 sums of fresh products,
    `add_row_products`), `d_weight += dzᵀ h`, `d_bias += Σ_rows dz` (`grads`, each None when not needed); `keep`
    (or None) marks the entries gradient filtering keeps."""
    d_hidden_rows, d_weight, d_bias = grads
    mixed_rows = None
    if d_hidden_rows is not None:
        mixed_rows = torch.zeros(d_hidden_rows.shape, dtype=torch.float64, device=d_hidden_rows.device)
    for v0, v1, w32 in _slabs(weight, widen=d_hidden_rows is not None):
        dz_slab = dz[:, v0:v1] if keep is None else filtered(dz[:, v0:v1], keep[:, v0:v1])
        if mixed_rows is not None:
            add_row_products(mixed_rows, dz_slab, w32, product_buf)
        if d_weight is not None:
            d_weight[v0:v1].addmm_(dz_slab.t(), h32)
        if d_bias is not None:
            dense = dz_slab.layout == torch.strided
            d_bias[v0:v1].add_(dz_slab.sum(dim=0) if dense else torch.mv(dz_slab.t(), dz.new_ones(dz.shape[0])))
    if mixed_rows is not None:
        d_hidden_rows.copy_(mixed_rows)


def torch_chunked_local(hidden, weight, bias, targets, token_grads: TokenGrads, params: LogprobParams, needs):
    """Log-probs, entropies and the gradients of a local token loss in one sweep of row chunks.

    Inputs follow the backend contract (every target in `[0, V)`); `needs` = (hidden, weight, bias) flags.
    Returns `(logp [N] f32, entropy [N] f32 or None, d_hidden [N, D] in hidden.dtype or None, d_weight [V, D] f32 or
    None, d_bias [V] f32 or None)`. Per chunk, with `s = 1/τ`, `m` the row max, `S = Σ_v exp(z_v − m)`, `p =
    softmax(z)` and upstream `g = ∂L/∂ℓ`, `e = ∂L/∂H`: `ℓ = z_y − m − log S`, `H = log S − Σ_v p_v (z_v − m)` (a
    sum of terms of one sign), `dz = s·[g (onehot − p) − e p (log p + H)]`, its target column `s·[g q − e p_y (ℓ +
    H)]` with `q = 1 − p_y = −expm1(ℓ)`, so near-certain tokens do not cancel. With `grad_filter_eps > 0` the
    off-target entries whose `p < grad_filter_eps` may be dropped (`grad_filter`).
    """
    needs_hidden_grad, needs_weight_grad, needs_bias_grad = needs
    with_entropy, inv_temperature, eps = params.with_entropy, params.inv_temperature, params.grad_filter_eps
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty(n, dtype=torch.float32, device=device) if with_entropy else None
    d_hidden = torch.zeros(n, dim, dtype=torch.float32, device=device) if needs_hidden_grad else None
    d_weight = torch.zeros(vocab, dim, dtype=torch.float32, device=device) if needs_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_bias_grad else None
    rows = min(n, chunk_rows(vocab)) if n else 0
    logits_buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    prob_buf = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    scratch = torch.empty(rows, min(vocab, _SLAB), dtype=torch.float32, device=device) if with_entropy else None
    product_buf = torch.empty(rows, dim, dtype=torch.float32, device=device) if needs_hidden_grad else None
    bias32 = None if bias is None else bias.float()
    for r0 in range(0, n, max(rows, 1)):
        r1 = min(n, r0 + rows)
        h32 = hidden[r0:r1].float()
        y = targets[r0:r1, None]
        z = logits_buf[: r1 - r0]
        for v0, v1, w32 in _slabs(weight):
            torch.mm(h32, w32.t(), out=z[:, v0:v1])
        if bias32 is not None:
            z.add_(bias32)
        if inv_temperature != 1.0:
            z.mul_(inv_temperature)
        target_z = z.gather(1, y).view(-1)
        row_max = z.amax(dim=1)
        z.sub_(row_max[:, None])  # z − m ≤ 0
        p = torch.exp(z, out=prob_buf[: r1 - r0])
        total = p.sum(dim=1).double()
        log_total = total.log()
        logp_rows = (target_z.double() - row_max.double() - log_total).float()
        logp[r0:r1] = logp_rows
        entropy_rows = mean_shift = None
        if with_entropy:
            z.clamp_min_(LOG_FLOOR)  # p = 0 there: a masked z = −inf adds 0·LOG_FLOOR, not 0·(−inf)
            mean_shift = _row_dot(p, z, scratch) / total  # Σ_v p_v (z_v − m) ≤ 0, float64
            entropy_rows = (log_total - mean_shift).float()
            entropy[r0:r1] = entropy_rows
        p.mul_((1.0 / total).float()[:, None])
        g, e = token_grads(r0, r1, logp_rows, entropy_rows)
        if not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
            continue
        g = g.float() * inv_temperature
        e = None if e is None else e.float() * inv_temperature
        keep = p >= eps if eps > 0.0 else None
        target_grad = g * (-torch.expm1(logp_rows))
        if e is not None:
            target_grad = target_grad - e * logp_rows.exp() * (logp_rows + entropy_rows)
            # log p + H = (z − m) − Σ_v p_v (z_v − m); z <- −e (log p + H) − g, then dz = p · z
            z.sub_(mean_shift.float()[:, None]).mul_(-e[:, None]).sub_(g[:, None])
            dz = p.mul_(z)
        else:
            dz = p.mul_(-g[:, None])
        dz.scatter_(1, y, target_grad[:, None])
        if keep is not None:
            keep.scatter_(1, y, True)
        d_hidden_rows = None if d_hidden is None else d_hidden[r0:r1]
        _apply_dz(dz, keep, weight, h32, (d_hidden_rows, d_weight, d_bias), product_buf)
    d_hidden = None if d_hidden is None else d_hidden.to(hidden.dtype)
    return logp, entropy, d_hidden, d_weight, d_bias
