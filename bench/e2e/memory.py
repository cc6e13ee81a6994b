"""Peak memory of an end-to-end benchmark case's process."""

from __future__ import annotations

import resource


def peak_memory() -> dict[str, float]:
    """The process's peak RSS and, where CUDA was used, the peak of memory allocated on the device (GiB)."""
    import torch

    peak = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        peak["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peak
