"""Where the time goes at one shape: each phase of aam_fast's Triton path timed on its own, before any benchmark.

    python -m bench.phase_profile --out phases.json                   # N=8192, D=4096, V=128256 bf16 on CUDA
    python -m bench.phase_profile --shape 64,32,200 --dtype float32   # CPU: the interpreter, the CPU clock

Phases (median milliseconds of a few calls, CUDA events on a GPU, the process clock on CPU): one bare product
``h Wᵀ`` (the unit), the forward (logsumexp kernel, target logit, epilogue), the target-logit kernel alone, the dZ
kernel over the first chunk, the two cuBLAS products of that chunk (``dZ W``, ``dZᵀ h``), the whole backward, the
whole ``linear_logprobs`` forward + backward, the local-loss mode's logits pass (storing the tiles) and in-place dZ
pass over the first chunk, the whole local-loss mode and the whole GRPO loss. Also recorded: the chunk plan, the
tile configs the autotuner chose (``triton_tuning``), whether a fallback fired (a config shrunk to fit, the
float32-output product refused) and, for each whole mode, the peak memory above the inputs and that peak minus its
outputs (the workspace). The JSON is rewritten after every phase, so a time-out loses only the running one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from .inputs import make_inputs
from .shapes import token_shape

GRPO_SETTINGS = dict(epsilon=0.2, beta=0.04, kl="k3", loss_type="token-mean", compute_entropy=False)


class PhaseTimer:
    """Median time of a callable: CUDA events around each call on a GPU, the process CPU clock on CPU (every thread
    of this process, unaffected by other jobs on a shared machine)."""

    def __init__(self, device: torch.device):
        self.device = device

    def once_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.process_time()
        fn()
        return (time.process_time() - begin) * 1e3

    def median_ms(self, fn: Callable[[], object], seconds: float, min_calls: int = 2, max_calls: int = 20) -> dict:
        """A warm-up call on a GPU (compiling, autotuning: its time is reported apart; the interpreter compiles
        nothing), then calls until `seconds` are spent (between `min_calls` and `max_calls`)."""
        warmup = self.once_ms(fn) if self.device.type == "cuda" else None
        times, spent = [], 0.0
        while len(times) < min_calls or (len(times) < max_calls and spent < seconds * 1e3):
            times.append(self.once_ms(fn))
            spent += times[-1]
        return {"median_ms": statistics.median(times), "calls": len(times), "warmup_ms": warmup}


def _peak_meter(device: torch.device):
    """`(reset, peak_bytes)` for device memory on CUDA; (None, None) on CPU (the benchmarks measure CPU memory)."""
    if device.type != "cuda":
        return None, None
    state = {}

    def reset():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        state["base"] = torch.cuda.memory_allocated(device)

    def peak():
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - state["base"]

    return reset, peak


def _triton_version() -> str:
    import triton

    return triton.__version__


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Profile:
    """The phases of one shape, recorded into `self.report` and written to `out` after each."""

    def __init__(self, shape, device: torch.device, seconds: float, out: str | None, min_calls: int = 3):
        self.device, self.out, self.min_calls = device, out, min_calls
        self.timer = PhaseTimer(device)
        self.inputs = make_inputs(shape, device)
        self.per_phase_s = seconds
        self.report = {
            "shape": shape.id,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "clock": "cuda events" if device.type == "cuda" else "process cpu time",
            "autotune": os.environ.get("AAM_FAST_AUTOTUNE", "1") != "0",
            "torch": torch.__version__,
            "triton": _triton_version(),
            "phases": {},
        }

    def write(self) -> None:
        if self.out:
            with open(self.out + ".tmp", "w") as handle:
                json.dump(self.report, handle, indent=1, sort_keys=True)
            os.replace(self.out + ".tmp", self.out)

    def phase(self, name: str, fn: Callable[[], object], memory: bool = False) -> None:
        """Time `fn`; with `memory`, also its peak device memory above the inputs and that minus its outputs."""
        try:
            entry = self.timer.median_ms(fn, self.per_phase_s, self.min_calls)
            reset, peak = _peak_meter(self.device)
            if memory and reset is not None:
                reset()
                outputs = fn()
                entry["peak_extra_mb"] = peak() / 2**20
                entry["workspace_mb"] = entry["peak_extra_mb"] - _tensor_bytes(outputs or ()) / 2**20
                del outputs
        except Exception as exc:  # one failing phase must not cost the others
            entry = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        self.report["phases"][name] = entry
        print(json.dumps({name: entry}), flush=True)
        self.write()


def _params(backend_name: str, device, with_entropy: bool = False):
    from aam_fast.ops.linear_logprobs import logprob_params

    return logprob_params(device, backend_name, 1.0, -100, with_entropy, None)


def chunk_phases(profile: Profile) -> None:
    """The pieces of the backward and of the local-loss mode over the first chunk, each alone."""
    from aam_fast.ops import triton_chunks, triton_forward, triton_local_loss
    from aam_fast.ops.triton_backward import _dz_kernel, dz_launch
    from aam_fast.ops.triton_tuning import choose_tile_configs

    base, device = profile.inputs, profile.device
    h, w, y = base.hidden, base.weight, base.targets
    n, dim = h.shape
    vocab = w.shape[0]
    configs = choose_tile_configs(n, h.dtype, device, backward=True)
    plan = triton_chunks.plan_chunks(n, vocab * h.element_size(), max(c.block_n for c in configs), 4 * vocab * dim)
    profile.report["chunk_rows"], profile.report["float32_weight_grad"] = plan.rows, plan.float32_weight_grad
    rows = plan.rows
    params = _params("triton", device)
    with triton_forward.device_context(device):
        lse, _, _ = triton_forward.triton_forward(h[:rows], w, None, y[:rows], params)
        dz = triton_chunks.dz_buffer(rows, vocab, h.dtype, device)
        grad = base.grad_out[:rows].contiguous()

        def dz_kernel():
            grid, args, kwargs = dz_launch(
                h[:rows], w, None, y[:rows], lse, None, grad, None, dz, 1.0, 1.0, 0.0, False, configs[0]
            )
            _dz_kernel[grid](*args, **kwargs)

        d_hidden = torch.empty(rows, dim, dtype=h.dtype, device=device)
        d_weight = torch.empty(vocab, dim, dtype=h.dtype, device=device)
        profile.phase("dz-kernel (first chunk, default config)", dz_kernel)
        profile.phase("dZ·W (cuBLAS)", lambda: triton_chunks.mm_into(d_hidden, dz, w, 1.0, accumulate=False))
        profile.phase("dZᵀ·h (cuBLAS)", lambda: triton_chunks.mm_into(d_weight, dz.t(), h[:rows], 1.0, False))
        stored = dz.view(triton_local_loss.storage_dtype(h.dtype))
        held = {}

        def logits_pass():
            held["lse"], _, held["tile_max"], held["block_v"] = triton_forward.lse_pass(h[:rows], w, None, 1.0, False,
                                                                                       stored)  # fmt: skip

        profile.phase("local-loss logits pass (first chunk, stores the tiles)", logits_pass)
        logp = torch.zeros(rows, device=device)
        vectors = (y[:rows].contiguous(), held["lse"], None, grad, None, grad)

        def in_place():
            grid, args, kwargs = triton_local_loss.dz_in_place_launch(
                dz, stored, held["tile_max"], held["block_v"], vectors, 1.0, 1.0, 0.0, False
            )
            triton_local_loss._dz_in_place_kernel[grid](*args, **kwargs)

        profile.phase("local-loss dZ in place (first chunk)", in_place)
        del logp


def whole_phases(profile: Profile) -> None:
    """The unit product and every whole mode, with their peak memory."""
    import aam_fast
    from aam_fast.ops import triton_forward

    base, device = profile.inputs, profile.device
    h, w, y, g = base.hidden, base.weight, base.targets, base.grad_out
    params = _params("triton", device)
    held = {"logits": torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=device)}
    profile.phase("one bare product h·Wᵀ", lambda: torch.mm(h, w.t(), out=held["logits"]))
    held.clear()
    profile.phase("forward (triton_forward)", lambda: triton_forward.triton_forward(h, w, None, y, params), True)
    profile.phase("target-logit kernel", lambda: triton_forward.launch_target_logit(h, w, None, y, 1.0))

    def logprobs_fwd_bwd():
        leaves = (h.detach().requires_grad_(True), w.detach().requires_grad_(True))
        logp = aam_fast.linear_logprobs(*leaves, y, backend="triton")
        return (logp.detach(), *torch.autograd.grad(logp, leaves, g))

    def local_loss():
        leaves = (h.detach().requires_grad_(True), w.detach().requires_grad_(True))
        loss, _, _ = aam_fast.linear_local_loss(*leaves, y, lambda lp, _: (lp * g).sum(), backend="triton")
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    rows = 8 if h.shape[0] % 8 == 0 else 1  # the benchmark's GRPO batch: 8 completions (of 1024 at N = 8192)
    seq = h.shape[0] // rows
    advantages = torch.linspace(-1.0, 1.0, rows, device=device)
    ref = (base.target_logps - 0.1).view(rows, seq)

    def grpo():
        leaves = (h.detach().view(rows, seq, -1).requires_grad_(True), w.detach().requires_grad_(True))
        out = aam_fast.grpo_loss(*leaves, y.view(rows, seq), advantages, ref_logps=ref, backend="triton",
                                 **GRPO_SETTINGS)  # fmt: skip
        return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))

    profile.phase("linear_logprobs forward+backward", logprobs_fwd_bwd, True)
    profile.phase("local-loss mode, forward+backward (Σ g·logp)", local_loss, True)
    profile.phase("GRPO loss (local-loss mode), forward+backward", grpo, True)


def record_choices(profile: Profile) -> None:
    """The tile configs chosen (tuned or default), the shrunk ones, and the product fallback's state."""
    from aam_fast.ops import triton_chunks, triton_tuning

    def named(table):
        return [{"key": [str(k) for k in key], "config": dataclasses.asdict(config)} for key, config in table.items()]

    profile.report["tuned_configs"] = named(triton_tuning._TUNED_CONFIGS)
    profile.report["shrunk_configs"] = [
        {"key": [str(k) for k in key], "wanted": dataclasses.asdict(wanted), "used": dataclasses.asdict(used)}
        for (key, wanted), used in triton_tuning._FITTED_CONFIGS.items()
    ]
    profile.report["float32_out_product_refused"] = triton_chunks._float32_out_refusal["cuda"]
    profile.report["fallback_fired"] = bool(profile.report["shrunk_configs"]) or bool(
        profile.report["float32_out_product_refused"]
    )
    profile.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8192,4096,128256", help="N,D,V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per phase (after its warm-up)")
    parser.add_argument("--min-calls", type=int, default=3, help="timed calls per phase at least")
    parser.add_argument("--out", default=None, help="write the profile here as JSON")
    args = parser.parse_args(argv)
    try:
        n, d, v = (int(x) for x in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be N,D,V, got {args.shape!r}")
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on CPU the Triton kernels need TRITON_INTERPRET=1 (set it before running)")
    profile = Profile(token_shape(n, d, v, args.dtype), device, args.seconds, args.out, max(1, args.min_calls))
    whole_phases(profile)
    chunk_phases(profile)
    record_choices(profile)
    failed = [name for name, entry in profile.report["phases"].items() if "error" in entry]
    if failed:
        print("phases that failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
