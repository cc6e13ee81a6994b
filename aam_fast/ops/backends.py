"""Backend registry: each backend is a forward and a backward with one contract, and optional extra entries.

The contract (rows whose target is ignored are already removed; every target lies in `[0, V)`):
- `forward(hidden [N, D], weight [V, D], bias [V] | None, targets [N], params) -> (lse, target_logit, mean_z)`,
  each `[N]` (float32 or float64), `mean_z = Σ_v softmax(z)_v z_v` or None unless `params.with_entropy`;
- `backward(hidden, weight, bias, targets, lse, mean_z, grad_logp, grad_entropy, params, needs)
  -> (d_hidden [N, D] in hidden.dtype, d_weight [V, D] float32, d_bias [V] float32)`, the gradients of
  `Σ g·logp + Σ e·H` for the upstream `grad_logp`, `grad_entropy` (`[N]`, the latter may be None), each None
  where the matching flag of `needs = (hidden, weight, bias)` is off;
- `local_loss` (None where the backend has none): the three-product mode for losses whose per-token gradient is
  local, `(hidden, weight, bias, targets, token_grads, params, needs) -> (logp, entropy | None, d_hidden, d_weight,
  d_bias)` (see `torch_chunked`, `triton_local_loss`);
- `grad_filter`: whether the backward honours `params.grad_filter_eps > 0`.
`params` is a `LogprobParams`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton", "native")


@dataclass(frozen=True)
class Backend:
    """A backend's entries (see the module docstring for their contract)."""

    name: str
    forward: Callable
    backward: Callable
    local_loss: Callable | None = None
    grad_filter: bool = False


def _torch_backend() -> Backend:
    from .torch_backend import torch_backward, torch_forward
    from .torch_chunked import torch_chunked_local

    return Backend("torch", torch_forward, torch_backward, local_loss=torch_chunked_local, grad_filter=True)


def _triton_backend() -> Backend:
    try:
        from .triton_backward import triton_backward
        from .triton_forward import triton_forward
        from .triton_local_loss import triton_local_loss
    except ImportError as exc:  # triton missing on this platform
        raise ValueError(f"backend='triton' needs the triton package, which failed to import: {exc}") from exc
    return Backend("triton", triton_forward, triton_backward, local_loss=triton_local_loss, grad_filter=True)


def _native_backend() -> Backend:
    from .native_backend import load_native, native_backward, native_forward

    load_native()  # ValueError saying how to build the library where it is absent
    return Backend("native", native_forward, native_backward)


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on CPU only under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """Map a backend name to its entries; "auto" picks triton on CUDA and torch elsewhere.

    "native" (the C++ CPU kernels) is opt-in: somewhat faster than "torch" on CPU but less precise, and without
    the local-loss entry or gradient filtering (see `native_backend`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if not triton_runs_on(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got tensors on {device}"
            )
        return _triton_backend()
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got tensors on {device}")
        return _native_backend()
    return _torch_backend()
