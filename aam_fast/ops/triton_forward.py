"""Triton forward of the fused linear log-prob op: logsumexp, target logit and entropy moment, no logits.

With ``z = (hidden @ weight.T + bias) * inv_temperature`` (never materialised) this computes per row
``lse = logsumexp_v z``, ``target_logit = z[y]`` and ``mean_z = sum_v softmax(z)_v z_v`` (the entropy is
``lse - mean_z``).

The vocabulary is split across programs: each program owns one token block and one vocab split, runs an online
logsumexp over the split's vocab tiles and writes a float32 partial (max, sum exp, sum p*z) per row; a cheap torch
epilogue combines the ``[splits, N]`` partials. The grid is 1-D and grouped: ``GROUP_N`` token blocks run side by
side over every split, so the programs resident at once share a few token blocks' hidden rows (in L2) and each
weight tile is fetched from HBM once per group. The number of splits is chosen so that the programs fill whole
waves of the device (``vocab_split``). The target logit is an indexed dot product ``h . W[y] (+ b[y])`` in a second
small kernel. The tile helpers here are shared with ``triton_backward``.

With ``STORE_LOGITS`` (the local-loss mode, ``triton_local_loss``) the same pass also keeps every logits tile: it
writes ``z - m_tile`` (``m_tile`` the tile's own row max, also written, one float32 per row and vocab tile) into a
``[N, V]`` buffer, in float16 for 16-bit operands. Every stored entry is ``<= 0`` and ``|z - m_tile| <= lse - z =
-log p``, so its rounding costs ``p`` a relative error of at most ``|log p| * 2^-11``: a token that matters is kept
almost exactly (materialised bfloat16 logits of size 20 lose about 4% of ``p``).

An entry ``z = -inf`` (a masked vocabulary entry, e.g. a bias of ``-inf``) has ``p = 0``; its ``p * z`` is taken
as 0, never ``0 * (-inf)``, so the entropy stays finite. A NaN logit still gives a NaN.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .triton_tuning import (
    TileConfig,
    autotune_enabled,
    choose_tile_configs,
    dot_precision,
    running_in_interpreter,
    tuned_launch,
    tuning_key,
)

# A finite "minus infinity" for running maxima: exp(NEG_LARGE - m) underflows to 0 and 0 * NEG_LARGE stays 0.
NEG_LARGE: tl.constexpr = tl.constexpr(-1.0e30)


H100_SMS = 132  # what ``multiprocessor_count`` assumes for meta tensors (the offline sm_90 check)


def multiprocessor_count(device: torch.device) -> int:
    """Number of SMs of ``device``; an H100/H200's for meta tensors; a small stand-in on CPU so the interpreter
    exercises several splits."""
    if device.type == "meta":
        return H100_SMS
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows64,
    row_mask,
    cols64,
    col_mask,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``h[rows] @ W[cols].T (+ b[cols])`` for one (token block, vocab block) tile, float32, D streamed in chunks.

    Shared by the forward and the backward kernels (the backward recomputes exactly these numbers). The temperature
    is applied by the caller; masked rows and columns read as 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        d64 = (d_start + offs_d).to(tl.int64)
        d_mask = d64 < dim
        h = tl.load(
            hidden_ptr + rows64[:, None] * stride_hn + d64[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols64[:, None] * stride_wv + d64[None, :] * stride_wd,
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols64 * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def tile_indices(pid_n, pid_v, n_rows, vocab, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(rows64, cols64, row_mask, col_mask, tile_mask)`` of the (token block ``pid_n``, vocab block ``pid_v``)
    tile: 64-bit row and column indices and their bounds."""
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_rows
    col_mask = cols < vocab
    return rows.to(tl.int64), cols.to(tl.int64), row_mask, col_mask, row_mask[:, None] & col_mask[None, :]


@triton.jit
def _lse_partials_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    part_max_ptr,
    part_sumexp_ptr,
    part_pz_ptr,
    logits_ptr,
    tile_max_ptr,
    n_rows,
    vocab,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_b,
    stride_logits,
    stride_tile_max,
    inv_temperature,
    vocab_per_split,
    num_splits,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (token block, vocab split): online max, sum exp(z - max) and sum exp(z - max) * z over its tiles; with
    STORE_LOGITS each tile's ``z - m_tile`` and ``m_tile`` too (module docstring).

    1-D grid of ``token blocks x num_splits`` programs in groups of GROUP_N token blocks, token block fastest.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n_rows, BLOCK_N)
    in_group = GROUP_N * num_splits
    first_n = (pid // in_group) * GROUP_N
    rows_in_group = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % rows_in_group
    pid_s = (pid % in_group) // rows_in_group
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)

    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)

    run_max = tl.full([BLOCK_N], NEG_LARGE, tl.float32)
    run_sumexp = tl.zeros([BLOCK_N], tl.float32)
    run_pz = tl.zeros([BLOCK_N], tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows64, row_mask, cols64, col_mask, dim,
            stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
        )  # fmt: skip
        z = tl.where(col_mask[None, :], acc * inv_temperature, NEG_LARGE)

        tile_max = tl.maximum(tl.max(z, axis=1), NEG_LARGE)  # finite even where every entry is -inf
        if STORE_LOGITS:
            # bounded by the buffer's padded row (stride_logits, a multiple of 16) rather than V: the mask stays
            # uniform over 16 columns, so the store is vectorised at a ragged V too (the padding is never read)
            store_end = tl.minimum(v_begin + vocab_per_split, stride_logits)
            tl.store(
                logits_ptr + rows64[:, None] * stride_logits + cols64[None, :],
                (z - tile_max[:, None]).to(logits_ptr.dtype.element_ty),
                mask=row_mask[:, None] & (cols64 < store_end)[None, :],
            )
            tl.store(tile_max_ptr + rows64 * stride_tile_max + v_start // BLOCK_V, tile_max, mask=row_mask)
        new_max = tl.maximum(run_max, tile_max)
        rescale = tl.exp(run_max - new_max)
        p = tl.where(col_mask[None, :], tl.exp(z - new_max[:, None]), 0.0)
        run_sumexp = run_sumexp * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            # p = 0 where z = -inf: its term is 0, not 0 * (-inf); a NaN z keeps its NaN p (NaN != 0)
            run_pz = run_pz * rescale + tl.sum(tl.where(p == 0.0, 0.0, p * z), axis=1)
        run_max = new_max

    out = pid_s.to(tl.int64) * n_rows + rows64
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sumexp_ptr + out, run_sumexp, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(part_pz_ptr + out, run_pz, mask=row_mask)


@triton.jit
def _target_logit_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    out_ptr,
    n_rows,
    dim,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_b,
    stride_t,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z[y] = (h . W[y] + b[y]) * inv_temperature, float32 products summed over D chunks."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    target = tl.load(targets_ptr + rows64 * stride_t, mask=row_mask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        d64 = (d_start + offs_d).to(tl.int64)
        mask = row_mask[:, None] & (d64 < dim)[None, :]
        h = tl.load(hidden_ptr + rows64[:, None] * stride_hn + d64[None, :] * stride_hd, mask=mask, other=0.0)
        w = tl.load(weight_ptr + target[:, None] * stride_wv + d64[None, :] * stride_wd, mask=mask, other=0.0)
        acc += h.to(tl.float32) * w.to(tl.float32)
    logit = tl.sum(acc, axis=1)
    if HAS_BIAS:
        logit += tl.load(bias_ptr + target * stride_b, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64, logit * inv_temperature, mask=row_mask)


def vocab_split(n_rows: int, vocab: int, config: TileConfig, slots: int) -> tuple[int, int]:
    """(number of vocab splits, vocab columns per split) for ``slots`` programs resident at once.

    Every program does ``cdiv(vocab tiles, splits)`` tiles and the grid runs in ``cdiv(token blocks * splits, slots)``
    waves, so the time is about their product; the pick minimises it (the tail wave counts whole) over split counts
    from the one that lets a single group of ``group_n`` token blocks fill a wave (L2 reuse) up to four times that,
    preferring fewer splits on ties. Every split is non-empty.
    """
    token_blocks = triton.cdiv(n_rows, config.block_n)
    vocab_tiles = triton.cdiv(vocab, config.block_v)
    low = min(vocab_tiles, triton.cdiv(slots, min(token_blocks, config.group_n)))
    high = min(vocab_tiles, 4 * low)
    best = None
    for splits in range(low, high + 1):
        tiles_per_split = triton.cdiv(vocab_tiles, splits)
        used = triton.cdiv(vocab_tiles, tiles_per_split)  # no empty split
        cost = triton.cdiv(token_blocks * used, slots) * tiles_per_split
        if best is None or cost < best[0]:
            best = (cost, used, tiles_per_split)
    _, splits, tiles_per_split = best
    return splits, tiles_per_split * config.block_v


def launch_target_logit(hidden, weight, bias, targets, inv_temperature: float) -> torch.Tensor:
    """``z[y]`` [N] float32 by the indexed dot-product kernel."""
    n_rows, dim = hidden.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    block_n, block_d = (16, 16) if running_in_interpreter() else (32, 128)
    has_bias = bias is not None
    _target_logit_kernel[(triton.cdiv(n_rows, block_n),)](
        hidden,
        weight,
        bias if has_bias else hidden,
        targets,
        out,
        n_rows,
        dim,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if has_bias else 0,
        targets.stride(0),
        float(inv_temperature),
        HAS_BIAS=has_bias,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


def lse_partials_launch(
    hidden, weight, bias, inv_temperature: float, with_entropy: bool, config: TileConfig, logits=None
):
    """``(grid, args, kwargs)`` of the ``_lse_partials_kernel`` launch for these inputs and ``config``; it allocates
    the ``[splits, N]`` partials (``args[3:6]``) and, with ``logits`` (an ``[N, V]`` buffer view, unit column
    stride: the local-loss mode), the ``[N, vocab tiles]`` float32 tile maxima (``args[7]``) and stores the logits
    tiles into ``logits``. ``bench.sm90_resources`` compiles the very same call on meta tensors, so the sm_90 check
    sees the launch's real specialisation (divisibility by 16, unit strides)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    slots = multiprocessor_count(hidden.device) * config.programs_per_sm
    splits, vocab_per_split = vocab_split(n_rows, vocab, config, slots)
    part_max = torch.empty(splits, n_rows, dtype=torch.float32, device=hidden.device)
    part_sumexp = torch.empty_like(part_max)
    part_pz = torch.empty_like(part_max) if with_entropy else part_max
    store = logits is not None
    tile_max = part_max
    if store:
        tile_max = torch.empty(n_rows, triton.cdiv(vocab, config.block_v), dtype=torch.float32, device=hidden.device)
    has_bias = bias is not None
    args = (
        hidden,
        weight,
        bias if has_bias else hidden,
        part_max,
        part_sumexp,
        part_pz,
        logits if store else part_max,
        tile_max,
        n_rows,
        vocab,
        dim,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if has_bias else 0,
        logits.stride(0) if store else 0,
        tile_max.stride(0) if store else 0,
        float(inv_temperature),
        vocab_per_split,
        splits,
    )
    kwargs = dict(
        HAS_BIAS=has_bias,
        WITH_ENTROPY=with_entropy,
        STORE_LOGITS=store,
        GROUP_N=config.group_n,
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_D=config.block_d,
        DOT_PRECISION=dot_precision(hidden.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return (triton.cdiv(n_rows, config.block_n) * splits,), args, kwargs


def combine_partials(part_max, part_sumexp, part_pz, with_entropy: bool):
    """``(lse, mean_z or None)`` [N] from the ``[splits, N]`` partials. Every split saw at least one real column,
    so each partial max is finite (``NEG_LARGE`` at worst)."""
    row_max = part_max.amax(dim=0)
    rescale = torch.exp(part_max - row_max)
    sumexp = (part_sumexp * rescale).sum(dim=0)
    lse = row_max + torch.log(sumexp)
    mean_z = (part_pz * rescale).sum(dim=0) / sumexp if with_entropy else None
    return lse, mean_z


def lse_pass(hidden, weight, bias, inv_temperature: float, with_entropy: bool, logits=None):
    """Launch the (autotuned) logsumexp pass: ``(lse, mean_z or None, tile_max, block_v)`` with ``tile_max`` and
    the config's vocab tile ``block_v`` only when ``logits`` is given (otherwise None). The caller sets the device."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    has_bias, store = bias is not None, logits is not None

    def launch(config: TileConfig):
        grid, args, kwargs = lse_partials_launch(hidden, weight, bias, inv_temperature, with_entropy, config, logits)
        _lse_partials_kernel[grid](*args, **kwargs)
        return args[3], args[4], args[5], (args[7] if store else None), config.block_v

    configs = choose_tile_configs(n_rows, hidden.dtype, device, backward=False, store=store)
    kernel = "lse_partials_store" if store else "lse_partials"
    key = tuning_key(kernel, device, hidden.dtype, n_rows, dim, vocab, has_bias, with_entropy)
    part_max, part_sumexp, part_pz, tile_max, block_v = tuned_launch(
        key, configs, launch, tune=autotune_enabled(device)
    )
    lse, mean_z = combine_partials(part_max, part_sumexp, part_pz, with_entropy)
    return lse, mean_z, tile_max, (block_v if store else None)


def device_context(device: torch.device):
    """The CUDA device guard for launches on ``device`` (Triton launches on the current device); a no-op on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def triton_forward(hidden, weight, bias, targets, params):
    """Fused forward. hidden [N, D] and weight [V, D] (same dtype, any strides), bias [V] or None, targets [N]
    int64 in [0, V), ``params`` a ``LogprobParams`` (``inv_temperature``, ``with_entropy`` are read).

    Returns float32 [N] tensors ``(lse, target_logit, mean_z)``: ``lse = logsumexp_v z``, ``target_logit = z[y]``,
    ``mean_z = sum_v softmax(z)_v z_v`` (None unless ``with_entropy``), where
    ``z = (hidden @ weight.T + bias) * inv_temperature`` is never materialised.
    """
    inv_temperature, with_entropy = float(params.inv_temperature), bool(params.with_entropy)
    n_rows = hidden.shape[0]
    device = hidden.device
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return empty, empty.clone(), (empty.clone() if with_entropy else None)
    with device_context(device):
        lse, mean_z, _, _ = lse_pass(hidden, weight, bias, inv_temperature, with_entropy)
        target_logit = launch_target_logit(hidden, weight, bias, targets, inv_temperature)
    return lse, target_logit, mean_z
