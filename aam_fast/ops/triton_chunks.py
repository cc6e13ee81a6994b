"""What the Triton backward and the Triton local-loss mode share: token chunks, the dZ buffer, the two products.

Both modes hold the logits' gradient of a chunk of tokens as a dense ``[rows, V]`` matrix ``dZ`` in the input dtype,
then ``d_hidden[chunk] = dZ W`` and ``d_weight (+)= dZᵀ h[chunk]`` run as cuBLAS products (no atomics: two runs give
the same bits). ``AAM_FAST_TRITON_CHUNK_MB`` (default 1024 MiB) bounds ``dZ`` (each row padded to a multiple of 16
elements: 16-byte aligned, as cuBLAS wants, with a stride Triton specialises; the per-row extras, such as the
local-loss mode's tile maxima at 1.5 to 6% of dZ, come on top) plus, when more than one chunk is needed, a float32
``[V, D]`` accumulator for ``d_weight`` if it fits in half the budget. Otherwise ``d_weight`` accumulates in the
input dtype: cuBLAS adds each chunk's product to it in its float32 epilogue and rounds once per chunk (at N = 8192,
D = 4096, V = 128256 in bfloat16: two chunks of 4096 rows, 1.05 GB of dZ; a float32 accumulator would add 2.1 GB).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

CHUNK_ENV = "AAM_FAST_TRITON_CHUNK_MB"
DEFAULT_CHUNK_MB = 1024.0
ROW_ALIGN_ELEMENTS = 16

# What the last filtered pass skipped: vocab blocks over all chunks, and how many there were (diagnostics for the
# tests and the benchmarks; not part of the op's contract).
last_filter_stats = {"blocks": 0, "skipped": 0}


@dataclass(frozen=True)
class ChunkPlan:
    """Rows per chunk, and whether ``d_weight`` accumulates in float32 (else in the input dtype)."""

    rows: int
    float32_weight_grad: bool

    def single(self, n_rows: int) -> bool:
        return self.rows >= n_rows


def chunk_budget_bytes() -> int:
    """``AAM_FAST_TRITON_CHUNK_MB`` in bytes (default 1024 MiB); ValueError naming the variable when it is not a
    positive finite number."""
    raw = os.environ.get(CHUNK_ENV, "")
    try:
        budget_mb = float(raw) if raw else DEFAULT_CHUNK_MB
    except ValueError:
        budget_mb = float("nan")
    if not (budget_mb > 0 and math.isfinite(budget_mb)):
        raise ValueError(f"{CHUNK_ENV} must be a positive number of megabytes, got {raw!r}")
    return int(budget_mb * 2**20)


def plan_chunks(n_rows: int, row_bytes: int, granule: int, weight_grad_bytes: int = 0) -> ChunkPlan:
    """Token chunks whose buffers (``row_bytes`` per row) fit the budget: all rows when they fit, else a multiple
    of ``granule`` (the kernels' token block; at least one). ``weight_grad_bytes`` (a float32 ``[V, D]``, 0 when no
    16-bit ``d_weight`` is wanted) is taken from the budget when several chunks are needed and it fits in half."""
    budget = chunk_budget_bytes()
    if n_rows * row_bytes <= budget:
        return ChunkPlan(max(n_rows, 1), False)
    float32_weight_grad = 0 < weight_grad_bytes <= budget // 2
    if float32_weight_grad:
        budget -= weight_grad_bytes
    rows = max(granule, budget // row_bytes // granule * granule)
    return ChunkPlan(min(rows, n_rows), float32_weight_grad)


def aligned_width(cols: int, element_size: int) -> int:
    """``cols`` rounded up to a multiple of 16 elements: rows of 16-bit or float32 entries then start 16-byte
    aligned (what cuBLAS wants), and the row stride is one Triton specialises as divisible by 16 (vectorised
    stores; at V = 128257 an unspecialised stride costs the logits-storing pass 136 to 264 bytes of spilled
    registers per thread on sm_90, `python -m bench.sm90_resources`)."""
    del element_size  # 16 elements are at least 16 bytes for every supported dtype
    return -(-cols // ROW_ALIGN_ELEMENTS) * ROW_ALIGN_ELEMENTS


def dz_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` view whose rows each start 16-byte aligned (row stride padded to a multiple
    of 16 elements)."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    return torch.empty(rows, aligned_width(cols, element_size), dtype=dtype, device=device)[:, :cols]


def fp16_dz_scale(grad_logp, grad_entropy, vocab: int, inv_temperature: float) -> float:
    """A power of two ``2^k >= max_t (|g_t| + |e_t| (log V + 1)) * s``, a bound on ``|dZ|`` (``|p - onehot| <= 1``,
    ``|p (mean_z - z)| <= H + 1/e <= log V + 1``); float16 dZ is stored divided by it. One host sync per call."""
    bound = torch.zeros((), dtype=torch.float32, device=(grad_logp if grad_logp is not None else grad_entropy).device)
    if grad_logp is not None:
        bound = bound + grad_logp.abs().amax()
    if grad_entropy is not None:
        bound = bound + grad_entropy.abs().amax() * (math.log(vocab) + 1.0)
    value = float(bound) * inv_temperature
    if not math.isfinite(value) or value <= 0.0:
        return 1.0  # NaN/inf upstream propagates anyway; all-zero upstream writes zeros
    return 2.0 ** math.ceil(math.log2(value))


# None until this torch refused `addmm(..., out_dtype=float32)` on CUDA; then the refusal, and the fallback is used.
_float32_out_refusal: dict[str, str | None] = {"cuda": None}


def is_out_dtype_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is torch declining ``addmm(..., out_dtype=...)`` (no such overload, or none for this backend
    or dtype pair), as opposed to a failure of the product itself (out of memory, a CUDA fault), which must reach
    the caller."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, (TypeError, NotImplementedError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out_dtype" in text or "dtype_out" in text) and "CUDA error" not in text


def mm_float32_out(out, a, b, alpha: float, accumulate: bool) -> None:
    """float32 ``out (+)= alpha * a @ b`` for 16-bit ``a``, ``b``: cuBLAS accumulates into ``out`` in its float32
    epilogue. Where torch refuses that (``is_out_dtype_refusal``), warn once and use the fallback from then on: the
    product rounded to the input dtype, then added in float32."""
    beta = 1.0 if accumulate else 0.0
    if _float32_out_refusal["cuda"] is None:
        try:
            torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            if not is_out_dtype_refusal(exc):
                raise
            _float32_out_refusal["cuda"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            warnings.warn(
                f"aam_fast: torch {torch.__version__} has no float32-output addmm for {a.dtype} operands "
                f"({_float32_out_refusal['cuda']}); d_weight is accumulated from products rounded to {a.dtype}",
                RuntimeWarning,
                stacklevel=2,
            )
    product = torch.mm(a, b)
    if accumulate:
        out.add_(product, alpha=alpha)
    else:
        torch.mul(product, alpha, out=out)


def mm_into(out, a, b, alpha: float, accumulate: bool) -> None:
    """``out = alpha * a @ b`` (``accumulate``: ``out += ...``), ``out`` in the operands' dtype or float32. On CPU a
    float32 ``out`` takes float32 copies of the operands."""
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)
    elif not out.is_cuda:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=1.0 if accumulate else 0.0, alpha=alpha, out=out)
    else:
        mm_float32_out(out, a, b, alpha, accumulate)


def kept_columns(keep, block_v: int, targets, vocab: int, stats: dict) -> torch.Tensor | None:
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


def gather_columns(matrix: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[:, cols]`` in a buffer whose rows start 16-byte aligned: the index list is padded to the aligned
    width by repeating its last entry (one gather, no second copy) and the padding columns are sliced off."""
    count = cols.numel()
    width = aligned_width(count, matrix.element_size())
    if width > count > 0:
        cols = torch.cat([cols, cols[-1:].expand(width - count)])
    return torch.index_select(matrix, 1, cols)[:, :count]


def chunk_products(dz, h, weight, cols, dz_scale: float, d_hidden_rows, d_weight, accumulate: bool) -> None:
    """The chunk's two cuBLAS products: ``d_hidden_rows = dZ W`` and ``d_weight (+)= dZᵀ h`` (each skipped when
    None), over the kept columns ``cols`` only when given (gathered into a 16-byte-aligned buffer)."""
    dz_used, w_used = dz, weight
    if cols is not None:
        dz_used = gather_columns(dz, cols)
        w_used = weight.index_select(0, cols) if d_hidden_rows is not None else None
    if d_hidden_rows is not None:
        if cols is not None and cols.numel() == 0:
            d_hidden_rows.zero_()
        else:
            mm_into(d_hidden_rows, dz_used, w_used, dz_scale, accumulate=False)
    if d_weight is None or (cols is not None and cols.numel() == 0):
        return
    if cols is None:
        mm_into(d_weight, dz_used.t(), h, dz_scale, accumulate=accumulate)
    else:
        part = torch.zeros(cols.numel(), d_weight.shape[1], dtype=d_weight.dtype, device=d_weight.device)
        mm_into(part, dz_used.t(), h, dz_scale, accumulate=False)
        d_weight[cols] += part


def new_weight_grad(vocab: int, dim: int, dtype: torch.dtype, plan: ChunkPlan, device) -> torch.Tensor:
    """The ``d_weight`` the chunks accumulate into: float32 when the plan says so, else the input dtype."""
    return torch.zeros(vocab, dim, dtype=torch.float32 if plan.float32_weight_grad else dtype, device=device)
