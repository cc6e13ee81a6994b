"""Pure-PyTorch backend of the fused linear log-prob op: the reference and the CPU path.

The logits `z = (h Wᵀ + b) / τ` are computed one tile at a time (all tokens of a token chunk × one vocabulary
tile) and folded into an online logsumexp, so nothing of size `N × V` exists. Tiles are float32 whatever the input
dtype, and their buffers are allocated once per call and reused (fresh multi-megabyte allocations page-fault on
every tile on CPU). Backward recomputes each tile. Both functions follow the backend contract shared with
`triton_forward` / `triton_backward`: ignored rows are already removed, every target is in `[0, V)`.
"""

from __future__ import annotations

import os

import torch

from .grad_filter import filtered
from .params import LogprobParams

# Working-set budget for the per-tile float32 buffers (two [rows, tile] buffers live at once).
_TILE_BUDGET_BYTES = int(os.environ.get("AAM_FAST_TORCH_TILE_MB", "32")) * 2**20
_MAX_ROWS = 4096
_MIN_TILE = 256
# Shifted logits z − m (and log-probs) are clamped here before they multiply a probability: below log of the
# smallest float32 (≈ −103.3) that probability is 0 anyway, and a masked entry (z = −inf, e.g. a bias of −inf)
# then adds 0, not 0·(−inf) = NaN. NaN passes a clamp unchanged.
LOG_FLOOR = -1.0e4
# The running max never drops below this: a row whose first tile is all −inf keeps a finite shift.
MAX_FLOOR = -1.0e30
# `∂h = dz W` sums over the vocabulary in pieces of this many columns (`add_row_products`).
REDUCE_WIDTH = 512


def add_row_products(acc64: torch.Tensor, dz: torch.Tensor, w32: torch.Tensor, scratch: torch.Tensor) -> None:
    """`acc64 += dz @ w32` (float64 `[rows, D]`), the sum over dz's columns cut into `REDUCE_WIDTH` pieces, each
    piece's float32 product formed fresh in `scratch` (`[≥ rows, D]` float32) and added in float64.

    No float32 sum then runs over more than `REDUCE_WIDTH` terms whatever path the BLAS takes: MKL's sgemm sums
    the rows of a product with few rows (under 4; under 12 on two threads) serially over the whole reduction, into
    the output itself, ~10x the error of its blocked path at V = 65,536. A sparse (filtered) `dz` is one product.
    """
    if dz.layout != torch.strided:
        acc64.add_(torch.mm(dz, w32))
        return
    out = scratch[: dz.shape[0]]
    for v0 in range(0, dz.shape[1], REDUCE_WIDTH):
        v1 = min(dz.shape[1], v0 + REDUCE_WIDTH)
        acc64.add_(torch.mm(dz[:, v0:v1], w32[v0:v1], out=out))


def _tile_shape(rows: int, vocab: int) -> tuple[int, int]:
    """Token-chunk rows and vocabulary-tile width whose two float32 buffers fit the budget."""
    rows = max(1, min(rows, _MAX_ROWS))
    width = _TILE_BUDGET_BYTES // (2 * 4 * rows)
    width = max(_MIN_TILE, min(vocab, width // 128 * 128 or _MIN_TILE))
    return rows, width


def _logits_tile(h32, weight, bias, start, stop, inv_temperature, out):
    """out[:, :stop-start] = (h32 @ W[start:stop]ᵀ + b[start:stop]) * inv_temperature, in float32."""
    w = weight[start:stop]
    w32 = w if w.dtype == torch.float32 else w.float()
    z = out[:, : stop - start]
    torch.mm(h32, w32.t(), out=z)
    if bias is not None:
        z.add_(bias[start:stop].float())
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z, w32


def torch_forward(hidden, weight, bias, targets, params: LogprobParams):
    """Return `(lse [N] f64, target_logit [N] f32, mean_z [N] f64 or None)` with `mean_z = Σ_v softmax(z)_v z_v`.

    The target logit is read from the tile that holds it (the same numbers the logsumexp sees) and `lse = m +
    log S` is kept in float64, so a confident token's `z_y − lse` cancels as exactly as in a materialised
    log-softmax instead of losing `log S ≈ 1e-5` to the rounding of `m + log S`. With `m` the running max, the
    per-row sums `S = Σ_v exp(z_v − m)` and `A = Σ_v exp(z_v − m)(z_v − m)` (every term ≤ 0: nothing cancels) are
    float32 within a tile and float64 across tiles; `mean_z = m + A/S`, so the entropy `lse − mean_z = log S − A/S`
    is as exact as the sums.
    """
    inv_temperature, with_entropy = params.inv_temperature, params.with_entropy
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    lse = torch.empty(n, dtype=torch.float64, device=device)
    target_logit = torch.empty(n, dtype=torch.float32, device=device)
    mean_z = torch.empty(n, dtype=torch.float64, device=device) if with_entropy else None
    if n == 0:
        return lse, target_logit, mean_z
    rows, width = _tile_shape(n, vocab)
    logits_buf = torch.empty(rows, width, dtype=torch.float32, device=device)
    exp_buf = torch.empty(rows, width, dtype=torch.float32, device=device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h32 = hidden[r0:r1].float()
        y_rows = targets[r0:r1]
        running_max = torch.full((r1 - r0,), -float("inf"), dtype=torch.float32, device=device)
        running_sum = torch.zeros(r1 - r0, dtype=torch.float64, device=device)
        running_shift = torch.zeros(r1 - r0, dtype=torch.float64, device=device) if with_entropy else None
        picked = torch.zeros(r1 - r0, dtype=torch.float32, device=device)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            z, _ = _logits_tile(h32, weight, bias, v0, v1, inv_temperature, logits_buf[: r1 - r0])
            in_tile = (y_rows >= v0) & (y_rows < v1)
            column = (y_rows - v0).clamp(0, v1 - v0 - 1)
            picked = torch.where(in_tile, z.gather(1, column[:, None]).view(-1), picked)
            new_max = torch.maximum(running_max, z.amax(dim=1)).clamp_min_(MAX_FLOOR)
            rescale = torch.exp((running_max - new_max).double())
            z.sub_(new_max[:, None])  # z − m ≤ 0: no sum below mixes signs
            e = torch.exp(z, out=exp_buf[: r1 - r0, : v1 - v0])
            if with_entropy:
                # A = Σ e (z − m) over the tiles so far, re-based on each new max: the old tiles' (z − m_old)
                # become (z − m_old) + (m_old − m_new). Summed (not bmm, whose float32 dot loses ~1e-4 at V=150k).
                moved = torch.where(running_sum > 0, (running_max - new_max).double() * running_sum, 0.0)
                running_shift.add_(moved).mul_(rescale).add_(z.clamp_min_(LOG_FLOOR).mul_(e).sum(dim=1).double())
            running_sum.mul_(rescale).add_(e.sum(dim=1).double())
            running_max = new_max
        lse[r0:r1] = running_max.double() + running_sum.log()
        target_logit[r0:r1] = picked
        if with_entropy:
            mean_z[r0:r1] = running_max.double() + running_shift / running_sum
    return lse, target_logit, mean_z


def torch_backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params: LogprobParams, needs):
    """Gradients of `Σ g·logp + Σ e·H` by recomputing each logits tile; `needs` = (hidden, weight, bias) flags.

    With `p = softmax(z)`: `∂logp/∂z = onehot(y) − p` and `∂H/∂z = p (mean_z − z) = −p (log p + H)`; the chain
    through `z = (hWᵀ + b)/τ` scales by `s = 1/τ`. `log p = (z − lse_hi) − lse_lo` with the float64 `lse` split
    into float32 `lse_hi + lse_lo`, so `p` carries the rounding of `z − lse` (as a materialised log-softmax), not
    of `lse`. Without entropy gradients the per-row `g` is kept off the tiles: with `P'` the probabilities with
    each row's target zeroed and `q = 1 − p_y = −expm1(z_y − lse)` (exact even when `p_y ≈ 1`),
    `dh = s·g ⊙ (q·W[y] − P'W)`, `dW = s·(scatter_y(q·g ⊙ h) − P'ᵀ(g ⊙ h))`, `db = s·(bincount_y(q·g) − P'ᵀg)`:
    nothing cancels. With `grad_filter_eps > 0` the off-target entries whose `p < grad_filter_eps` may be dropped
    (`grad_filter`). Returns `(d_hidden in hidden.dtype, d_weight float32, d_bias float32)`, each None when not
    needed.
    """
    needs_hidden_grad, needs_weight_grad, needs_bias_grad = needs
    inv_temperature, grad_filter_eps = params.inv_temperature, params.grad_filter_eps
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    d_hidden = torch.zeros(n, dim, dtype=torch.float32, device=device) if needs_hidden_grad else None
    d_weight = torch.zeros(vocab, dim, dtype=torch.float32, device=device) if needs_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_bias_grad else None
    if n == 0 or not (needs_hidden_grad or needs_weight_grad or needs_bias_grad):
        return _cast_hidden_grad(d_hidden, hidden), d_weight, d_bias
    g = grad_logp.float() * inv_temperature
    e = grad_entropy.float() * inv_temperature if grad_entropy is not None else None
    lse64 = lse.double()
    lse_hi = lse64.float()
    lse_lo = (lse64 - lse_hi.double()).float()
    entropy = None if e is None else (lse64 - mean_z.double()).float()
    rows, width = _tile_shape(n, vocab)
    logits_buf = torch.empty(rows, width, dtype=torch.float32, device=device)
    grad_buf = torch.empty(rows, width, dtype=torch.float32, device=device)
    product_buf = torch.empty(rows, dim, dtype=torch.float32, device=device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h32 = hidden[r0:r1].float()
        g_rows, y_rows = g[r0:r1], targets[r0:r1]
        hi_rows, lo_rows = lse_hi[r0:r1, None], lse_lo[r0:r1, None]
        # Σ_{v≠y} p_tv W_v (fast path) or Σ_v dz_tv W_v (entropy path), accumulated over vocabulary tiles.
        mixed_rows = torch.zeros(r1 - r0, dim, dtype=torch.float64, device=device) if d_hidden is not None else None
        mixed = None if mixed_rows is None else (mixed_rows, product_buf)
        if e is None:
            scaled_h = h32 * g_rows[:, None]  # g ⊙ h, the right factor of dW
            target_z = torch.zeros(r1 - r0, dtype=torch.float32, device=device)
        for v0 in range(0, vocab, width):
            v1 = min(vocab, v0 + width)
            z, w32 = _logits_tile(h32, weight, bias, v0, v1, inv_temperature, logits_buf[: r1 - r0])
            tile = (v0, v1, y_rows, hi_rows, lo_rows, g_rows)
            if e is None:
                target_z = _logp_tile(z, w32, tile, scaled_h, target_z, grad_filter_eps, mixed, d_weight, d_bias)
            else:
                dz = grad_buf[: r1 - r0, : v1 - v0]
                entropy_rows = (e[r0:r1, None], entropy[r0:r1, None])
                _entropy_tile(z, dz, w32, tile, entropy_rows, h32, grad_filter_eps, mixed, d_weight, d_bias)
        if e is None:
            # the target column, row by row: q = 1 − p_y without cancellation
            q = (-torch.expm1(target_z.double() - lse64[r0:r1])).float()
            if mixed_rows is not None:
                picked = weight.index_select(0, y_rows).float()
                d_hidden[r0:r1] = g_rows[:, None] * (q[:, None] * picked - mixed_rows.float())
            if d_weight is not None:
                d_weight.index_add_(0, y_rows, scaled_h * q[:, None])
            if d_bias is not None:
                d_bias.index_add_(0, y_rows, g_rows * q)
        elif mixed_rows is not None:
            d_hidden[r0:r1] = mixed_rows.float()
    return _cast_hidden_grad(d_hidden, hidden), d_weight, d_bias


def _logp_tile(z, w32, tile, scaled_h, target_z, grad_filter_eps, mixed, d_weight, d_bias):
    """One vocabulary tile of the log-prob-only backward: ``P'`` (the tile's probabilities, the target's zeroed)
    into ``Σ P'W`` (``mixed`` = (float64 sum, float32 scratch) of ``add_row_products``), ``dW −= P'ᵀ(g ⊙ h)`` and
    ``db −= P'ᵀg``; returns ``target_z`` with the rows whose target lies in the tile filled in. ``z`` is consumed."""
    v0, v1, y_rows, hi_rows, lo_rows, g_rows = tile
    in_tile = (y_rows >= v0) & (y_rows < v1)
    column = (y_rows - v0).clamp(0, v1 - v0 - 1)[:, None]
    target_z = torch.where(in_tile, z.gather(1, column).view(-1), target_z)
    p = z.sub_(hi_rows).sub_(lo_rows).exp_()
    p.scatter_(1, column, torch.where(in_tile, 0.0, p.gather(1, column).view(-1))[:, None])
    if grad_filter_eps > 0.0:
        p = filtered(p, p >= grad_filter_eps)
    if mixed is not None:
        add_row_products(mixed[0], p, w32, mixed[1])
    if d_weight is not None:
        d_weight[v0:v1].addmm_(p.t(), scaled_h, alpha=-1.0)
    if d_bias is not None:  # p is spent: scale it in place and sum pairwise (a float32 mv sums serially)
        dense = p.layout == torch.strided
        d_bias[v0:v1].sub_(p.mul_(g_rows[:, None]).sum(dim=0) if dense else torch.mv(p.t(), g_rows))
    return target_z


def _entropy_tile(z, dz, w32, tile, entropy_rows, h32, grad_filter_eps, mixed, d_weight, d_bias):
    """One vocabulary tile of the backward with entropy gradients: ``dz = p·(−e (log p + H) − g) + g·onehot(y)``
    (``dz`` a buffer, ``z`` consumed), then ``Σ dz W``, ``dW += dzᵀ h``, ``db += Σ_rows dz``."""
    v0, v1, y_rows, hi_rows, lo_rows, g_rows = tile
    e_rows, h_rows = entropy_rows
    torch.sub(z, hi_rows, out=dz).sub_(lo_rows)  # log p
    torch.add(dz, h_rows, out=z).clamp_min_(LOG_FLOOR)  # log p + H (p = 0 below the floor: 0, never 0·inf)
    dz.exp_()  # p
    keep = dz >= grad_filter_eps if grad_filter_eps > 0.0 else None
    z.mul_(-e_rows).sub_(g_rows[:, None])  # z <- −e (log p + H) − g, then dz = p · z, plus g at the target column
    dz.mul_(z)
    in_tile = (y_rows >= v0) & (y_rows < v1)
    if bool(in_tile.any()):
        hit = in_tile.nonzero().view(-1)
        dz.index_put_((hit, y_rows[hit] - v0), g_rows[hit], accumulate=True)
        if keep is not None:
            keep[hit, y_rows[hit] - v0] = True
    if keep is not None:
        dz = filtered(dz, keep)
    if mixed is not None:
        add_row_products(mixed[0], dz, w32, mixed[1])
    if d_weight is not None:
        d_weight[v0:v1].addmm_(dz.t(), h32)
    if d_bias is not None:
        dense = dz.layout == torch.strided
        d_bias[v0:v1].add_(dz.sum(dim=0) if dense else torch.mv(dz.t(), torch.ones_like(g_rows)))


def _cast_hidden_grad(d_hidden, hidden):
    return None if d_hidden is None else d_hidden.to(hidden.dtype)
