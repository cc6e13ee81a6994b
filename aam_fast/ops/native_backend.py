"""The `native` backend: C++ CPU kernels (kernels/cpu, built by CMake) behind the torch backend's contract.

`pip install --no-build-isolation -e .` (what `make install` runs) compiles `kernels/cpu/*.cpp` against the
installed torch into `aam_fast.libs/_aam_fast_native.so` beside the package; loading it registers
`torch.ops.aam_fast.linear_logprobs_forward` and `..._backward`. The kernels tile tokens × vocabulary with
256 × 256 float32 tiles, fold each tile into the online logsumexp (forward) or turn it into the logits' gradient
(backward) while it is in cache, and hand the tasks to ATen's threads. The library is loaded on first use, so
`import aam_fast` works where it was never built.

It is opt-in (not picked by "auto"). Its log-probs, entropy and every gradient are within 2x of naive float32
autograd's error against float64 (measured at most 1.2x, as the torch backend) at V up to 151,936, on peaked
logits (std 16) and at N = 2048 (tests/test_precision.py). On the shared 2-core CPU at N=1024, D=1024, V=151936
(float32 with bias, forward+backward) it spends 13.4 s of CPU time on one thread, what its four tile matrix products
alone take (13.0-13.5 s): 0.93x the torch backend's CPU time on one thread and 0.84x on two (log-probs), 0.69x with
the entropy; best wall times 13.5 s against 14.3 s on one thread, 6.9 s against 8.5 s on two. It has no
`local_loss` entry (GRPO's three-product mode) and no gradient filtering.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .params import LogprobParams

_LIBRARY_FOLDER = "aam_fast.libs"
_LIBRARY_STEM = "_aam_fast_native"
_LIBRARY_SUFFIXES = (".so", ".dylib", ".pyd", ".dll")
# Set to a path to load that library file instead of searching the package.
LIBRARY_ENV = "AAM_FAST_NATIVE_LIB"
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (after `pip install scikit-build-core cmake ninja`; "
    "`make install` does both), or set AAM_FAST_NATIVE_LIB to a built _aam_fast_native library"
)

# Tiling overrides for tests and tuning (0 = the kernels' cache-sized defaults).
BLOCK_ROWS = int(os.environ.get("AAM_FAST_NATIVE_ROWS", "0"))
TILE_WIDTH = int(os.environ.get("AAM_FAST_NATIVE_TILE", "0"))
VOCAB_CHUNKS = 0

_load_error: str | None = None
_loaded = False


def library_path() -> Path | None:
    """The built library: $AAM_FAST_NATIVE_LIB, else `aam_fast.libs/` in a sys.path folder (site-packages, where
    the CMake build installs it, editable or not) or beside the package's folder, else a copy inside that folder.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    package_folder = Path(__file__).resolve().parent.parent  # aam_fast/, found without importing the package
    names = [f"{_LIBRARY_STEM}{suffix}" for suffix in _LIBRARY_SUFFIXES]
    folders = [Path(entry or ".") / _LIBRARY_FOLDER for entry in sys.path]
    folders += [package_folder.parent / _LIBRARY_FOLDER, package_folder]
    return next((folder / name for folder in folders for name in names if (folder / name).is_file()), None)


def load_native() -> None:
    """Load the library once; raise ValueError saying how to build it when it is absent or fails to load."""
    global _loaded, _load_error
    if _loaded:
        return
    if _load_error is None:
        path = library_path()
        if path is None:
            _load_error = f"the native library ({_LIBRARY_STEM}.so) is not built; {BUILD_HINT}"
        elif not path.is_file():
            _load_error = f"{LIBRARY_ENV}={path} does not exist; {BUILD_HINT}"
        else:
            try:
                torch.ops.load_library(str(path))
                _loaded = True
                return
            except (OSError, RuntimeError) as exc:  # built against another torch, or a broken file
                _load_error = f"the native library {path} failed to load ({exc}); rebuild it: {BUILD_HINT}"
    raise ValueError(f"backend='native' is unavailable: {_load_error}")


def native_available() -> bool:
    """True when the native library is built and loads."""
    try:
        load_native()
    except ValueError:
        return False
    return True


def _tiling() -> tuple[int, int, int]:
    return BLOCK_ROWS, TILE_WIDTH, VOCAB_CHUNKS


def native_forward(hidden, weight, bias, targets, params: LogprobParams):
    """Return `(lse [N] float64, target_logit [N] float32, mean_z [N] float64 or None)`, as `torch_forward`.

    With `m` the running max, `S = Σ_v exp(z_v − m)` and `A = Σ_v exp(z_v − m)(z_v − m)` (every term ≤ 0: nothing
    cancels) are float32 within a tile and float64 across tiles; `lse = m + log S`, `mean_z = m + A/S`, so the
    entropy `lse − mean_z = log S − A/S` is as exact as the sums. The target logit is read from the tile the
    logsumexp sees.
    """
    load_native()
    with torch.no_grad():
        lse, target_logit, mean_z = torch.ops.aam_fast.linear_logprobs_forward(
            hidden, weight, bias, targets, float(params.inv_temperature), bool(params.with_entropy), *_tiling()
        )
    return lse, target_logit, (mean_z if params.with_entropy else None)


def native_backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params: LogprobParams, needs):
    """Gradients of `Σ g·logp + Σ e·H`, as `torch_backward`: `(d_hidden in hidden.dtype, d_weight f32, d_bias f32)`,
    each None where `needs` = (hidden, weight, bias) is off. Gradient filtering is not implemented here
    (`grad_filter_eps` must be 0; the backend says so with `grad_filter=False`).

    Each tile's `∂/∂z = s·[g (onehot − p) − e p (log p + H)]` (`s = 1/τ`, `H = lse − mean_z` formed in float64)
    is formed in place with `log p = (z − lse_hi) − lse_lo`, the float64 `lse` split into float32 `lse_hi + lse_lo`
    (so `p` carries the rounding of `z − lse`, not of `lse`); the target column as `g·q − e p_y (log p_y + H)` with
    `q = 1 − p_y = −expm1(z_y − lse)` in float64 (exact when `p_y ≈ 1`). `d_bias` is summed over the rows in
    float64 and rounded once.
    """
    if params.grad_filter_eps > 0.0:
        raise ValueError("grad_filter_eps is not implemented by backend='native'; use backend='torch' or 'triton'")
    load_native()
    upstream = (lse, mean_z, grad_logp, grad_entropy)
    flags = tuple(bool(flag) for flag in needs)
    with torch.no_grad():
        d_hidden, d_weight, d_bias = torch.ops.aam_fast.linear_logprobs_backward(
            hidden, weight, bias, targets, *upstream, float(params.inv_temperature), *flags, *_tiling()
        )
    return tuple(grad if flag else None for grad, flag in zip((d_hidden, d_weight, d_bias), flags, strict=True))
