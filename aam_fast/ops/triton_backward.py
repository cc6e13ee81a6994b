"""Triton backward of the fused linear log-prob op: a fused logits-gradient kernel, then two cuBLAS products.

With ``z = (h W^T + b) * s`` (``s = inv_temperature``), ``p = exp(z - lse)``, upstream ``g = dL/d logp``
(``logp = z[y] - lse``) and ``e = dL/dH`` (``H = lse - mean_z``):

    dL/dz = g * (onehot(y) - p) + e * p * (mean_z - z)

(the entropy term from ``dH/dz_v = -p_v (z_v - mean_z)``; where ``p = 0`` the term is 0 even for ``z = -inf``, a
masked vocabulary entry). The tokens are processed in chunks of ``C`` rows, the largest whose ``[C, V]``
logits-gradient buffer fits ``AAM_FAST_TRITON_CHUNK_MB`` (``triton_chunks``, which also holds the products and the
chunk policy shared with the local-loss mode). Per chunk:

1. ``_dz_kernel`` recomputes every ``(token block, vocab block)`` logits tile (one product), applies the saved
   logsumexp and writes ``dZ = s * dL/dz`` in the input dtype into the buffer, plus float32 column sums per token
   block for ``d_bias``. Its 1-D grid runs ``GROUP_N`` token blocks side by side over each vocab block, so a weight
   tile is read from HBM once per group and the group's hidden rows stay in L2.
2. ``d_hidden[chunk] = dZ W`` and ``d_weight (+)= dZ^T h[chunk]`` as two cuBLAS products (a single chunk writes
   ``d_weight`` in the input dtype directly; see ``triton_chunks`` for the accumulation across chunks).

Nothing is reduced with atomics, so two runs give bit-equal gradients. NaN or infinity anywhere in a row's logits
propagates into that row's gradients and, through ``dZ^T h``, into ``d_weight``, exactly as with materialised
logits. float16 operands: ``dZ`` is stored divided by a power-of-two bound of its magnitude (so it cannot overflow)
and the products multiply it back in their float32 epilogue (``alpha``).

With gradient filtering (``grad_filter_eps > 0``) the kernel also flags each ``(token block, vocab block)`` tile
that holds a probability ``>= eps`` or a NaN; the vocab blocks unflagged over the whole chunk and holding none of
its targets are dropped from both products (their ``dZ`` entries are each below ``eps * (|g| + |e| (H + 1)) * s``).
On GPU tiles (a chunk of thousands of tokens x 128 columns) only a vocabulary that no token of the chunk finds
likely is skipped: a rare-token tail, never any block of a head without one (see the README).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunks import (
    chunk_products,
    dz_buffer,
    fp16_dz_scale,
    kept_columns,
    last_filter_stats,
    new_weight_grad,
    plan_chunks,
)
from .triton_forward import device_context, logits_tile, tile_indices
from .triton_tuning import (
    TileConfig,
    autotune_enabled,
    choose_tile_configs,
    dot_precision,
    tuned_launch,
    tuning_key,
)


@triton.jit
def _dz_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    mean_z_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    dz_ptr,
    bias_part_ptr,
    keep_ptr,
    n_rows,
    vocab,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_b,
    stride_dz,
    inv_temperature,
    dz_scale,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (token block, vocab block) tile of a chunk: recompute z, write dz * dz_scale in dz's dtype; column sums
    of dz (float32) into ``bias_part[token block]``; with FILTER, whether the tile has anything to keep.

    Per-row vectors (lse, mean_z, g, e, targets) are contiguous; the grid is 1-D, grouped by GROUP_N token blocks.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n_rows, BLOCK_N)
    num_pid_v = tl.cdiv(vocab, BLOCK_V)
    in_group = GROUP_N * num_pid_v
    first_n = (pid // in_group) * GROUP_N
    rows_in_group = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % rows_in_group
    pid_v = (pid % in_group) // rows_in_group
    rows64, cols64, row_mask, col_mask, tile_mask = tile_indices(pid_n, pid_v, n_rows, vocab, BLOCK_N, BLOCK_V)

    acc = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows64, row_mask, cols64, col_mask, dim,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
    )  # fmt: skip
    z = acc * inv_temperature
    lse = tl.load(lse_ptr + rows64, mask=row_mask, other=0.0)
    # No clamp: a NaN logit (or lse) must give a NaN p, as a materialised softmax does. Masked lanes may overflow
    # exp; `where` discards them.
    p = tl.where(tile_mask, tl.exp(z - lse[:, None]), 0.0)

    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_GRAD_LOGP:
        target = tl.load(targets_ptr + rows64, mask=row_mask, other=-1)
        is_target = cols64[None, :] == target[:, None]
        g = tl.load(grad_logp_ptr + rows64, mask=row_mask, other=0.0)
        dz += g[:, None] * (tl.where(is_target, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        e = tl.load(grad_entropy_ptr + rows64, mask=row_mask, other=0.0)
        mean_z = tl.load(mean_z_ptr + rows64, mask=row_mask, other=0.0)
        # p = 0 where z = -inf (a masked entry): its term is 0, not 0 * inf; a NaN p keeps its NaN (NaN != 0)
        dz += e[:, None] * tl.where(p == 0.0, 0.0, p * (mean_z[:, None] - z))
    dz = tl.where(tile_mask, dz * inv_temperature, 0.0)

    tl.store(
        dz_ptr + rows64[:, None] * stride_dz + cols64[None, :],
        (dz * dz_scale).to(dz_ptr.dtype.element_ty),
        mask=tile_mask,
    )
    if COMPUTE_DB:
        tl.store(bias_part_ptr + pid_n.to(tl.int64) * vocab + cols64, tl.sum(dz, axis=0), mask=col_mask)
    if FILTER:
        # keep where p >= eps or p is NaN (which must reach the gradients): not (p < eps). Masked lanes hold p = 0;
        # the blocks holding a target are kept by the caller.
        flag = tl.max(tl.max(tl.where(p < filter_eps, 0, 1), axis=1), axis=0)
        tl.store(keep_ptr + pid_n * num_pid_v + pid_v, flag.to(tl.int8))


def dz_launch(
    hidden,
    weight,
    bias,
    targets,
    lse,
    mean_z,
    grad_logp,
    grad_entropy,
    dz,
    inv_temperature: float,
    dz_scale: float,
    filter_eps: float,
    compute_db: bool,
    config: TileConfig,
):
    """``(grid, args, kwargs)`` of one ``_dz_kernel`` launch over a chunk (all tensors already sliced to it; the
    per-row vectors contiguous float32, ``mean_z`` / ``grad_logp`` / ``grad_entropy`` None when absent). Allocates
    the bias column-sum partials (``args[9]``) and the filter flags (``args[10]``). ``bench.sm90_resources``
    compiles this very call on meta tensors."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    num_pid_n = triton.cdiv(rows, config.block_n)
    num_pid_v = triton.cdiv(vocab, config.block_v)
    filtering = filter_eps > 0.0
    bias_part = torch.empty(num_pid_n, vocab, dtype=torch.float32, device=device) if compute_db else lse
    keep = torch.empty(num_pid_n, num_pid_v, dtype=torch.int8, device=device) if filtering else lse
    has_bias = bias is not None
    args = (
        hidden,
        weight,
        bias if has_bias else lse,
        targets,
        lse,
        mean_z if mean_z is not None else lse,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        dz,
        bias_part,
        keep,
        rows,
        vocab,
        dim,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if has_bias else 0,
        dz.stride(0),
        float(inv_temperature),
        float(dz_scale),
        float(filter_eps),
    )
    kwargs = dict(
        HAS_BIAS=has_bias,
        HAS_GRAD_LOGP=grad_logp is not None,
        WITH_ENTROPY=grad_entropy is not None,
        COMPUTE_DB=compute_db,
        FILTER=filtering,
        GROUP_N=config.group_n,
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_D=config.block_d,
        DOT_PRECISION=dot_precision(hidden.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return (num_pid_n * num_pid_v,), args, kwargs


def _row_vectors(targets, lse, mean_z, grad_logp, grad_entropy):
    """The per-row vectors as the kernel reads them: contiguous, float32 (a backend may keep ``lse`` in float64),
    ``mean_z`` only when entropy gradients flow."""
    contiguous32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    mean_z = None if grad_entropy is None else mean_z
    return (
        targets.contiguous(),
        contiguous32(lse),
        contiguous32(mean_z),
        contiguous32(grad_logp),
        contiguous32(grad_entropy),
    )


def triton_backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params, needs):
    """Fused backward. hidden ``[N, D]``, weight ``[V, D]`` (same dtype, unit inner stride), bias ``[V]`` or None,
    targets ``[N]`` in ``[0, V)``, the forward's ``lse`` and ``mean_z`` ``[N]``, upstream ``grad_logp`` (dL/d logp) and
    ``grad_entropy`` (dL/dH) ``[N]`` (either may be None, meaning zero), ``params`` a ``LogprobParams``
    (``inv_temperature``, ``grad_filter_eps``), ``needs`` three bools (hidden, weight, bias gradients wanted).

    Returns ``(d_hidden [N, D] in hidden.dtype, d_weight [V, D], d_bias [V] float32)``, each None when not needed
    (``d_bias`` also when ``bias`` is None); ``d_weight`` is in the input dtype, or float32 where ``triton_chunks``
    accumulates it so. ``d_hidden = dZ W``, ``d_weight = dZ^T hidden``, ``d_bias = dZ.sum(0)``, ``dZ = s * dL/dz``
    (module doc).
    """
    if grad_entropy is not None and mean_z is None:
        raise ValueError("triton_backward: grad_entropy was given but mean_z is None (forward ran without entropy)")
    needs_hidden, needs_weight, needs_bias = needs
    inv_temperature = float(params.inv_temperature)
    eps = float(params.grad_filter_eps or 0.0)
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    compute_db = needs_bias and bias is not None
    has_upstream = grad_logp is not None or grad_entropy is not None
    if n_rows == 0 or not has_upstream or not (needs_hidden or needs_weight or compute_db):
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return (
            zeros(n_rows, dim, dtype=hidden.dtype) if needs_hidden else None,
            zeros(vocab, dim) if needs_weight else None,
            zeros(vocab) if compute_db else None,
        )

    targets, lse, mean_z, grad_logp, grad_entropy = _row_vectors(targets, lse, mean_z, grad_logp, grad_entropy)
    dz_scale = fp16_dz_scale(grad_logp, grad_entropy, vocab, inv_temperature) if hidden.dtype == torch.float16 else 1.0

    configs = choose_tile_configs(n_rows, hidden.dtype, device, backward=True)
    weight_grad_bytes = 4 * vocab * dim if needs_weight and hidden.element_size() < 4 else 0
    plan = plan_chunks(n_rows, vocab * hidden.element_size(), max(c.block_n for c in configs), weight_grad_bytes)
    dz_buf = dz_buffer(plan.rows, vocab, hidden.dtype, device)
    d_hidden = torch.empty(n_rows, dim, dtype=hidden.dtype, device=device) if needs_hidden else None
    d_weight = new_weight_grad(vocab, dim, hidden.dtype, plan, device) if needs_weight else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if compute_db else None
    filtering = eps > 0.0
    stats = {"blocks": 0, "skipped": 0}
    flags = (bias is not None, grad_logp is not None, grad_entropy is not None, compute_db, filtering)

    per_row = (mean_z, grad_logp, grad_entropy)
    for r0 in range(0, n_rows, plan.rows):
        r1 = min(n_rows, r0 + plan.rows)
        dz = dz_buf[: r1 - r0]
        extras = {}

        def launch(config: TileConfig, r0=r0, r1=r1, dz=dz, extras=extras) -> None:
            vectors = (targets[r0:r1], lse[r0:r1]) + tuple(None if t is None else t[r0:r1] for t in per_row)
            grid, args, kwargs = dz_launch(
                hidden[r0:r1], weight, bias, *vectors, dz, inv_temperature, 1.0 / dz_scale, eps, compute_db, config
            )
            extras.update(bias_part=args[9], keep=args[10], block_v=config.block_v)
            _dz_kernel[grid](*args, **kwargs)

        with device_context(device):
            key = tuning_key("dz", device, hidden.dtype, r1 - r0, dim, vocab, *flags)
            tuned_launch(key, configs, launch, tune=autotune_enabled(device))  # dz is overwritten: no reset

        if compute_db:
            d_bias += extras["bias_part"].sum(dim=0)
        cols = None
        if filtering:
            chunk_targets = targets[r0:r1] if grad_logp is not None else None
            cols = kept_columns(extras["keep"], extras["block_v"], chunk_targets, vocab, stats)
        d_hidden_rows = None if d_hidden is None else d_hidden[r0:r1]
        chunk_products(dz, hidden[r0:r1], weight, cols, dz_scale, d_hidden_rows, d_weight, accumulate=r0 > 0)
    if filtering:
        last_filter_stats.update(stats)
    return d_hidden, d_weight, d_bias
