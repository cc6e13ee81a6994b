"""Compile aam_fast's Triton kernels for Hopper (sm_90) on any machine, no GPU needed, and report what each
config costs: registers per thread, stack bytes (register spills), shared memory.

    python -m bench.sm90_resources            # every candidate config on an H100, every operand type
    python -m bench.sm90_resources --check    # the same; exit 1 if one spills or exceeds shared memory

Triton compiles to a cubin offline with its bundled ptxas; `cuobjdump -res-usage` reads the resources back. The
tests use `kernel_resources` to hold every config the launchers can pick (and every autotuning candidate) to
no spills and the H100's shared memory. Run it without TRITON_INTERPRET (the interpreter replaces `triton.jit`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

H100_SHARED_MEMORY = 232448  # opt-in bytes per block on sm_90 (227 KiB)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes of local stack per thread: > 0 means spilled registers
    shared: int  # bytes of shared memory per block


def _tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"triton's bundled {name} is missing at {path}")
    return path


def _signature(fn, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton type of every argument: pointers as given, constexprs, floats for the scalars named so, else i32."""
    floats = {"inv_temperature", "filter_eps"}
    return {
        name: pointer_types.get(name) or ("constexpr" if name in constexprs else "fp32" if name in floats else "i32")
        for name in fn.arg_names
    }


def kernel_resources(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int) -> Resources:
    """Compile `fn` (a `triton.jit` function) for sm_90 with these constexprs and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(fn, pointer_types, constexprs)
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        report = subprocess.run(
            [str(_tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource line for {fn.__name__}:\n{report}")
    registers, stack, static_shared = (int(x) for x in found.groups())
    # Triton's shared memory is dynamic (metadata.shared); the cubin's SHARED is the static part.
    return Resources(registers, stack, max(static_shared, int(kernel.metadata.shared)))


def backward_pointer_types(dtype: torch.dtype) -> dict[str, str]:
    element = "*" + TRITON_TYPE[dtype]
    types = {name: "*fp32" for name in ("lse_ptr", "mean_z_ptr", "grad_logp_ptr", "grad_entropy_ptr")}
    types |= {name: "*fp32" for name in ("d_hidden_ptr", "d_weight_ptr", "d_bias_ptr")}
    return types | {"hidden_ptr": element, "weight_ptr": element, "bias_ptr": element, "targets_ptr": "*i64"}


def forward_pointer_types(dtype: torch.dtype) -> dict[str, str]:
    element = "*" + TRITON_TYPE[dtype]
    parts = {name: "*fp32" for name in ("part_max_ptr", "part_sumexp_ptr", "part_pz_ptr")}
    return parts | {"hidden_ptr": element, "weight_ptr": element, "bias_ptr": element}


def tile_constexprs(config, dtype: torch.dtype) -> dict:
    from aam_fast.ops.triton_tuning import dot_precision

    return {
        "BLOCK_N": config.block_n,
        "BLOCK_V": config.block_v,
        "BLOCK_D": config.block_d,
        "DOT_PRECISION": dot_precision(dtype),
    }


def forward_resources(config, dtype: torch.dtype, *, with_entropy: bool = False, has_bias: bool = False):
    from aam_fast.ops.triton_forward import _lse_partials_kernel

    constexprs = {"HAS_BIAS": has_bias, "WITH_ENTROPY": with_entropy} | tile_constexprs(config, dtype)
    return kernel_resources(
        _lse_partials_kernel, forward_pointer_types(dtype), constexprs, config.num_warps, config.num_stages
    )


def backward_resources(
    config,
    dtype: torch.dtype,
    *,
    with_entropy: bool = False,
    has_bias: bool = False,
    grad_filter: bool = False,
    compute_dh: bool = True,
    compute_dw: bool = True,
):
    from aam_fast.ops.triton_backward import _backward_kernel

    constexprs = {
        "HAS_BIAS": has_bias,
        "HAS_GRAD_LOGP": True,
        "WITH_ENTROPY": with_entropy,
        "COMPUTE_DH": compute_dh,
        "COMPUTE_DW": compute_dw,
        "COMPUTE_DB": has_bias,
        "SCALE_DZ": dtype == torch.float16,
        "FILTER": grad_filter,
    } | tile_constexprs(config, dtype)
    return kernel_resources(
        _backward_kernel, backward_pointer_types(dtype), constexprs, config.num_warps, config.num_stages
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a config spills or overflows shared memory")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces triton.jit and cannot compile")
    from aam_fast.ops.triton_tuning import candidate_configs

    failures = []
    print("kernel    operands  variant          config (n, v, d, warps, stages)   regs  stack  shared")
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False), (torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        operands = "tf32" if tf32 else TRITON_TYPE[dtype]
        for backward in (False, True):
            for config in candidate_configs(dtype, backward=backward, shared_memory=H100_SHARED_MEMORY):
                for variant, flags in variants(backward):
                    res = (backward_resources if backward else forward_resources)(config, dtype, **flags)
                    shape = (config.block_n, config.block_v, config.block_d, config.num_warps, config.num_stages)
                    print(
                        f"{'backward' if backward else 'forward':9} {operands:9} {variant:16} "
                        f"{str(shape):33} {res.registers:5} {res.stack:6} {res.shared:7}",
                        flush=True,
                    )
                    if res.stack > 0 or res.shared > H100_SHARED_MEMORY:
                        failures.append(f"{'backward' if backward else 'forward'} {operands} {variant} {shape}")
    if args.check and failures:
        raise SystemExit("spills or too much shared memory: " + "; ".join(failures))


def variants(backward: bool) -> list[tuple[str, dict]]:
    """The flag combinations worth compiling: plain, the heaviest (entropy, bias) and, backward, the filter."""
    found = [("plain", {}), ("entropy+bias", {"with_entropy": True, "has_bias": True})]
    return found + ([("filter", {"grad_filter": True})] if backward else [])


if __name__ == "__main__":
    main()
