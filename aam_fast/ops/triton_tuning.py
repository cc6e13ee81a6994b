"""Tile shapes for the Triton kernels: Hopper candidates, and a first-call autotuner that times them on the device.

Every candidate was compiled for sm_90 offline (`python -m bench.sm90_resources`, held by the tests) and fits an
H100's shared memory without spilling registers to the stack; the first candidate is the heuristic pick used
when autotuning is off (`AAM_FAST_AUTOTUNE=0`), under the interpreter, and as the fallback. On CUDA the first
call with a new key — kernel, device, dtype, flags, `D`, `V` and the token count rounded up to a power of two —
times each candidate (`triton.testing.do_bench`, median) and keeps the fastest for the process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import triton
from triton.runtime.errors import OutOfResources

T = TypeVar("T")

AUTOTUNE_ENV = "AAM_FAST_AUTOTUNE"


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options shared by the forward and backward launchers."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8  # token blocks that run side by side over each vocab block (L2 reuse of the weight tiles)
    programs_per_sm: int = 1  # resident at once on one sm_90 SM (registers, shared memory); sizes the waves


def running_in_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 inputs use IEEE products unless torch allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# (block_n, block_v, block_d, num_warps, num_stages[, programs per SM]) per kernel ("backward" is the dZ kernel)
# and operand class; the first is the default. 16-bit operands and TF32 run on the tensor cores (wgmma), IEEE
# float32 dots on the CUDA cores. Chosen with `python -m bench.sm90_resources`, which compiles each launch as the
# JIT specialises it at aligned shapes (Triton 3.9 and 3.6; table in bench/README.md): no candidate spills in any
# flag combination, and the programs-per-SM figure (default 1) is what the registers and shared memory allow
# (the check holds it). 128 x 256 tiles spill with entropy and bias, and so does the dZ kernel's 64 x 256 x 64 under
# Triton 3.6 (ragged shapes); 128 x 128 x 64 in 3 stages is Triton's usual Hopper GEMM shape.
_CANDIDATES = {
    ("forward", "16-bit"): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    ("backward", "16-bit"): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 3)],
    ("forward", "tf32"): [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 256, 16, 8, 3)],
    ("backward", "tf32"): [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3)],
    ("forward", "ieee"): [(64, 64, 32, 8, 3, 2)],  # (64, 128, 32) spills in 3.9, (64, 64, 16) in 3.6
    ("backward", "ieee"): [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3, 2)],
}
# The logsumexp pass of the local-loss mode also stores its tiles, which costs 30 to 60 registers: with entropy at a
# ragged V the forward's 128 x 128 tiles then spill (8 to 32 bytes) under Triton 3.6 and 3.9, and IEEE float32's
# 8-warp tile spills even aligned. These tiles keep 150 to 210 registers and no spill in every variant under both.
_CANDIDATES.update(
    {
        ("store", "16-bit"): [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
        ("store", "tf32"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
        ("store", "ieee"): [(64, 32, 32, 4, 3, 2), (32, 64, 32, 4, 3, 2)],
    }
)
_INTERPRETER_CONFIG = TileConfig(
    block_n=16, block_v=32, block_d=16, num_warps=4, num_stages=1, group_n=2, programs_per_sm=4
)


# Per-SM limits of Hopper (sm_90): 64K 32-bit registers, 228 KiB of shared memory.
SM90_REGISTERS = 65536
SM90_SHARED_PER_SM = 233472


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (opt-in maximum where torch reports it)."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return int(optin or getattr(props, "shared_memory_per_block", 49152))


def _fit(config: TileConfig, n_rows: int, element_size: int, shared_memory: int, backward: bool) -> TileConfig:
    """Shrink the token block for small N, then the pipeline depth and the D chunk while a shared-memory estimate
    (the pipelined operand tiles, which both kernels hold; the measured sm_90 figure) exceeds the device's."""
    del backward  # the dZ kernel stores its tile straight from registers: the same estimate as the forward's
    block_n = min(config.block_n, max(16, triton.next_power_of_2(max(n_rows, 1))))
    block_d, stages = config.block_d, config.num_stages

    def estimate(stages: int, chunk: int) -> int:
        return stages * (block_n + config.block_v) * chunk * element_size

    while estimate(stages, block_d) > shared_memory and stages > 2:
        stages -= 1
    while estimate(stages, block_d) > shared_memory and block_d > 16:
        block_d //= 2
    return replace(config, block_n=block_n, block_d=block_d, num_stages=stages)


def candidate_configs(
    dtype: torch.dtype,
    *,
    backward: bool,
    shared_memory: int,
    n_rows: int = 1 << 20,
    store: bool = False,
) -> list[TileConfig]:
    """The distinct candidates for a kernel (the dZ kernel with `backward`, the logits-storing logsumexp pass with
    `store`, else the forward's) on `dtype` operands, fitted to `n_rows` and `shared_memory`."""
    operands = "16-bit" if dtype != torch.float32 else dot_precision(dtype)
    element_size = torch.empty(0, dtype=dtype).element_size()
    kernel = "backward" if backward else ("store" if store else "forward")
    configs = []
    for shape in _CANDIDATES[(kernel, operands)]:
        shape = shape[:5] + (8,) + shape[5:]  # group_n
        fitted = _fit(TileConfig(*shape), n_rows, element_size, shared_memory, backward)
        if fitted not in configs:
            configs.append(fitted)
    return configs


def choose_tile_configs(
    n_rows: int, dtype: torch.dtype, device: torch.device, *, backward: bool, store: bool = False
) -> list[TileConfig]:
    """The configs to try on `device`, the default first; one small config under the interpreter."""
    if running_in_interpreter():
        return [_INTERPRETER_CONFIG]
    memory = shared_memory_bytes(device)
    return candidate_configs(dtype, backward=backward, shared_memory=memory, n_rows=n_rows, store=store)


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def tuning_key(kernel: str, device: torch.device, dtype: torch.dtype, n_rows: int, *shape_and_flags) -> tuple:
    """Configs are tuned per kernel, device, dtype, precision, the given shape/flags and a power-of-two N bucket."""
    bucket = triton.next_power_of_2(max(n_rows, 1))
    return (kernel, device.type, device.index, dtype, dot_precision(dtype), bucket, *shape_and_flags)


def _shrink(config: TileConfig) -> TileConfig | None:
    """The next smaller config to try after an out-of-shared-memory failure, or None at the floor."""
    if config.num_stages > 2:
        return replace(config, num_stages=config.num_stages - 1)
    if config.block_d > 16:
        return replace(config, block_d=config.block_d // 2)
    if config.block_n > 16:
        return replace(config, block_n=config.block_n // 2)
    if config.block_v > 32:
        return replace(config, block_v=config.block_v // 2)
    return None


_FITTED_CONFIGS: dict[tuple, TileConfig] = {}
_TUNED_CONFIGS: dict[tuple, TileConfig] = {}


def launch_with_fallback(key: tuple, config: TileConfig, launch: Callable[[TileConfig], T]) -> T:
    """Return ``launch(config)``; when the compiled kernel needs more shared memory than the device offers (raised
    before anything runs), retry with smaller tiles and remember the config that fitted under ``(key, config)``."""
    wanted = config
    config = _FITTED_CONFIGS.get((key, wanted), wanted)
    while True:
        try:
            result = launch(config)
        except OutOfResources:
            config = _shrink(config)
            if config is None:
                raise
            continue
        if config != wanted:
            _FITTED_CONFIGS[(key, wanted)] = config
        return result


def median_ms(fn: Callable[[], object]) -> float:
    """Median device time of ``fn`` in milliseconds (CUDA events)."""
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tuned_launch(
    key: tuple,
    configs: list[TileConfig],
    launch: Callable[[TileConfig], T],
    *,
    tune: bool,
    reset: Callable[[], None] | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> T:
    """``launch`` with the best of ``configs`` for ``key``: with ``tune``, the first call times each candidate
    (a candidate that does not fit the device is skipped) and keeps the fastest; ``reset`` then clears what the
    timed runs accumulated into the outputs, before the one launch whose result is returned. Without ``tune``,
    the first config (shrunk if the device rejects it). ``timer`` defaults to :func:`median_ms`."""
    best = _TUNED_CONFIGS.get(key)
    if best is None and tune and len(configs) > 1:
        timings = {}
        for config in configs:
            try:
                timings[config] = (timer or median_ms)(lambda config=config: launch(config))
            except OutOfResources:
                continue
        if timings:
            best = min(timings, key=timings.get)
            _TUNED_CONFIGS[key] = best
        if reset is not None:
            reset()
    return launch_with_fallback(key, best or configs[0], launch)
