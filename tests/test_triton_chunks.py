"""The chunk machinery the Triton backward and local-loss mode share: the budget plan, 16-byte-aligned dZ rows, and
the float32-output product whose fallback catches only torch declining the dtype pair."""

from __future__ import annotations

import warnings

import pytest
import torch

from aam_fast.ops import triton_chunks


@pytest.fixture
def fresh_refusal(monkeypatch):
    monkeypatch.setitem(triton_chunks._float32_out_refusal, "cuda", None)


def _operands():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    b = torch.randn(5, 4, generator=gen).to(torch.bfloat16)
    return a, b


def test_a_refused_dtype_pair_falls_back_and_warns_once(fresh_refusal, monkeypatch):
    """torch without `addmm(..., out_dtype=)` (TypeError) or without it for this backend (NotImplementedError):
    the product rounded to the input dtype is used, with one warning for the process."""
    real_addmm = torch.addmm
    tried = []

    def refusing_addmm(*args, **kwargs):
        if "out_dtype" in kwargs:
            tried.append(1)
            raise NotImplementedError("Could not run 'aten::addmm.dtype_out' with arguments from the 'CUDA' backend")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", refusing_addmm)
    a, b = _operands()
    out = torch.zeros(6, 4)
    with pytest.warns(RuntimeWarning, match="float32-output addmm"):
        triton_chunks.mm_float32_out(out, a, b, 2.0, accumulate=False)
    torch.testing.assert_close(out, 2.0 * (a @ b).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        triton_chunks.mm_float32_out(out, a, b, 1.0, accumulate=True)
    torch.testing.assert_close(out, 3.0 * (a @ b).float())
    assert len(tried) == 1, "once refused, the float32-output overload is not tried again"


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, ...)`"),
    ],
    ids=["oom", "cuda-fault", "cublas-failure"],
)
def test_out_of_memory_and_cuda_errors_go_through(error, fresh_refusal, monkeypatch):
    def failing_addmm(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "addmm", failing_addmm)
    a, b = _operands()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(error), match=str(error)[:20]):
            triton_chunks.mm_float32_out(torch.zeros(6, 4), a, b, 1.0, accumulate=False)
    assert triton_chunks._float32_out_refusal["cuda"] is None, "a failed product is not a refusal"


def test_only_the_dtype_refusals_count_as_refusals():
    assert triton_chunks.is_out_dtype_refusal(TypeError("addmm() received an invalid combination of arguments"))
    assert triton_chunks.is_out_dtype_refusal(
        RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
    )
    assert not triton_chunks.is_out_dtype_refusal(torch.OutOfMemoryError("CUDA out of memory"))
    assert not triton_chunks.is_out_dtype_refusal(RuntimeError("CUDA error: device-side assert triggered"))
    assert not triton_chunks.is_out_dtype_refusal(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("vocab", [32003, 50257])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dz_rows_start_16_byte_aligned(vocab, dtype):
    buffer = triton_chunks.dz_buffer(5, vocab, dtype, torch.device("cpu"))
    assert buffer.shape == (5, vocab)
    assert buffer.data_ptr() % 16 == 0 and (buffer.stride(0) * buffer.element_size()) % 16 == 0
    assert buffer.stride(0) % 16 == 0 and buffer.stride(0) - vocab < 16  # what Triton specialises
    buffer.copy_((torch.arange(vocab) % 64).expand(5, vocab))  # small integers: exact in every dtype
    cols = torch.arange(0, vocab, 7)  # 4573 or 7180 columns: not a multiple of 8
    gathered = triton_chunks.gather_columns(buffer, cols)
    assert torch.equal(gathered, buffer[:, cols])
    assert (gathered.stride(0) * gathered.element_size()) % 16 == 0


def test_the_launchers_use_the_aligned_buffer(monkeypatch):
    """The backward and the local-loss mode take their dZ from `dz_buffer` (V = 61 float32: unpadded rows would
    start 4 bytes off alignment; `dz_buffer` itself is held at V = 32003 and 50257 above)."""
    import aam_fast
    from aam_fast.ops import triton_backward

    made = []
    original = triton_chunks.dz_buffer

    def spy(rows, cols, dtype, device):
        buffer = original(rows, cols, dtype, device)
        made.append(buffer)
        return buffer

    monkeypatch.setattr(triton_backward, "dz_buffer", spy)
    monkeypatch.setattr(triton_chunks, "dz_buffer", spy)  # the local-loss mode reads it off the module
    hidden = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(61, 8, requires_grad=True)
    targets = torch.tensor([1, 60, 7])
    aam_fast.linear_logprobs(hidden, weight, targets, backend="triton").sum().backward()
    loss, _, _ = aam_fast.linear_local_loss(hidden, weight, targets, lambda logp, _: logp.sum(), backend="triton")
    loss.backward()
    assert len(made) == 2
    for buffer in made:
        assert (buffer.stride(0) * buffer.element_size()) % 16 == 0 and buffer.data_ptr() % 16 == 0


def test_bad_chunk_budget_is_refused_by_name(monkeypatch):
    for bad in ("0", "-1", "lots", "nan", "inf"):
        monkeypatch.setenv(triton_chunks.CHUNK_ENV, bad)
        with pytest.raises(ValueError, match=triton_chunks.CHUNK_ENV):
            triton_chunks.plan_chunks(10, 100, 16)
