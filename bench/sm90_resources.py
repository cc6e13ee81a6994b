"""Compile aam_fast's Triton kernels for Hopper (sm_90) on any machine, no GPU needed, exactly as Triton's JIT
specialises them at a given shape, and report what each config costs: registers per thread, stack bytes (register
spills), shared memory, pipeline stages, and whether the PTX uses cp.async / TMA and wgmma.

    python -m bench.sm90_resources                 # every candidate config at the aligned, ragged, odd-d shapes
    python -m bench.sm90_resources --check         # the same; exit 1 if one spills or exceeds shared memory
    python -m bench.sm90_resources --dtypes bf16   # only some operand types (bf16, fp16, fp32, tf32)

The launchers build their arguments in `lse_partials_launch` / `dz_launch`; this script calls those same builders
on meta tensors (no memory) of the main shape, then runs Triton's own JIT binder on the result, so the compiled
variant carries what the runtime's would: pointers and integers divisible by 16 marked so (vectorised loads,
cp.async pipelining), unit strides folded in as constants. "aligned" is N=8192, D=4096, V=128256 (every size a
multiple of 16); "ragged" is N=8191, V=128257 with D=4096 (what a batch with ignored tokens gives: the sizes are
bounds, the strides stay aligned); "odd-d" is D=4093 too, where Triton compiles the unspecialised variant (no
hidden size of a real model is odd). `--check` also holds each candidate's programs-per-SM figure (which sizes
the forward's waves) to what its registers and shared memory allow.
Triton compiles to a cubin with its bundled ptxas; `cuobjdump -res-usage` reads the resources back. Run it without
TRITON_INTERPRET (the interpreter replaces `triton.jit`).
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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
SHAPES = {"aligned": (8192, 4096, 128256), "ragged": (8191, 4096, 128257), "odd-d": (8191, 4093, 128257)}
HELD_SHAPES = ("aligned", "ragged")  # `--check` holds these; odd-d (no real model has an odd D) is reported only


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes of local stack per thread: > 0 means spilled registers
    shared: int  # bytes of shared memory per block
    stages: int  # the num_stages the kernel was compiled with
    async_copy: bool  # cp.async or TMA (cp.async.bulk) loads in the PTX: the software pipeline is there
    wgmma: bool  # Hopper's asynchronous warpgroup MMA


def _tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"triton's bundled {name} is missing at {path}")
    return path


def jit_compile_sm90(fn, args: tuple, kwargs: dict):
    """Compile `fn[grid](*args, **kwargs)` for sm_90 the way Triton's JIT does on a device: its own binder
    specialises the arguments (divisibility by 16, integers equal to 1 as constants), then `triton.compile`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def launch_resources(fn, args: tuple, kwargs: dict) -> Resources:
    """Resources of the sm_90 cubin that the launch `fn[grid](*args, **kwargs)` would compile to."""
    kernel = jit_compile_sm90(fn, args, kwargs)
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
    ptx = kernel.asm["ptx"]
    return Resources(
        registers,
        stack,
        max(static_shared, int(kernel.metadata.shared)),  # Triton's shared memory is dynamic (metadata.shared)
        int(kwargs.get("num_stages", 3)),
        "cp.async" in ptx,
        "wgmma" in ptx,
    )


def meta_inputs(shape: tuple[int, int, int], dtype: torch.dtype, has_bias: bool):
    """Meta tensors (shapes and strides, no memory) of one call: hidden [N, D], weight [V, D], bias, targets."""
    n, d, v = shape
    meta = torch.device("meta")
    hidden = torch.empty(n, d, dtype=dtype, device=meta)
    weight = torch.empty(v, d, dtype=dtype, device=meta)
    bias = torch.empty(v, dtype=dtype, device=meta) if has_bias else None
    return hidden, weight, bias, torch.empty(n, dtype=torch.long, device=meta)


def first_chunk_buffer(shape, dtype, granule: int):
    """The first chunk's dZ buffer (a 16-byte-aligned ``[rows, V]`` meta view) as the default budget plans it."""
    from aam_fast.ops.triton_chunks import aligned_width, plan_chunks

    n, d, v = shape
    element_size = torch.empty(0, dtype=dtype).element_size()
    rows = plan_chunks(n, v * element_size, granule, 4 * v * d).rows
    return torch.empty(rows, aligned_width(v, element_size), dtype=dtype, device="meta")[:, :v]


def forward_resources(config, dtype, shape, *, with_entropy=False, has_bias=False, store=False) -> Resources:
    """The logsumexp kernel at `shape`; with `store`, the local-loss mode's variant over its first chunk, which also
    writes the logits tiles."""
    from aam_fast.ops.triton_forward import _lse_partials_kernel, lse_partials_launch
    from aam_fast.ops.triton_local_loss import storage_dtype

    hidden, weight, bias, _ = meta_inputs(shape, dtype, has_bias)
    logits = None
    if store:
        logits = first_chunk_buffer(shape, dtype, config.block_n)
        hidden, logits = hidden[: logits.shape[0]], logits.view(storage_dtype(dtype))
    _, args, kwargs = lse_partials_launch(hidden, weight, bias, 1.0, with_entropy, config, logits)
    return launch_resources(_lse_partials_kernel, args, kwargs)


def in_place_resources(dtype, shape, *, with_entropy=False, has_bias=False, grad_filter=False) -> Resources:
    """The local-loss mode's in-place dZ kernel (one fixed tile) over the first chunk at `shape`."""
    from aam_fast.ops.triton_local_loss import _dz_in_place_kernel, dz_in_place_launch, in_place_tile, storage_dtype

    dz = first_chunk_buffer(shape, dtype, 128)
    rows, v = dz.shape
    vec = torch.empty(rows, dtype=torch.float32, device="meta")
    tile_max = torch.empty(rows, -(-v // 128), dtype=torch.float32, device="meta")
    targets = torch.empty(rows, dtype=torch.long, device="meta")
    vectors = (targets, vec, vec if with_entropy else None, vec, vec if with_entropy else None, vec)
    _, args, kwargs = dz_in_place_launch(
        dz, dz.view(storage_dtype(dtype)), tile_max, 128, vectors, 1.0, 1.0, 2.0**-12 if grad_filter else 0.0, has_bias
    )
    assert in_place_tile()[0] == kwargs["BLOCK_N"]
    return launch_resources(_dz_in_place_kernel, args, kwargs)


def backward_resources(config, dtype, shape, *, with_entropy=False, has_bias=False, grad_filter=False) -> Resources:
    """The dZ kernel of the first token chunk at `shape` (the chunk the default AAM_FAST_TRITON_CHUNK_MB gives)."""
    from aam_fast.ops.triton_backward import _dz_kernel, dz_launch

    hidden, weight, bias, targets = meta_inputs(shape, dtype, has_bias)
    dz = first_chunk_buffer(shape, dtype, config.block_n)
    rows = dz.shape[0]
    vec = torch.empty(shape[0], dtype=torch.float32, device="meta")
    _, args, kwargs = dz_launch(
        hidden[:rows], weight, bias, targets[:rows], vec[:rows], vec[:rows] if with_entropy else None, vec[:rows],
        vec[:rows] if with_entropy else None, dz, 1.0, 1.0, 2.0**-12 if grad_filter else 0.0, has_bias, config,
    )  # fmt: skip
    return launch_resources(_dz_kernel, args, kwargs)


# (kernel name, candidate list, flag combinations): plain and the heaviest (entropy, bias), the dZ kernel with the
# filter, the local-loss mode's logits-storing pass with its own candidates.
KERNELS = (
    ("forward", {}, [("plain", {}), ("entropy+bias", {"with_entropy": True, "has_bias": True})]),
    ("store", {"store": True}, [("store", {"store": True}), ("store+entropy", {"store": True, "with_entropy": True}),
                                ("store+entropy+bias", {"store": True, "with_entropy": True, "has_bias": True})]),
    ("dz", {"backward": True}, [("plain", {}), ("entropy+bias", {"with_entropy": True, "has_bias": True}),
                                ("filter", {"grad_filter": True})]),
)  # fmt: skip


def rows(dtype_names, shape_names, plain_only=False):
    """Yield `(kernel, operands, shape name, variant, config, Resources)` for every candidate config, and for the
    local-loss mode's in-place kernel (one fixed tile)."""
    from aam_fast.ops.triton_local_loss import in_place_tile
    from aam_fast.ops.triton_tuning import TileConfig, candidate_configs

    for name in dtype_names:
        dtype = DTYPES[name]
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        for kernel, which, flag_sets in KERNELS:
            measure = backward_resources if kernel == "dz" else forward_resources
            for config in candidate_configs(dtype, shared_memory=H100_SHARED_MEMORY, **{"backward": False, **which}):
                for shape_name in shape_names:
                    for variant, flags in flag_sets[:1] if plain_only else flag_sets:
                        yield kernel, name, shape_name, variant, config, measure(config, dtype, SHAPES[shape_name],
                                                                                 **flags)  # fmt: skip
        block_n, block_v, warps = in_place_tile()
        fixed = TileConfig(block_n, block_v, 0, warps, 1)
        for shape_name in shape_names:
            for variant, flags in KERNELS[2][2][:1] if plain_only else KERNELS[2][2]:
                yield "in-place", name, shape_name, variant, fixed, in_place_resources(dtype, SHAPES[shape_name],
                                                                                       **flags)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a config spills or overflows shared memory")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,tf32", help="comma-separated: bf16, fp16, fp32, tf32")
    parser.add_argument("--shapes", default="aligned,ragged,odd-d", help="comma-separated: aligned, ragged, odd-d")
    parser.add_argument("--variants", default="all", choices=("all", "plain"), help="flag combinations to compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces triton.jit and cannot compile")
    import triton

    dtype_names = [x for x in args.dtypes.split(",") if x]
    shape_names = [x for x in args.shapes.split(",") if x]
    for name in dtype_names + shape_names:
        if name not in DTYPES and name not in SHAPES:
            raise SystemExit(f"unknown --dtypes/--shapes entry {name!r}")

    print(f"triton {triton.__version__}, sm_90, {H100_SHARED_MEMORY} B shared memory per block")
    print("kernel   operands shape      variant       config (n, v, d, warps, stages, group, per SM)  regs stack "
          "shared async wgmma")  # fmt: skip
    failures = []
    for kernel, operands, shape_name, variant, config, res in rows(dtype_names, shape_names, args.variants == "plain"):
        shape = (config.block_n, config.block_v, config.block_d, config.num_warps, config.num_stages, config.group_n,
                 config.programs_per_sm)  # fmt: skip
        print(
            f"{kernel:8} {operands:8} {shape_name:10} {variant:13} {str(shape):47} {res.registers:4} {res.stack:5} "
            f"{res.shared:6} {'yes' if res.async_copy else 'no':5} {'yes' if res.wgmma else 'no'}",
            flush=True,
        )
        if shape_name in HELD_SHAPES and (res.stack > 0 or res.shared > H100_SHARED_MEMORY):
            failures.append(f"{kernel} {operands} {shape_name} {variant} {shape}: spills or too much shared memory")
        if shape_name in HELD_SHAPES and not fits_programs_per_sm(res, config):
            failures.append(f"{kernel} {operands} {shape_name} {variant} {shape}: {config.programs_per_sm} per SM")
    if args.check and failures:
        raise SystemExit("failed: " + "; ".join(failures))


def fits_programs_per_sm(res: Resources, config) -> bool:
    """Whether `config.programs_per_sm` programs of these resources fit one sm_90 SM (registers are allocated per
    warp in units of 256, i.e. per thread in units of 8)."""
    from aam_fast.ops.triton_tuning import SM90_REGISTERS, SM90_SHARED_PER_SM

    per_thread = -(-res.registers // 8) * 8
    threads = 32 * config.num_warps
    count = config.programs_per_sm
    return count * per_thread * threads <= SM90_REGISTERS and count * (res.shared + 1024) <= SM90_SHARED_PER_SM


if __name__ == "__main__":
    main()
