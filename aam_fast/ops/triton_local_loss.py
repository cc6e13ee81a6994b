"""Triton local-loss mode: a local token loss (GRPO's, SFT's) and its gradients in three products, not four.

When the loss's gradient with respect to each token's log-prob `ℓ_t` (and entropy `H_t`) is local, it is known as
soon as the token's logsumexp is, so the logits never need recomputing. Per chunk of tokens (``triton_chunks``):

1. the forward's logsumexp pass (``triton_forward``) with ``STORE_LOGITS``: one product computes each logits tile,
   folds it into the online logsumexp (and entropy moment) and writes ``z - m_tile`` into the chunk's ``[rows, V]``
   buffer (float16 for 16-bit operands, so a token that matters keeps its probability to ``|log p|·2⁻¹¹``);
   the target logit by the forward's indexed dot product; ``ℓ = z_y − lse``, ``H = lse − mean_z``;
2. ``token_grads`` gives ``g = ∂L/∂ℓ`` and ``e = ∂L/∂H`` for the chunk's rows, exactly as for the torch backend;
3. ``_dz_in_place_kernel`` reads each stored tile back and overwrites it, element for element, with
   ``dZ = s·[g (onehot − p) − e p (log p + H)]`` in the input dtype (``s = 1/τ``, ``p = exp(z − lse)``; float16 dZ
   divided by a power of two bounding it); the target column takes ``s·[g q − e p_y (ℓ + H)]`` with
   ``q = 1 − p_y = −expm1(ℓ)`` from the exact ``ℓ``, so a near-certain token does not cancel. Float32 column sums per
   token block give ``d_bias``; with ``grad_filter_eps`` it flags the blocks holding a ``p ≥ eps`` (or a NaN);
4. ``d_hidden[chunk] = dZ W`` and ``d_weight (+)= dZᵀ h[chunk]`` as cuBLAS products (``triton_chunks``).

The log-probs and entropies are the forward's numbers (the same kernel, config and epilogue as ``linear_logprobs``).
Nothing is reduced with atomics: two runs give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_chunks as chunks
from .params import LogprobParams
from .torch_chunked import TokenGrads
from .triton_forward import device_context, launch_target_logit, lse_pass, tile_indices
from .triton_tuning import choose_tile_configs, running_in_interpreter

# The in-place pass is memory-bound (one read and one write of the buffer): a fixed tile, not tuned (re-running it
# to time it would read its own output).
_IN_PLACE_TILE = (64, 128, 8)  # block_n, block_v, num_warps
_INTERPRETER_IN_PLACE_TILE = (16, 32, 4)


@triton.jit
def _dz_in_place_kernel(
    stored_ptr,
    dz_ptr,
    tile_max_ptr,
    targets_ptr,
    lse_ptr,
    mean_z_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    target_grad_ptr,
    bias_part_ptr,
    keep_ptr,
    n_rows,
    vocab,
    stride_row,
    stride_tile_max,
    inv_temperature,
    dz_scale,
    filter_eps,
    STORED_BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One (token block, vocab block) tile: ``z = stored + m_tile`` -> ``dZ * dz_scale`` written over the stored
    entries (``stored_ptr`` and ``dz_ptr`` address the same memory in the storage and the input dtype); column
    sums of dZ into ``bias_part[token block]``; with FILTER, whether the tile has a ``p >= eps`` (or NaN)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows64, cols64, row_mask, col_mask, tile_mask = tile_indices(pid_n, pid_v, n_rows, vocab, BLOCK_N, BLOCK_V)
    offsets = rows64[:, None] * stride_row + cols64[None, :]
    # the buffer's padded rows (stride_row, a multiple of 16) bound the load and store: a mask uniform over 16
    # columns keeps them vectorised at a ragged V; the padding's values are computed but never summed or read
    io_mask = row_mask[:, None] & (cols64 < stride_row)[None, :]

    stored = tl.load(stored_ptr + offsets, mask=io_mask, other=0.0).to(tl.float32)
    tile_max = tl.load(
        tile_max_ptr + rows64[:, None] * stride_tile_max + (cols64 // STORED_BLOCK_V)[None, :],
        mask=io_mask,
        other=0.0,
    )
    z = stored + tile_max
    lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
    p = tl.where(tile_mask, tl.exp(z - lse[:, None]), 0.0)
    g = tl.load(grad_logp_ptr + rows64, mask=row_mask, other=0.0)
    dz = -g[:, None] * p
    if WITH_ENTROPY:
        e = tl.load(grad_entropy_ptr + rows64, mask=row_mask, other=0.0)
        mean_z = tl.load(mean_z_ptr + rows64, mask=row_mask, other=0.0)
        # p = 0 where z = -inf (a masked entry): its term is 0, not 0 * inf; a NaN p keeps its NaN (NaN != 0)
        dz += e[:, None] * tl.where(p == 0.0, 0.0, p * (mean_z[:, None] - z))
    dz = dz * inv_temperature
    target = tl.load(targets_ptr + rows64, mask=row_mask, other=-1)
    target_grad = tl.load(target_grad_ptr + rows64, mask=row_mask, other=0.0)
    dz = tl.where(cols64[None, :] == target[:, None], target_grad[:, None], dz)
    dz = tl.where(tile_mask, dz, 0.0)

    tl.store(dz_ptr + offsets, (dz * dz_scale).to(dz_ptr.dtype.element_ty), mask=io_mask)
    if COMPUTE_DB:
        tl.store(bias_part_ptr + pid_n.to(tl.int64) * vocab + cols64, tl.sum(dz, axis=0), mask=col_mask)
    if FILTER:
        # kept where p >= eps or p is NaN: not (p < eps); the caller keeps the blocks that hold a target
        flag = tl.max(tl.max(tl.where(p < filter_eps, 0, 1), axis=1), axis=0)
        tl.store(keep_ptr + pid_n * tl.num_programs(1) + pid_v, flag.to(tl.int8))


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the logits pass stores ``z - m_tile`` as: float16 for 16-bit operands (same size as the dZ written over
    it, 8 more bits of mantissa than bfloat16 for entries that are never positive), float32 for float32."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def in_place_tile() -> tuple[int, int, int]:
    return _INTERPRETER_IN_PLACE_TILE if running_in_interpreter() else _IN_PLACE_TILE


def dz_in_place_launch(dz, stored, tile_max, stored_block_v, vectors, inv_temperature, dz_scale, filter_eps, db):
    """``(grid, args, kwargs)`` of one ``_dz_in_place_kernel`` launch over a chunk: ``dz`` and ``stored`` views of
    one ``[rows, V]`` buffer, ``vectors = (targets, lse, mean_z, grad_logp, grad_entropy, target_grad)`` of the
    chunk (contiguous; ``mean_z``, ``grad_entropy`` None without entropy gradients). Allocates the bias column
    sums (``args[9]``) and the filter flags (``args[10]``)."""
    rows, vocab = dz.shape
    block_n, block_v, num_warps = in_place_tile()
    grid = (triton.cdiv(rows, block_n), triton.cdiv(vocab, block_v))
    targets, lse, mean_z, grad_logp, grad_entropy, target_grad = vectors
    bias_part = torch.empty(grid[0], vocab, dtype=torch.float32, device=dz.device) if db else lse
    keep = torch.empty(grid, dtype=torch.int8, device=dz.device) if filter_eps > 0.0 else lse
    with_entropy = grad_entropy is not None
    args = (
        stored, dz, tile_max, targets, lse, mean_z if with_entropy else lse, grad_logp,
        grad_entropy if with_entropy else lse, target_grad, bias_part, keep, rows, vocab, dz.stride(0),
        tile_max.stride(0), float(inv_temperature), float(dz_scale), float(filter_eps),
    )  # fmt: skip
    kwargs = dict(
        STORED_BLOCK_V=stored_block_v,
        WITH_ENTROPY=with_entropy,
        COMPUTE_DB=db,
        FILTER=filter_eps > 0.0,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grid, args, kwargs


def target_column_grad(logp, entropy, g, e, inv_temperature: float) -> torch.Tensor:
    """``s·[g q − e p_y (ℓ + H)]`` per row, ``q = 1 − p_y = −expm1(ℓ)``: the target entry of dZ without cancelling."""
    grad = g * (-torch.expm1(logp))
    if e is not None:
        grad = grad - e * logp.exp() * (logp + entropy)
    return (grad * inv_temperature).float().contiguous()


def _chunk_logprobs(hidden, weight, bias, targets, stored, params: LogprobParams):
    """Step 1 on one chunk: ``(logp, entropy or None, lse, mean_z or None, tile_max, block_v)``, each ``[rows]``
    float32 (the forward's numbers), the logits tiles stored into ``stored``."""
    inv_temperature, with_entropy = float(params.inv_temperature), bool(params.with_entropy)
    lse, mean_z, tile_max, block_v = lse_pass(hidden, weight, bias, inv_temperature, with_entropy, stored)
    target_logit = launch_target_logit(hidden, weight, bias, targets, inv_temperature)
    logp = target_logit - lse
    entropy = lse - mean_z if with_entropy else None
    return logp, entropy, lse, mean_z, tile_max, block_v


def triton_local_loss(hidden, weight, bias, targets, token_grads: TokenGrads, params: LogprobParams, needs):
    """The Triton backend's ``local_loss`` entry (module docstring). Inputs follow the backend contract (every
    target in ``[0, V)``, unit inner strides); ``needs`` = (hidden, weight, bias) flags. Returns ``(logp [N] f32,
    entropy [N] f32 or None, d_hidden [N, D] in hidden.dtype or None, d_weight [V, D] in the input dtype (float32
    where ``triton_chunks`` accumulates so) or None, d_bias [V] f32 or None)``."""
    needs_hidden, needs_weight, needs_bias = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    inv_temperature, eps = float(params.inv_temperature), float(params.grad_filter_eps or 0.0)
    compute_db = needs_bias and bias is not None
    wants_grads = needs_hidden or needs_weight or compute_db
    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device) if params.with_entropy else None
    configs = choose_tile_configs(n_rows, hidden.dtype, device, backward=False, store=True)
    granule = max(c.block_n for c in configs)
    weight_grad_bytes = 4 * vocab * dim if needs_weight and hidden.element_size() < 4 else 0
    # the budget bounds dZ, as in the backward; the tile maxima (4 bytes per row and vocab tile) come on top
    plan = chunks.plan_chunks(n_rows, vocab * hidden.element_size(), granule, weight_grad_bytes)
    buffer = chunks.dz_buffer(min(plan.rows, n_rows), vocab, hidden.dtype, device)
    d_hidden = torch.empty(n_rows, dim, dtype=hidden.dtype, device=device) if needs_hidden else None
    d_weight = chunks.new_weight_grad(vocab, dim, hidden.dtype, plan, device) if needs_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if compute_db else None
    stats = {"blocks": 0, "skipped": 0}
    with device_context(device):
        for r0 in range(0, n_rows, plan.rows):
            r1 = min(n_rows, r0 + plan.rows)
            dz = buffer[: r1 - r0]
            stored = dz.view(storage_dtype(hidden.dtype))
            h, y = hidden[r0:r1], targets[r0:r1].contiguous()
            logp_rows, entropy_rows, lse, mean_z, tile_max, block_v = _chunk_logprobs(
                h, weight, bias, y, stored, params
            )
            logp[r0:r1] = logp_rows
            if entropy is not None:
                entropy[r0:r1] = entropy_rows
            g, e = token_grads(r0, r1, logp_rows, entropy_rows)
            if not wants_grads:
                continue
            g = g.float().contiguous()
            e = None if e is None else e.float().contiguous()
            dz_scale = chunks.fp16_dz_scale(g, e, vocab, inv_temperature) if hidden.dtype == torch.float16 else 1.0
            vectors = (y, lse, mean_z, g, e, target_column_grad(logp_rows, entropy_rows, g, e, inv_temperature))
            grid, args, kwargs = dz_in_place_launch(
                dz, stored, tile_max, block_v, vectors, inv_temperature, 1.0 / dz_scale, eps, compute_db
            )
            _dz_in_place_kernel[grid](*args, **kwargs)
            if compute_db:
                d_bias += args[9].sum(dim=0)
            cols = chunks.kept_columns(args[10], kwargs["BLOCK_V"], y, vocab, stats) if eps > 0.0 else None
            d_hidden_rows = None if d_hidden is None else d_hidden[r0:r1]
            chunks.chunk_products(dz, h, weight, cols, dz_scale, d_hidden_rows, d_weight, accumulate=r0 > 0)
    if eps > 0.0 and wants_grads:
        chunks.last_filter_stats.update(stats)
    return logp, entropy, d_hidden, d_weight, d_bias
