"""Triton backward of the fused linear log-prob op: a fused logits-gradient kernel, then two cuBLAS products.

With ``z = (h W^T + b) * s`` (``s = inv_temperature``), ``p = exp(z - lse)``, upstream ``g = dL/d logp``
(``logp = z[y] - lse``) and ``e = dL/dH`` (``H = lse - mean_z``):

    dL/dz = g * (onehot(y) - p) + e * p * (mean_z - z)

(the entropy term from ``dH/dz_v = -p_v (z_v - mean_z)``). The tokens are processed in chunks of ``C`` rows, the
largest whose ``[C, V]`` logits-gradient buffer fits ``AAM_FAST_TRITON_CHUNK_MB`` (default: 1024 MB or the size of a
float32 ``[V, D]``, whichever is larger; see ``chunk_rows``). Per chunk:

1. ``_dz_kernel`` recomputes every ``(token block, vocab block)`` logits tile (one product), applies the saved
   logsumexp and writes ``dZ = s * dL/dz`` in the input dtype into the buffer, plus float32 column sums per token
   block for ``d_bias``. Its 1-D grid runs ``GROUP_N`` token blocks side by side over each vocab block, so a weight
   tile is read from HBM once per group and the group's hidden rows stay in L2.
2. ``d_hidden[chunk] = dZ W`` and ``d_weight (+)= dZ^T h[chunk]`` as two cuBLAS products (float32 accumulation of
   ``d_weight`` across chunks; a single chunk writes it in the input dtype directly).

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

import math
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .triton_forward import logits_tile
from .triton_tuning import (
    TileConfig,
    autotune_enabled,
    choose_tile_configs,
    dot_precision,
    tuned_launch,
    tuning_key,
)

CHUNK_ENV = "AAM_FAST_TRITON_CHUNK_MB"
DEFAULT_CHUNK_MB = 1024.0

# What the last filtered backward skipped: vocab blocks over all chunks, and how many there were (diagnostics for
# the tests and the benchmarks; not part of the op's contract).
last_filter_stats = {"blocks": 0, "skipped": 0}


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

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < vocab
    tile_mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

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
        dz += e[:, None] * p * (mean_z[:, None] - z)
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


def chunk_rows(n_rows: int, vocab: int, element_size: int, granule: int, weight_grad_bytes: int = 0) -> int:
    """Rows per chunk: the most whose ``[rows, V]`` dZ buffer fits the budget, a multiple of ``granule`` (the
    kernel's token block) and at least one granule; ``n_rows`` when everything fits.

    The budget is ``AAM_FAST_TRITON_CHUNK_MB`` when set, else the larger of 1024 MB and ``weight_grad_bytes`` (the
    float32 ``[V, D]`` weight gradient that a chunked 16-bit backward accumulates into): a dZ buffer that size
    adds no more to the peak than that accumulator and its cast do, and one chunk writes d_weight directly in the
    input dtype (at N=8192, D=4096, V=128256 in bfloat16: one chunk, 2.1 GB of dZ).
    """
    raw = os.environ.get(CHUNK_ENV, "")
    try:
        budget_mb = float(raw) if raw else max(DEFAULT_CHUNK_MB, weight_grad_bytes / 2**20)
    except ValueError:
        budget_mb = float("nan")
    if not (budget_mb > 0 and math.isfinite(budget_mb)):
        raise ValueError(f"{CHUNK_ENV} must be a positive number of megabytes, got {raw!r}")
    rows = int(budget_mb * 2**20) // (vocab * element_size)
    rows = max(granule, rows // granule * granule)
    return min(rows, n_rows)


def _fp16_dz_scale(grad_logp, grad_entropy, vocab: int, inv_temperature: float) -> float:
    """A power of two ``2^k >= max_t (|g_t| + |e_t| (log V + 1)) * s``, a bound on ``|dZ|`` (``|p - onehot| <= 1``,
    ``|p (mean_z - z)| <= H + 1/e <= log V + 1``); float16 dZ is stored divided by it. One host sync per backward."""
    bound = torch.zeros((), dtype=torch.float32, device=(grad_logp if grad_logp is not None else grad_entropy).device)
    if grad_logp is not None:
        bound = bound + grad_logp.abs().amax()
    if grad_entropy is not None:
        bound = bound + grad_entropy.abs().amax() * (math.log(vocab) + 1.0)
    value = float(bound) * inv_temperature
    if not math.isfinite(value) or value <= 0.0:
        return 1.0  # NaN/inf upstream propagates anyway; all-zero upstream writes zeros
    return 2.0 ** math.ceil(math.log2(value))


_FLOAT32_OUT_PRODUCTS = {"cuda": True}  # False once this torch refused `addmm(..., out_dtype=float32)`


def _mm_into(out, a, b, alpha: float, accumulate: bool) -> None:
    """``out = alpha * a @ b`` (``accumulate``: ``out += ...``). A float32 ``out`` with 16-bit ``a``, ``b`` is
    accumulated by cuBLAS in its float32 epilogue (``addmm(..., out_dtype=float32)``); a torch without that rounds
    each chunk's product to the input dtype before adding it. On CPU, float32 copies of the operands."""
    beta = 1.0 if accumulate else 0.0
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    elif not out.is_cuda:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=beta, alpha=alpha, out=out)
    else:
        if _FLOAT32_OUT_PRODUCTS["cuda"]:
            try:
                torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)
                return
            except (TypeError, RuntimeError, NotImplementedError):
                _FLOAT32_OUT_PRODUCTS["cuda"] = False
        product = torch.mm(a, b)
        if accumulate:
            out.add_(product, alpha=alpha)
        else:
            torch.mul(product, alpha, out=out)


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


def _kept_columns(keep, block_v: int, targets, vocab: int, stats: dict) -> torch.Tensor | None:
    """The vocabulary columns of a chunk's kept blocks (a block is skipped when no row of the chunk finds it likely
    and none targets it: ``targets`` given when the log-prob gradient is, whose target entry ``g·(1 − p)`` is never
    small), or None when every block is kept. Counts blocks and skipped blocks into ``stats``."""
    kept_blocks = keep.amax(dim=0).bool()
    if targets is not None:
        kept_blocks[targets // block_v] = True
    skipped = kept_blocks.numel() - int(kept_blocks.sum())
    stats["blocks"] += kept_blocks.numel()
    stats["skipped"] += skipped
    if not skipped:
        return None
    starts = kept_blocks.nonzero().view(-1) * block_v
    cols = (starts[:, None] + torch.arange(block_v, device=keep.device)).view(-1)
    return cols[cols < vocab]


def _chunk_products(dz, h, weight, cols, dz_scale: float, d_hidden_rows, d_weight, accumulate: bool) -> None:
    """The chunk's two cuBLAS products: ``d_hidden_rows = dZ W`` and ``d_weight (+)= dZᵀ h`` (each skipped when
    None), over the kept columns ``cols`` only when given."""
    dz_used, w_used = dz, weight
    if cols is not None:
        dz_used = dz.index_select(1, cols)
        w_used = weight.index_select(0, cols) if d_hidden_rows is not None else None
    if d_hidden_rows is not None:
        if cols is not None and cols.numel() == 0:
            d_hidden_rows.zero_()
        else:
            _mm_into(d_hidden_rows, dz_used, w_used, dz_scale, accumulate=False)
    if d_weight is None or (cols is not None and cols.numel() == 0):
        return
    if cols is None:
        _mm_into(d_weight, dz_used.t(), h, dz_scale, accumulate=accumulate)
    else:
        part = torch.zeros(cols.numel(), d_weight.shape[1], dtype=d_weight.dtype, device=d_weight.device)
        _mm_into(part, dz_used.t(), h, dz_scale, accumulate=False)
        d_weight[cols] += part


def triton_backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params, needs):
    """Fused backward. hidden ``[N, D]``, weight ``[V, D]`` (same dtype, unit inner stride), bias ``[V]`` or None,
    targets ``[N]`` in ``[0, V)``, the forward's ``lse`` and ``mean_z`` ``[N]``, upstream ``grad_logp`` (dL/d logp) and
    ``grad_entropy`` (dL/dH) ``[N]`` (either may be None, meaning zero), ``params`` a ``LogprobParams``
    (``inv_temperature``, ``grad_filter_eps``), ``needs`` three bools (hidden, weight, bias gradients wanted).

    Returns ``(d_hidden [N, D] in hidden.dtype, d_weight [V, D], d_bias [V] float32)``, each None when not needed
    (``d_bias`` also when ``bias`` is None); ``d_weight`` is float32, or the weight's dtype when one chunk holds all
    rows. ``d_hidden = dZ W``, ``d_weight = dZ^T hidden``, ``d_bias = dZ.sum(0)``, ``dZ = s * dL/dz`` (module doc).
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
    dz_scale = _fp16_dz_scale(grad_logp, grad_entropy, vocab, inv_temperature) if hidden.dtype == torch.float16 else 1.0

    configs = choose_tile_configs(n_rows, hidden.dtype, device, backward=True)
    weight_grad_bytes = 4 * vocab * dim if needs_weight and hidden.element_size() < 4 else 0
    granule = max(c.block_n for c in configs)
    rows_per_chunk = chunk_rows(n_rows, vocab, hidden.element_size(), granule, weight_grad_bytes)
    single_chunk = rows_per_chunk >= n_rows
    padded_vocab = triton.cdiv(vocab, 8) * 8  # 16-byte aligned rows for cuBLAS
    dz_buf = torch.empty(rows_per_chunk, padded_vocab, dtype=hidden.dtype, device=device)

    d_hidden = torch.empty(n_rows, dim, dtype=hidden.dtype, device=device) if needs_hidden else None
    d_weight = None
    if needs_weight:
        d_weight = torch.zeros(vocab, dim, dtype=hidden.dtype if single_chunk else torch.float32, device=device)
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if compute_db else None
    has_bias = bias is not None
    filtering = eps > 0.0
    stats = {"blocks": 0, "skipped": 0}
    flags = (has_bias, grad_logp is not None, grad_entropy is not None, compute_db, filtering)

    per_row = (mean_z, grad_logp, grad_entropy)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        rows = r1 - r0
        h = hidden[r0:r1]
        dz = dz_buf[:rows, :vocab]
        extras = {}

        def launch(config: TileConfig, r0=r0, r1=r1, dz=dz, extras=extras) -> None:
            vectors = (targets[r0:r1], lse[r0:r1]) + tuple(None if t is None else t[r0:r1] for t in per_row)
            grid, args, kwargs = dz_launch(
                hidden[r0:r1], weight, bias, *vectors, dz, inv_temperature, 1.0 / dz_scale, eps, compute_db, config
            )
            extras.update(bias_part=args[9], keep=args[10], block_v=config.block_v)
            _dz_kernel[grid](*args, **kwargs)

        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            key = tuning_key("dz", device, hidden.dtype, rows, dim, vocab, *flags)
            tuned_launch(key, configs, launch, tune=autotune_enabled(device))  # dz is overwritten: no reset

        if compute_db:
            d_bias += extras["bias_part"].sum(dim=0)
        cols = None
        if filtering:
            chunk_targets = targets[r0:r1] if grad_logp is not None else None
            cols = _kept_columns(extras["keep"], extras["block_v"], chunk_targets, vocab, stats)
        d_hidden_rows = None if d_hidden is None else d_hidden[r0:r1]
        _chunk_products(dz, h, weight, cols, dz_scale, d_hidden_rows, d_weight, accumulate=r0 > 0)
    if filtering:
        last_filter_stats.update(stats)
    return d_hidden, d_weight, d_bias
