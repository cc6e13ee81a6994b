"""Peak-memory meters and the matrix-product floor.

CPU peak memory is the process's resident-set high-water mark. Before each measured round the meter returns
freed heap memory to the OS (`malloc_trim(0)`), resets the kernel's high-water mark to the current resident size
(writing "5" to `/proc/self/clear_refs`, Linux ≥ 4.0) and records that resident size as the baseline; after the
round `VmHWM − baseline` is the peak extra memory. This counts the pages a provider really touched (its
temporaries, saved tensors and outputs), at page granularity, with no sampling gap, and nothing an allocator
reserved but never used. Another thread of this process allocating at the same time would be counted too; the
benchmarks run none.

CUDA peak memory is `torch.cuda.max_memory_allocated() − memory_allocated()` at the reset, after
`reset_peak_memory_stats()`: tensors only, not the caching allocator's reserve.

The floor is the time of the bare matrix products that any exact method must do, in the same process right
before the benchmarks of that shape: one `[N, D] × [D, V]` product for a forward pass, four for forward and
backward (logits, their recomputation in backward, `dZ W` for the hidden gradient, `dZᵀ H` for the weight's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable

import torch

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    with open(_PROC_STATUS) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in {_PROC_STATUS}")


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None


class CpuPeakMemory:
    """Process peak-RSS meter (see the module docstring). `unavailable` names why it cannot run, else None."""

    def __init__(self):
        self._libc = _load_libc()
        self._baseline_kib = 0
        self.unavailable = None
        try:
            _status_kib("VmHWM")
            with open(_CLEAR_REFS, "w") as handle:
                handle.write("5")
        except OSError as exc:
            self.unavailable = f"cannot reset the RSS high-water mark ({exc}); CPU peak memory not measured"

    def reset(self) -> None:
        gc.collect()
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        self._baseline_kib = _status_kib("VmRSS")

    def peak_extra_bytes(self) -> int:
        return max(0, _status_kib("VmHWM") - self._baseline_kib) * 1024


class CudaPeakMemory:
    """Allocated-tensor peak above the allocation at the last reset, on the current CUDA device."""

    unavailable = None

    def __init__(self, device: torch.device):
        self._device = device
        self._baseline = 0

    def reset(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        self._baseline = torch.cuda.memory_allocated(self._device)

    def peak_extra_bytes(self) -> int:
        return max(0, torch.cuda.max_memory_allocated(self._device) - self._baseline)


def memory_meter(device: torch.device):
    return CudaPeakMemory(device) if device.type == "cuda" else CpuPeakMemory()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds one call of `fn` takes, synchronised on CUDA."""
    return timed_both(fn, device)[0]


def timed_both(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """`(wall seconds, process CPU seconds)` of one call of `fn`, synchronised on CUDA.

    Process CPU time sums all threads of this process and does not advance while they are descheduled, so on a
    CPU shared with other jobs it tracks the work done far better than wall time (unloaded, ≈ threads × wall).
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def matmul_floor(hidden: torch.Tensor, weight: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of the bare products, `forward` (one), `forward_backward` (four) and `local` (three: what
    a loss whose per-token gradient is known in the forward needs, the logits once, `dZ W`, `dZᵀ H`), in the
    inputs' dtype; wall clock, and process CPU time under the same keys with a `_cpu` suffix."""
    device = hidden.device
    n, v = hidden.shape[0], weight.shape[0]
    logits = torch.empty(n, v, dtype=hidden.dtype, device=device)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.empty_like(weight)

    def forward():
        torch.mm(hidden, weight.t(), out=logits)

    def backward_products():
        # The logits stand in for dZ: any dense [N, V] matrix costs the same.
        torch.mm(logits, weight, out=d_hidden)
        torch.mm(logits.t(), hidden, out=d_weight)

    forward()  # warm-up: library initialisation and first touch of the output pages
    d_hidden.zero_()
    d_weight.zero_()
    fwd = [timed_both(forward, device) for _ in range(rounds)]
    bwd = [timed_both(backward_products, device) for _ in range(rounds)]
    floor = {}
    for suffix, i in (("", 0), ("_cpu", 1)):
        fwd_s = statistics.median(t[i] for t in fwd)
        floor["forward" + suffix] = fwd_s
        bwd_s = statistics.median(t[i] for t in bwd)
        floor["forward_backward" + suffix] = 2 * fwd_s + bwd_s
        floor["local" + suffix] = fwd_s + bwd_s
    return floor


def product_flops(tokens: int, d: int, v: int) -> int:
    """Floating-point operations of one `[tokens, d] × [d, v]` product."""
    return 2 * tokens * d * v
