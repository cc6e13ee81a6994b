"""Triton backward of the fused linear log-prob op: recompute each logits tile, never store [N, V].

With ``z = (h W^T + b) * inv_temperature``, ``p = exp(z - lse)``, upstream ``g = dL/d logp`` (``logp = z[y] - lse``)
and ``e = dL/dH`` (``H = lse - mean_z``):

    dL/dz = g * (onehot(y) - p) + e * p * (mean_z - z)

(the entropy term from ``dH/dz_v = -p_v (z_v - mean_z)``). Each program owns one (token block x vocab block) tile:
it recomputes ``z``, forms ``dz = inv_temperature * dL/dz`` in float32, then walks D in chunks adding
``dz @ W_tile`` into ``d_hidden`` rows and ``dz^T @ h_tile`` into ``d_weight`` rows with float32 atomics;
``d_bias`` gets the column sums of ``dz``. With gradient filtering on, a tile whose probabilities are all below
``filter_eps`` and which holds no target is skipped after its recompute (its ``dz`` entries are each at most
``filter_eps`` times the row's upstream gradients): on a peaked softmax most tiles are, and their two products and
atomics are saved.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .triton_forward import logits_tile
from .triton_tuning import TileConfig, autotune_enabled, choose_tile_configs, dot_precision, tuned_launch, tuning_key


@triton.jit
def _backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    mean_z_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    d_hidden_ptr,
    d_weight_ptr,
    d_bias_ptr,
    n_rows,
    vocab,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_b,
    stride_t,
    stride_lse,
    stride_mz,
    stride_gl,
    stride_ge,
    inv_temperature,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    SCALE_DZ: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (token block, vocab block) tile: recompute z, form dz, atomically add its products into the grads."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < vocab
    tile_mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    # Recompute the logits tile.
    acc = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows64, row_mask, cols64, col_mask, dim,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    z = acc * inv_temperature

    lse = tl.load(lse_ptr + rows64 * stride_lse, mask=row_mask, other=0.0)
    # z <= lse holds exactly; the clamp keeps padded rows (lse read as 0) from overflowing exp.
    p = tl.where(tile_mask, tl.exp(tl.minimum(z - lse[:, None], 0.0)), 0.0)

    if HAS_GRAD_LOGP:
        target = tl.load(targets_ptr + rows64 * stride_t, mask=row_mask, other=-1)
        is_target = cols64[None, :] == target[:, None]
    if FILTER:
        kept = tl.max(tl.max(p, axis=1), axis=0) >= filter_eps
        if HAS_GRAD_LOGP:
            kept = kept | (tl.max(tl.max(tl.where(is_target & tile_mask, 1, 0), axis=1), axis=0) > 0)
        if not kept:
            return

    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + rows64 * stride_gl, mask=row_mask, other=0.0)
        dz += g[:, None] * (tl.where(is_target, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        e = tl.load(grad_entropy_ptr + rows64 * stride_ge, mask=row_mask, other=0.0)
        mean_z = tl.load(mean_z_ptr + rows64 * stride_mz, mask=row_mask, other=0.0)
        dz += e[:, None] * p * (mean_z[:, None] - z)
    dz = tl.where(tile_mask, dz * inv_temperature, 0.0)

    if COMPUTE_DB:
        tl.atomic_add(d_bias_ptr + cols64, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")

    if COMPUTE_DH or COMPUTE_DW:
        if SCALE_DZ:
            # float16 operands: divide the tile by its largest |dz| so the cast neither flushes small gradients to
            # zero nor overflows large ones; the float32 products are scaled back.
            tile_scale = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
            tile_scale = tl.where(tile_scale > 0.0, tile_scale, 1.0)
            dz_mm = (dz / tile_scale).to(hidden_ptr.dtype.element_ty)
        else:
            tile_scale = 1.0
            dz_mm = dz.to(hidden_ptr.dtype.element_ty)
        num_d_chunks = tl.cdiv(dim, BLOCK_D)
        for chunk in range(0, num_d_chunks):
            # Programs running side by side share a vocab block; rotating their D order by token block spreads
            # their d_weight atomics over different addresses.
            d64 = (((chunk + pid_n) % num_d_chunks) * BLOCK_D + offs_d).to(tl.int64)
            d_mask = d64 < dim
            if COMPUTE_DH:
                w = tl.load(
                    weight_ptr + cols64[:, None] * stride_wv + d64[None, :] * stride_wd,
                    mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                d_h = tl.dot(dz_mm, w, input_precision=DOT_PRECISION) * tile_scale
                tl.atomic_add(
                    d_hidden_ptr + rows64[:, None] * dim + d64[None, :],
                    d_h,
                    mask=row_mask[:, None] & d_mask[None, :],
                    sem="relaxed",
                )
            if COMPUTE_DW:
                h = tl.load(
                    hidden_ptr + rows64[:, None] * stride_hn + d64[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                d_w = tl.dot(tl.trans(dz_mm), h, input_precision=DOT_PRECISION) * tile_scale
                tl.atomic_add(
                    d_weight_ptr + cols64[:, None] * dim + d64[None, :],
                    d_w,
                    mask=col_mask[:, None] & d_mask[None, :],
                    sem="relaxed",
                )


def triton_backward(
    hidden,
    weight,
    bias,
    targets,
    lse,
    mean_z,
    grad_logp,
    grad_entropy,
    params,
    needs,
):
    """Fused backward. Inputs as in ``triton_forward`` plus its saved ``lse`` and ``mean_z`` [N] float32 and the
    upstream ``grad_logp`` (dL/d logp) and ``grad_entropy`` (dL/dH) [N] float32, any strides (expanded gradients with
    stride 0 are fine); either gradient may be None, meaning zero.

    Returns ``(d_hidden [N, D] in hidden.dtype, d_weight [V, D] float32, d_bias [V] float32)``, each None when not
    needed (``d_bias`` also when ``bias`` is None): ``d_hidden = inv_temperature * dz @ W``,
    ``d_weight = inv_temperature * dz^T @ hidden``, ``d_bias = inv_temperature * dz.sum(0)`` with
    ``dz = grad_logp * (onehot(y) - p) + grad_entropy * p * (mean_z - z)``. With ``grad_filter_eps > 0`` the tiles
    whose ``p`` are all below it and that hold no target are skipped.
    """
    inv_temperature, grad_filter_eps = params.inv_temperature, params.grad_filter_eps
    needs_hidden_grad, needs_weight_grad, needs_bias_grad = needs
    if grad_entropy is not None and mean_z is None:
        raise ValueError("triton_backward: grad_entropy was given but mean_z is None (forward ran without entropy)")
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    compute_db = needs_bias_grad and bias is not None
    d_hidden = torch.zeros(n_rows, dim, dtype=torch.float32, device=device) if needs_hidden_grad else None
    d_weight = torch.zeros(vocab, dim, dtype=torch.float32, device=device) if needs_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if compute_db else None

    has_upstream = grad_logp is not None or grad_entropy is not None
    if n_rows > 0 and has_upstream and (needs_hidden_grad or needs_weight_grad or compute_db):
        has_bias = bias is not None
        dummy = lse  # stands in for absent tensors; never read or written when its flag is off

        def launch(config: TileConfig) -> None:
            grid = (triton.cdiv(n_rows, config.block_n), triton.cdiv(vocab, config.block_v))
            _backward_kernel[grid](
                hidden,
                weight,
                bias if has_bias else dummy,
                targets,
                lse,
                mean_z if grad_entropy is not None else dummy,
                grad_logp if grad_logp is not None else dummy,
                grad_entropy if grad_entropy is not None else dummy,
                d_hidden if d_hidden is not None else dummy,
                d_weight if d_weight is not None else dummy,
                d_bias if d_bias is not None else dummy,
                n_rows,
                vocab,
                dim,
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                bias.stride(0) if has_bias else 0,
                targets.stride(0),
                lse.stride(0),
                mean_z.stride(0) if grad_entropy is not None else 0,
                grad_logp.stride(0) if grad_logp is not None else 0,
                grad_entropy.stride(0) if grad_entropy is not None else 0,
                float(inv_temperature),
                float(grad_filter_eps),
                HAS_BIAS=has_bias,
                HAS_GRAD_LOGP=grad_logp is not None,
                WITH_ENTROPY=grad_entropy is not None,
                COMPUTE_DH=needs_hidden_grad,
                COMPUTE_DW=needs_weight_grad,
                COMPUTE_DB=compute_db,
                SCALE_DZ=hidden.dtype == torch.float16,
                FILTER=grad_filter_eps > 0.0,
                BLOCK_N=config.block_n,
                BLOCK_V=config.block_v,
                BLOCK_D=config.block_d,
                DOT_PRECISION=dot_precision(hidden.dtype),
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )

        def reset() -> None:  # the timed runs of the autotuner accumulate into the outputs
            for grad in (d_hidden, d_weight, d_bias):
                if grad is not None:
                    grad.zero_()

        configs = choose_tile_configs(n_rows, hidden.dtype, device, backward=True)
        flags = (has_bias, grad_logp is not None, grad_entropy is not None, needs_hidden_grad, needs_weight_grad,
                 compute_db, grad_filter_eps > 0.0)  # fmt: skip
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            key = tuning_key("backward", device, hidden.dtype, n_rows, dim, vocab, *flags)
            tuned_launch(key, configs, launch, tune=autotune_enabled(device), reset=reset)

    if d_hidden is not None and d_hidden.dtype != hidden.dtype:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_weight, d_bias
