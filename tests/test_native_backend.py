"""The native (C++) backend: the library loads, its tiling paths agree with float64, and absence is a clear error.

The shared value/gradient tests (test_linear_logprobs.py) run it at its default tiling; here the tiles are forced
small and ragged, the vocabulary is split across tasks, and many tasks contend for the weight-gradient tiles.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_linear_logprobs import run_case

import aam_fast
from aam_fast.ops import native_backend
from aam_fast.ops.backends import resolve_backend


@pytest.fixture
def native():
    if not native_backend.native_available():
        pytest.skip(f"native library not built: {native_backend.BUILD_HINT}")
    return native_backend


def test_library_registers_both_ops(native):
    assert native.library_path() is not None
    assert hasattr(torch.ops.aam_fast, "linear_logprobs_forward")
    assert hasattr(torch.ops.aam_fast, "linear_logprobs_backward")
    assert resolve_backend("native", torch.device("cpu")).name == "native"


@pytest.mark.parametrize(
    "rows,width,chunks",
    [(7, 50, 1), (16, 64, 3), (5, 1000, 2)],
    ids=["ragged-tiles", "three-vocab-chunks", "one-tile-per-chunk"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_tilings_match_float64(native, monkeypatch, rows, width, chunks, dtype):
    monkeypatch.setattr(native, "BLOCK_ROWS", rows)
    monkeypatch.setattr(native, "TILE_WIDTH", width)
    monkeypatch.setattr(native, "VOCAB_CHUNKS", chunks)
    run_case("native", dtype, (37,), 48, 301, bias=True, temperature=0.7, entropy=True)
    run_case("native", dtype, (2, 9), 24, 77, bias=False, temperature=1.0, entropy=False)


def test_contended_weight_tiles_match_torch_backend(native, monkeypatch):
    """25 token blocks over 19 vocabulary tiles: threads meet on the same d_weight tiles; sums stay exact."""
    monkeypatch.setattr(native, "BLOCK_ROWS", 8)
    monkeypatch.setattr(native, "TILE_WIDTH", 16)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(200, 32, generator=gen) * 0.5
    weight = torch.randn(301, 32, generator=gen)
    bias = torch.randn(301, generator=gen)
    targets = torch.randint(0, 301, (200,), generator=gen)
    grads = {}
    for backend in ("torch", "native"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        logp, ent = aam_fast.linear_logprobs(
            leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, backend=backend
        )
        (logp.sum() + 0.3 * ent.sum()).backward()
        grads[backend] = [logp.detach(), ent.detach()] + [leaf.grad for leaf in leaves]
    names = ("logp", "entropy", "hidden", "weight", "bias")
    for name, got, want in zip(names, grads["native"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_forward_keeps_lse_and_mean_z_in_float64(native):
    """The entropy `lse − mean_z` is formed in float64 by the caller: neither may come back rounded to float32."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 8, generator=gen) * 4.0, torch.randn(300, 8, generator=gen)
    targets = torch.randint(0, 300, (5,), generator=gen)
    lse, target_logit, mean_z = torch.ops.aam_fast.linear_logprobs_forward(hidden, weight, None, targets, 1.0, True)
    assert lse.dtype == mean_z.dtype == torch.float64 and target_logit.dtype == torch.float32
    z = hidden.double() @ weight.double().t()
    p = z.softmax(-1)
    torch.testing.assert_close(lse, z.logsumexp(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse - mean_z, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


def test_no_rows_left_gives_zeros_even_with_an_empty_vocabulary(native):
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    for weight in (torch.randn(11, 8, requires_grad=True), torch.randn(0, 8, requires_grad=True)):
        logp, ent = aam_fast.linear_logprobs(
            hidden, weight, torch.full((2, 3), -100), return_entropy=True, backend="native"
        )
        assert torch.all(logp == 0) and torch.all(ent == 0)
        hidden.grad = None
        (logp.sum() + ent.sum()).backward()
        assert torch.all(hidden.grad == 0)
        assert weight.grad.shape == weight.shape and torch.all(weight.grad == 0)


def test_op_rejects_mismatched_targets(native):
    with pytest.raises(RuntimeError, match="targets must be int64"):
        torch.ops.aam_fast.linear_logprobs_forward(
            torch.randn(4, 8), torch.randn(11, 8), None, torch.zeros(3, dtype=torch.long), 1.0, False
        )


def test_absent_library_is_a_value_error_saying_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(native_backend, "_loaded", False)
    monkeypatch.setattr(native_backend, "_load_error", None)
    monkeypatch.setenv(native_backend.LIBRARY_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(ValueError, match="--no-build-isolation"):
        aam_fast.linear_logprobs(torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2]), backend="native")


def test_native_refuses_non_cpu_tensors():
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_backend("native", torch.device("meta"))


def test_package_imports_and_falls_back_without_the_library(tmp_path):
    """A process that never had the library: aam_fast imports, "auto"/"torch" run, "native" explains the build."""
    script = (
        "import torch, aam_fast\n"
        "h, w, y = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2])\n"
        "assert aam_fast.linear_logprobs(h, w, y).shape == (3,)\n"
        "try:\n"
        "    aam_fast.linear_logprobs(h, w, y, backend='native')\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, AAM_FAST_NATIVE_LIB=str(tmp_path / "absent.so"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backend='native' is unavailable" in out.stdout and "pip install --no-build-isolation" in out.stdout
