"""Liger-Kernel's backbone patches (RoPE, RMSNorm, SwiGLU) on a CUDA model where installed; never its loss kernels
(the fused log-prob op is this package's own)."""

from __future__ import annotations

import torch


def apply_liger(model: torch.nn.Module, device: torch.device, enabled: bool) -> str:
    """Patch ``model`` in place where Liger-Kernel can; returns what happened, in words, for the log and the run's
    config."""
    if not enabled:
        return "off (--no-liger)"
    if device.type != "cuda":
        return f"not applied: Liger-Kernel's patches are Triton kernels for CUDA, the device is {device.type}"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return "not applied: liger-kernel is not installed (pip install 'aam-fast[gpu]')"
    try:
        _apply_liger_kernel_to_instance(
            model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except Exception as exc:  # an architecture Liger does not know: keep the plain model
        return f"not applied: {exc}"
    return "applied (rope, rms_norm, swiglu)"
