"""What a run is judged by: the "Must show" criteria (each a ratio at one shape on one kind of device, against its
target), the goals of the first GPU run among them, and their table in the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .results import CLOCKS, Result, fastest_peer, fmt, fmt_mb, fmt_time, provider_order


@dataclass(frozen=True)
class Criterion:
    """One "Must show" line: `value(workload, provider) <op> target` at one shape (tokens, D, V) on one kind of
    device. `provider` is the default backend there; other aam_fast backends measured in the run get rows too."""

    label: str
    device: str
    dtype: str
    shape: tuple[int, int, int]
    workload: str
    provider: str
    metric: str  # "time/floor", "time/three-products", "time/<peer>", "memory/fastest-peer", "workspace-mb", ...
    target: float
    strict: bool = False


_CPU = ("cpu", "float32", (2048, 1024, 151936))


_GPU = ("cuda", "bfloat16", (8192, 4096, 128256))


MUST_SHOW = (
    Criterion("fwd+bwd time vs fastest peer", *_CPU, "logprobs-fwdbwd", "aam-torch", "time/fastest-peer", 1.4),
    Criterion(
        "fwd+bwd peak extra memory vs fastest peer's",
        *_CPU,
        "logprobs-fwdbwd",
        "aam-torch",
        "memory/fastest-peer",
        0.3,
    ),
    Criterion(
        "fwd+bwd working memory (peak extra − outputs) vs fastest peer's",
        *_CPU,
        "logprobs-fwdbwd",
        "aam-torch",
        "working-memory/fastest-peer",
        0.3,
    ),
    Criterion("GRPO token loss time vs fastest peer", *_CPU, "grpo", "aam-torch", "time/fastest-peer", 1.1),
    Criterion("forward time vs one bare product", *_CPU, "logprobs-fwd", "aam-torch", "time/floor", 1.1),
    Criterion("fwd+bwd time vs four bare products", *_GPU, "logprobs-fwdbwd", "aam-triton", "time/floor", 1.3),
    Criterion(
        "fwd+bwd time vs fastest peer (must be faster)",
        *_GPU,
        "logprobs-fwdbwd",
        "aam-triton",
        "time/fastest-peer",
        1.0,
        strict=True,
    ),
    Criterion(
        "fwd+bwd peak extra memory vs Cut Cross-Entropy's", *_GPU, "logprobs-fwdbwd", "aam-triton", "memory/cce", 1.0
    ),
    Criterion("forward time vs one bare product", *_GPU, "logprobs-fwd", "aam-triton", "time/floor", 1.15),
    # The goals of the first GPU run (issue 22), at the main shape.
    Criterion(
        "GRPO token loss (local-loss mode) time vs three bare products, goal",
        *_GPU,
        "grpo",
        "aam-triton",
        "time/three-products",
        1.05,
    ),
    Criterion(
        "fwd+bwd (local-loss mode) time vs three bare products",
        *_GPU,
        "logprobs-fwdbwd",
        "aam-triton-local",
        "time/three-products",
        1.05,
    ),
    Criterion("fwd+bwd time vs four bare products, goal", *_GPU, "logprobs-fwdbwd", "aam-triton", "time/floor", 1.1),
    Criterion(
        "fwd+bwd workspace MB (peak extra − outputs), goal 1.1 GB",
        *_GPU,
        "logprobs-fwdbwd",
        "aam-triton",
        "workspace-mb",
        1.1e9 / 2**20,
    ),
    Criterion(
        "GRPO workspace MB (peak extra − outputs), goal 1.1 GB",
        *_GPU,
        "grpo",
        "aam-triton",
        "workspace-mb",
        1.1e9 / 2**20,
    ),  # fmt: skip
    Criterion(
        "fwd+bwd time vs Liger's Triton kernel", *_GPU, "logprobs-fwdbwd", "aam-triton", "time/liger", 1.0, strict=True
    ),  # fmt: skip
    Criterion(
        "fwd+bwd time vs Cut Cross-Entropy", *_GPU, "logprobs-fwdbwd", "aam-triton", "time/cce", 1.0, strict=True
    ),  # fmt: skip
)


def criterion_value(crit: Criterion, results: list[Result], provider: str | None = None) -> tuple[float | None, str]:
    """The measured ratio for a criterion (for `provider`, default the criterion's) and what it was measured
    against, or (None, why not)."""
    case = [
        r
        for r in results
        if r.workload == crit.workload
        and r.info["device"] == crit.device
        and r.dtype == crit.dtype
        and (r.tokens, r.d, r.v) == crit.shape
    ]
    ours = next((r for r in case if r.provider == (provider or crit.provider)), None)
    if ours is None:
        return None, "not measured"
    if crit.metric == "time/floor":
        return ours.median_s / ours.floor_s, f"floor {fmt_time(ours.floor_s)}"
    if crit.metric == "time/three-products":
        floor = ours.info.get("floor_local_s")
        if floor is None or ours.clock != "wall":
            return None, "three-product floor not recorded (wall clock only)"
        return ours.median_s / floor, f"three products {fmt_time(floor)}"
    if crit.metric == "workspace-mb":
        if ours.peak_mb is None:
            return None, "memory not measured"
        return ours.peak_mb - ours.output_mb, f"outputs {fmt_mb(ours.output_mb)} MB"
    kind, against = crit.metric.split("/", 1)
    if against == "fastest-peer":
        other = fastest_peer(case)
    else:  # a named peer
        other = next((r for r in case if r.provider == against), None)
    if other is None:
        return None, "no peer measured"
    if kind == "time":
        return ours.median_s / other.median_s, f"{other.provider} {fmt_time(other.median_s)}"
    if ours.peak_mb is None or not other.peak_mb:
        return None, "memory not measured"
    if crit.metric == "working-memory/fastest-peer":
        working, other_working = ours.peak_mb - ours.output_mb, other.peak_mb - other.output_mb
        return working / other_working, f"{other.provider} {fmt_mb(other_working)} MB"
    return ours.peak_mb / other.peak_mb, f"{other.provider} {fmt_mb(other.peak_mb)} MB"


def verdict(crit: Criterion, value: float | None) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value < crit.target if crit.strict else value <= crit.target) else "**no**"


def must_show_lines(results: list[Result]) -> list[str]:
    """The criteria this run has cases for, by wall clock and, where recorded, by process CPU time."""
    with_cpu = all(r.median_cpu_s is not None and r.floor_cpu_s is not None for r in results)
    by_clock = {clock: [dataclasses.replace(r, clock=clock) for r in results] for clock in CLOCKS}
    aam_backends = sorted({r.provider for r in results if not r.peer}, key=provider_order)
    lines = []
    for crit in MUST_SHOW:
        for provider in [crit.provider] + [p for p in aam_backends if p != crit.provider]:
            wall, against = criterion_value(crit, by_clock["wall"], provider)
            if wall is None and against == "not measured":
                continue
            op = "<" if crit.strict else "≤"
            shape = "N={}, D={}, V={}, ".format(*crit.shape) + crit.dtype
            row = f"| {provider} {crit.label} | {shape} | {op} {crit.target} | {fmt(wall)} | {against} | "
            row += f"{verdict(crit, wall)} |"
            if with_cpu:
                cpu, against_cpu = criterion_value(crit, by_clock["cpu"], provider)
                row += f" {fmt(cpu)} | {against_cpu} | {verdict(crit, cpu)} |"
            lines.append(row)
    if not lines:
        return []
    head = "| criterion | shape | target | wall clock | against | holds |"
    rule = "|---|---|---|---|---|---|"
    if with_cpu:
        head += " process CPU time | against | holds |"
        rule += "---|---|---|"
    return ["## Must show", "", head, rule, *lines, ""]
