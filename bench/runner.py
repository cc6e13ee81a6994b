"""Run one benchmark case (workload × provider × shape) under pytest-benchmark and record what it cost.

Each case builds its inputs from the shared per-shape inputs (views, no copies), warms up where the provider
compiles or autotunes, then times `rounds` rounds in pedantic mode (one call per round). Before every round the
previous round's outputs are freed and the memory meter is reset, so each round's peak is its own. The recorded
`extra_info` holds the peak extra memory, the outputs' size, the same-run floor (bare matrix products) and the
shape, dtype, device and versions; `bench.report` turns the JSON into tables and plots.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
import torch

from .inputs import BaseInputs, make_inputs, perturbed
from .measure import matmul_floor, memory_meter, product_flops, synchronize, timed
from .providers import GRPOBatch, PairBatch, Provider, Unavailable, all_providers, is_peer, sequence_mean
from .shapes import Shape

# Matrix products of size N×D×V in each workload's floor.
FLOOR_PRODUCTS = {"logprobs-fwd": 1, "logprobs-fwdbwd": 4, "aam-detached": 1, "aam-trained": 4, "grpo": 4}
PAIR_BETA = 1.0
PAIR_SFT_WEIGHT = 0.1
GRPO_EPSILON = 0.2
GRPO_BETA = 0.04


@dataclass
class Timing:
    """Round policy: rounds fill `case_seconds`, between `min_rounds` and `max_rounds`."""

    case_seconds: float
    min_rounds: int
    max_rounds: int

    def rounds(self, estimate_s: float) -> int:
        fit = int(self.case_seconds / max(estimate_s, 1e-6))
        return max(self.min_rounds, min(self.max_rounds, fit))


CPU_TIMING = Timing(case_seconds=4.0, min_rounds=1, max_rounds=3)
CUDA_TIMING = Timing(case_seconds=1.0, min_rounds=3, max_rounds=10)


def _device_name(device: torch.device) -> str:
    """ "NVIDIA H100 80GB HBM3", or the CPU model and its CPU count ("AMD EPYC, 2 CPUs")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


@dataclass
class BenchEnv:
    """Session state: device, meter, providers, and caches of inputs and floors (inputs: the last two shapes)."""

    device: torch.device
    set_name: str
    providers: dict[str, Provider] = field(default_factory=all_providers)
    warmed: set = field(default_factory=set)
    _inputs: OrderedDict = field(default_factory=OrderedDict)
    _floors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.meter = memory_meter(self.device)
        self.timing = CUDA_TIMING if self.device.type == "cuda" else CPU_TIMING
        self.device_name = _device_name(self.device)
        self.threads = torch.get_num_threads()

    def inputs(self, shape: Shape) -> BaseInputs:
        key = (shape.tokens, shape.d, shape.v, shape.dtype)
        if key not in self._inputs:
            while len(self._inputs) >= 2:
                self._inputs.popitem(last=False)
            self._inputs[key] = make_inputs(shape, self.device)
        self._inputs.move_to_end(key)
        return self._inputs[key]

    def floor(self, shape: Shape) -> dict[str, float]:
        key = (shape.tokens, shape.d, shape.v, shape.dtype)
        if key not in self._floors:
            base = self.inputs(shape)
            one_product = timed(lambda: base.hidden @ base.weight.t(), self.device)
            rounds = 3 if one_product < 1.0 else 1
            self._floors[key] = matmul_floor(base.hidden, base.weight, rounds)
        return self._floors[key]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build_step(workload: str, provider: Provider, base: BaseInputs, shape: Shape):
    """A zero-argument callable that runs one iteration of `workload` and returns the tensors it produced."""
    if workload == "logprobs-fwd":
        hidden, weight, targets = base.hidden, base.weight, base.targets

        def step():
            with torch.no_grad():
                return (provider.token_logprobs(hidden, weight, targets),)

        return step
    if workload == "logprobs-fwdbwd":
        hidden = base.hidden.detach().requires_grad_(True)
        weight = base.weight.detach().requires_grad_(True)
        targets, grad_out = base.targets, base.grad_out

        def step():
            return provider.logprobs_and_grads(hidden, weight, targets, grad_out)

        return step
    rows, seq_len = shape.rows, shape.seq_len
    trained = workload in ("aam-trained", "grpo")
    hidden = base.hidden.detach().view(rows, seq_len, shape.d).requires_grad_(trained)
    weight = base.weight.detach().requires_grad_(trained)
    targets = base.targets.view(rows, seq_len)
    token_logps = base.target_logps.view(rows, seq_len)
    gen = torch.Generator(device=base.hidden.device)
    gen.manual_seed(rows * 1000 + seq_len)
    if workload in ("aam-detached", "aam-trained"):
        rewards = torch.randn(rows, generator=gen, device=base.hidden.device).requires_grad_(True)
        ref_logps = perturbed(sequence_mean(token_logps, targets), 0.05, seed=rows + seq_len)
        batch = PairBatch(
            hidden,
            weight,
            targets,
            rewards,
            ref_logps,
            beta=PAIR_BETA,
            sft_weight=PAIR_SFT_WEIGHT if trained else 0.0,
        )
        wrt = (rewards, hidden, weight) if trained else (rewards,)
        detach = not trained

        def step():
            loss = provider.pairwise_loss(batch, detach_margin=detach)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            return (loss.detach(), *[g for g in grads if g is not None])

        return step
    if workload == "grpo":
        advantages = torch.randn(rows, generator=gen, device=base.hidden.device)
        batch = GRPOBatch(
            hidden,
            weight,
            targets,
            advantages,
            old_logps=perturbed(token_logps, 0.1, seed=1 + rows * seq_len),
            ref_logps=perturbed(token_logps, 0.2, seed=2 + rows * seq_len),
            epsilon=GRPO_EPSILON,
            beta=GRPO_BETA,
        )

        def step():
            loss = provider.grpo_loss(batch)
            grads = torch.autograd.grad(loss, (hidden, weight))
            return (loss.detach(), *grads)

        return step
    raise ValueError(f"unknown workload {workload!r}")


def _skip_if_peer_failed(provider: Provider, device: torch.device, exc: BaseException):
    """A peer that cannot run here is skipped with the reason; aam_fast errors always propagate."""
    if not is_peer(provider.name):
        raise exc
    if isinstance(exc, torch.OutOfMemoryError):
        pytest.skip(f"{provider.name} ran out of memory on {device}")
    message = " ".join(str(exc).split())[:300]
    pytest.skip(f"{provider.name} failed on {device}: {type(exc).__name__}: {message}")


def _check_finite(provider: Provider, outputs) -> None:
    for tensor in outputs:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AssertionError(f"{provider.name} produced non-finite values (shape {tuple(tensor.shape)})")


def run_case(benchmark, env: BenchEnv, workload: str, provider_name: str, shape: Shape) -> None:
    """Benchmark one case, or skip it with the reason the provider gives."""
    provider = env.providers[provider_name]
    try:
        provider.check(workload, env.device)
    except Unavailable as exc:
        pytest.skip(str(exc))
    if env.device.type == "cpu" and shape.dtype != "float32":
        pytest.skip(f"{shape.dtype} matrix products are not a CPU benchmark")
    base = env.inputs(shape)
    floor = env.floor(shape)
    floor_products = FLOOR_PRODUCTS[workload]
    floor_key = "forward" if floor_products == 1 else "forward_backward"
    floor_s, floor_cpu_s = floor[floor_key], floor[floor_key + "_cpu"]
    step = build_step(workload, provider, base, shape)

    estimate_s, warmup_s = floor_s * 1.5, None
    # Compiled graphs differ by input rank too ([N, D] token workloads, [rows, T, D] losses).
    key = (provider.warmup_key(workload), shape.seq_len > 0)
    on_cuda = env.device.type == "cuda"
    if on_cuda or (provider.needs_warmup and key not in env.warmed):
        # CPU: once per compiled graph (the time then includes compiling). CUDA: every case, twice where the
        # provider compiles or autotunes, so that the second warm-up gives the estimate that sets the rounds.
        for _ in range(2 if on_cuda and provider.needs_warmup else 1):
            try:
                warmup_s = timed(step, env.device)
            except Exception as exc:  # a peer that cannot run here becomes a skip
                _skip_if_peer_failed(provider, env.device, exc)
        env.warmed.add(key)
        if on_cuda:
            estimate_s = warmup_s
    rounds = env.timing.rounds(estimate_s)

    held: dict = {"outputs": (), "peak": 0, "cpu_s": []}

    def setup():
        held["outputs"] = ()
        if env.meter.unavailable is None:
            env.meter.reset()

    def one_round():
        cpu_start = time.process_time()
        outputs = step()
        synchronize(env.device)
        held["cpu_s"].append(time.process_time() - cpu_start)
        if env.meter.unavailable is None:
            held["peak"] = max(held["peak"], env.meter.peak_extra_bytes())
        held["outputs"] = outputs

    benchmark.group = f"{workload} {shape.id}"
    try:
        benchmark.pedantic(one_round, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    except Exception as exc:
        held["outputs"] = ()
        _skip_if_peer_failed(provider, env.device, exc)
    except BaseException:
        # Interrupted (SIGINT from a time limit, pytest-timeout): pytest-benchmark only drops cases that raised an
        # Exception, and a case without rounds would break its JSON for every other case.
        benchmark.has_error = True
        raise
    outputs = held["outputs"]
    _check_finite(provider, outputs)
    flops = floor_products * product_flops(shape.tokens, shape.d, shape.v)
    benchmark.extra_info.update(
        {
            "workload": workload,
            "provider": provider_name,
            "peer": is_peer(provider_name),
            "shape": shape.id,
            "tokens": shape.tokens,
            "rows": shape.rows,
            "seq_len": shape.seq_len,
            "d": shape.d,
            "v": shape.v,
            "dtype": shape.dtype,
            "device": env.device.type,
            "device_name": env.device_name,
            "threads": env.threads,
            "load_avg_1m": os.getloadavg()[0],
            "bench_set": env.set_name,
            "rounds": rounds,
            "warmup_s": warmup_s,
            "floor_s": floor_s,
            "cpu_median_s": statistics.median(held["cpu_s"]),
            "floor_cpu_s": floor_cpu_s,
            "floor_products": floor_products,
            "floor_flops": flops,
            "floor_local_s": floor["local"],  # three bare products: the local-loss mode's floor
            "peak_extra_mb": None if env.meter.unavailable else held["peak"] / 2**20,
            "memory_note": env.meter.unavailable,
            "output_mb": _tensor_bytes(outputs) / 2**20,
            "input_mb": base.nbytes() / 2**20,
            "input_mean_entropy": base.mean_entropy,
            "provider_version": provider.version(),
            "torch_version": torch.__version__,
        }
    )
    held["outputs"] = ()
