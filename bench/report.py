"""Turn pytest-benchmark JSON into a markdown report and plots.

    python -m bench.report RESULTS.json [MORE.json ...] --out bench/results/

writes `<device>-<date>.md` (device, date, versions; the "Must show" ratios where the run has their cases; per
workload a table of median time, ratio to the fastest peer, ratio to the floor, peak extra memory, achieved
TFLOP/s) and `<device>-<date>-time.png` / `-memory.png` (one row per workload: against tokens and against
vocabulary size, one line per provider). Several JSON files (one run split into parts) are merged; their cases
must come from one device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

WORKLOAD_TITLES = {
    "logprobs-fwd": "Token log-probs, forward only",
    "logprobs-fwdbwd": "Token log-probs, forward + backward (random upstream gradient)",
    "aam-detached": "AAM pairwise loss, detached margin",
    "aam-trained": "AAM pairwise loss, trained-through margin + SFT",
    "grpo": "GRPO token loss, forward + backward",
}
AAM_FIRST = ("aam-triton", "aam-torch", "aam-native")
PROVIDER_COLORS = {
    "aam-triton": "#d62728",
    "aam-torch": "#ff7f0e",
    "aam-native": "#e377c2",
    "naive": "#7f7f7f",
    "naive-compile": "#8c564b",
    "liger": "#2ca02c",
    "cce": "#1f77b4",
    "torch-lce": "#9467bd",
}


CLOCKS = ("wall", "cpu")


@dataclass
class Result:
    """One benchmark case: its median times (wall clock, process CPU time) and the runner's extra_info.
    `clock` picks which of the two `median_s` and `floor_s` report."""

    workload: str
    provider: str
    peer: bool
    shape: str
    tokens: int
    d: int
    v: int
    dtype: str
    median_wall_s: float
    median_cpu_s: float | None
    rounds: int
    floor_wall_s: float
    floor_cpu_s: float | None
    floor_products: int
    floor_flops: float
    peak_mb: float | None
    output_mb: float
    info: dict
    clock: str = "wall"

    @property
    def median_s(self) -> float:
        return self.median_cpu_s if self.clock == "cpu" else self.median_wall_s

    @property
    def floor_s(self) -> float:
        return self.floor_cpu_s if self.clock == "cpu" else self.floor_wall_s

    @property
    def tflops(self) -> float:
        return self.floor_flops / self.median_wall_s / 1e12


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
    metric: str  # "time/floor", "time/fastest-peer", "memory/fastest-peer", "working-memory/fastest-peer", ...
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
)


def load_results(paths: list[Path], clock: str = "wall") -> tuple[list[Result], dict]:
    """Results of every case in the files, timed by `clock`, and the first file's header (machine_info,
    datetime, version)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    results, header = [], {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable pytest-benchmark JSON file ({exc})") from exc
        if "benchmarks" not in data:
            raise ValueError(f"{path}: no 'benchmarks' list; pass the file written by --benchmark-json")
        header = header or {k: data.get(k) for k in ("machine_info", "commit_info", "datetime", "version")}
        for bench in data["benchmarks"]:
            info = bench.get("extra_info") or {}
            if "workload" not in info:
                raise ValueError(f"{path}: benchmark {bench.get('name')!r} has no extra_info from bench.runner")
            if clock == "cpu" and info.get("cpu_median_s") is None:
                raise ValueError(f"{path}: benchmark {bench.get('name')!r} has no process CPU time (cpu_median_s)")
            results.append(
                Result(
                    workload=info["workload"],
                    provider=info["provider"],
                    peer=bool(info["peer"]),
                    shape=info["shape"],
                    tokens=int(info["tokens"]),
                    d=int(info["d"]),
                    v=int(info["v"]),
                    dtype=info["dtype"],
                    median_wall_s=float(bench["stats"]["median"]),
                    median_cpu_s=info.get("cpu_median_s"),
                    rounds=int(bench["stats"]["rounds"]),
                    floor_wall_s=float(info["floor_s"]),
                    floor_cpu_s=info.get("floor_cpu_s"),
                    floor_products=int(info["floor_products"]),
                    floor_flops=float(info["floor_flops"]),
                    peak_mb=info.get("peak_extra_mb"),
                    output_mb=float(info.get("output_mb") or 0.0),
                    info=info,
                    clock=clock,
                )
            )
    devices = {(r.info["device"], r.info["device_name"]) for r in results}
    if len(devices) > 1:
        raise ValueError(f"results come from several devices {sorted(devices)}; report one device at a time")
    return results, header


def _cases(results: list[Result]) -> dict[tuple[str, str], list[Result]]:
    cases: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        cases.setdefault((r.workload, r.shape), []).append(r)
    return cases


def fastest_peer(case: list[Result]) -> Result | None:
    peers = [r for r in case if r.peer]
    return min(peers, key=lambda r: r.median_s) if peers else None


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _provider_order(name: str) -> tuple[int, str]:
    return (AAM_FIRST.index(name) if name in AAM_FIRST else len(AAM_FIRST), name)


def _shape_key(case: list[Result]) -> tuple:
    r = case[0]
    return (r.v, r.d, r.tokens)


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
        return ours.median_s / ours.floor_s, f"floor {_fmt_time(ours.floor_s)}"
    if crit.metric == "memory/cce":
        other = next((r for r in case if r.provider == "cce"), None)
    else:
        other = fastest_peer(case)
    if other is None:
        return None, "no peer measured"
    if crit.metric == "time/fastest-peer":
        return ours.median_s / other.median_s, f"{other.provider} {_fmt_time(other.median_s)}"
    if ours.peak_mb is None or not other.peak_mb:
        return None, "memory not measured"
    if crit.metric == "working-memory/fastest-peer":
        working, other_working = ours.peak_mb - ours.output_mb, other.peak_mb - other.output_mb
        return working / other_working, f"{other.provider} {_fmt_mb(other_working)} MB"
    return ours.peak_mb / other.peak_mb, f"{other.provider} {_fmt_mb(other.peak_mb)} MB"


def _verdict(crit: Criterion, value: float | None) -> str:
    if value is None:
        return "n/a"
    return "yes" if (value < crit.target if crit.strict else value <= crit.target) else "**no**"


def _must_show_lines(results: list[Result]) -> list[str]:
    """The criteria this run has cases for, by wall clock and, where recorded, by process CPU time."""
    with_cpu = all(r.median_cpu_s is not None and r.floor_cpu_s is not None for r in results)
    by_clock = {clock: [dataclasses.replace(r, clock=clock) for r in results] for clock in CLOCKS}
    aam_backends = sorted({r.provider for r in results if not r.peer}, key=_provider_order)
    lines = []
    for crit in MUST_SHOW:
        for provider in [crit.provider] + [p for p in aam_backends if p != crit.provider]:
            wall, against = criterion_value(crit, by_clock["wall"], provider)
            if wall is None and against == "not measured":
                continue
            op = "<" if crit.strict else "≤"
            shape = "N={}, D={}, V={}, ".format(*crit.shape) + crit.dtype
            row = f"| {provider} {crit.label} | {shape} | {op} {crit.target} | {_fmt(wall)} | {against} | "
            row += f"{_verdict(crit, wall)} |"
            if with_cpu:
                cpu, against_cpu = criterion_value(crit, by_clock["cpu"], provider)
                row += f" {_fmt(cpu)} | {against_cpu} | {_verdict(crit, cpu)} |"
            lines.append(row)
    if not lines:
        return []
    head = "| criterion | shape | target | wall clock | against | holds |"
    rule = "|---|---|---|---|---|---|"
    if with_cpu:
        head += " process CPU time | against | holds |"
        rule += "---|---|---|"
    return ["## Must show", "", head, rule, *lines, ""]


def _versions(results: list[Result]) -> str:
    versions = {"torch": results[0].info.get("torch_version", "?")}
    for r in results:
        dist = {
            "aam-torch": "aam_fast",
            "aam-triton": "aam_fast",
            "aam-native": "aam_fast",
            "liger": "liger-kernel",
            "cce": "cut-cross-entropy",
        }.get(r.provider)
        if dist:
            versions[dist] = r.info.get("provider_version", "?")
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def _commit(header: dict) -> str:
    commit = header.get("commit_info") or {}
    if not commit.get("id"):
        return "unknown"
    return f"`{commit['id'][:10]}`" + (" with uncommitted changes" if commit.get("dirty") else "")


def device_slug(results: list[Result], header: dict) -> str:
    info = results[0].info
    slug = re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    return slug if info["device"] == "cuda" else f"cpu-{slug}"


def render_markdown(results: list[Result], header: dict, plot_names: list[str]) -> str:
    """The report; its tables use the clock the results were loaded with (`Result.clock`)."""
    clock = results[0].clock
    clock_text = (
        "process CPU time (all threads; robust to other jobs on a shared CPU)" if clock == "cpu" else "wall clock"
    )
    info = results[0].info
    machine = header.get("machine_info") or {}
    loads = [r.info["load_avg_1m"] for r in results if r.info.get("load_avg_1m") is not None]
    entropies = sorted({round(r.info["input_mean_entropy"], 2) for r in results if "input_mean_entropy" in r.info})
    lines = [
        f"# aam_fast benchmarks: {info['device_name']}",
        "",
        f"- **Device**: {info['device_name']} ({info['device']}, {info.get('threads', '?')} torch threads)",
        f"- **Date**: {header.get('datetime', '?')}; **commit** {_commit(header)}",
        f"- **Versions**: {_versions(results)}, Python {machine.get('python_version', '?')}, "
        f"pytest-benchmark {header.get('version', '?')}",
        f"- **Set**: `{info.get('bench_set', '?')}`; inputs: logits ~ N(0, 6²), targets sampled from the softmax "
        f"(mean entropy {', '.join(map(str, entropies))} nats)",
        f"- **Time**: {clock_text}, median of the rounds (one call per round; compiled and autotuned providers "
        "warmed up first). TFLOP/s (CUDA only): the floor's operations over the wall-clock median. "
        "**Floor**: the same run's bare `N×D×V` matrix products (1 for forward-only work, 4 for forward + "
        "backward). **× peer**: time over the fastest peer's (a non-aam_fast provider) in the same case.",
        "- **Peak extra MB**: peak memory above the inputs during one call, outputs (log-probs, gradients) "
        "included; **out MB** is the outputs' own size. CPU: the process's resident-set high-water mark "
        "(`/proc/self/clear_refs` reset); CUDA: `torch.cuda.max_memory_allocated`.",
    ]
    if loads and info["device"] == "cpu":
        lines.append(
            f"- **Load average** (1 min) during the run: {min(loads):.1f} to {max(loads):.1f} on "
            f"{info['device_name'].rsplit(', ', 1)[-1]}: the CPU is shared, so expect timing noise."
        )
    lines.append("")
    lines += _must_show_lines(results)
    cases = _cases(results)
    tflops = info["device"] == "cuda"
    for workload, title in WORKLOAD_TITLES.items():
        keys = sorted((k for k in cases if k[0] == workload), key=lambda k: _shape_key(cases[k]))
        if not keys:
            continue
        lines += [
            f"## {title} (`{workload}`)",
            "",
            "| shape | provider | median | × peer | × floor | peak extra MB | × peer mem | out MB |"
            + (" TFLOP/s |" if tflops else "")
            + " rounds |",
            "|---|---|---|---|---|---|---|---|" + ("---|" if tflops else "") + "---|",
        ]
        for key in keys:
            case = sorted(cases[key], key=lambda r: _provider_order(r.provider))
            best = fastest_peer(case)
            first = case[0]
            products = f"{first.floor_products} product" + ("s" if first.floor_products > 1 else "")
            floor_tflops = f" {first.floor_flops / first.floor_wall_s / 1e12:.3g} |" if tflops else ""
            lines.append(
                f"| {first.shape} | *floor ({products})* | {_fmt_time(first.floor_s)} | | 1.00 | | | |{floor_tflops} |"
            )
            for r in case:
                time_ratio = r.median_s / best.median_s if best else None
                mem_ratio = r.peak_mb / best.peak_mb if best and r.peak_mb is not None and best.peak_mb else None
                name = f"**{r.provider}**" if not r.peer else r.provider
                lines.append(
                    f"| {r.shape} | {name} | {_fmt_time(r.median_s)} | {_fmt(time_ratio)} | "
                    f"{_fmt(r.median_s / r.floor_s)} | {_fmt_mb(r.peak_mb)} | {_fmt(mem_ratio)} | "
                    f"{_fmt_mb(r.output_mb)} |" + (f" {r.tflops:.3g} |" if tflops else "") + f" {r.rounds} |"
                )
            missing = sorted({x.provider for x in results if x.workload == workload} - {r.provider for r in case})
            if missing:
                lines.append(
                    f"| {first.shape} | not run: {', '.join(missing)} | | | | | | |" + (" |" if tflops else "") + " |"
                )
        lines.append("")
    lines.append(
        "Providers that a device cannot run (Triton-only kernels on CPU, peers not installed) are skipped; "
        "the pytest log (`-ra`) gives each reason."
    )
    for name in plot_names:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def _panel_series(results: list[Result], axis: str):
    """Results for one panel: against tokens at the (D, V) with most token counts, or against V at the token
    count with most vocabularies. Returns (x label, {provider: [(x, result)]}) or None."""
    if axis == "tokens":
        groups: dict = {}
        for r in results:
            groups.setdefault((r.d, r.v), []).append(r)
        (d, v), chosen = max(groups.items(), key=lambda kv: (len({r.tokens for r in kv[1]}), kv[0][1]))
        label, xof = f"tokens N (D={d}, V={v})", (lambda r: r.tokens)
    else:
        groups = {}
        for r in results:
            groups.setdefault(r.tokens, []).append(r)
        tokens, chosen = max(groups.items(), key=lambda kv: (len({r.v for r in kv[1]}), kv[0]))
        dims = sorted({r.d for r in chosen})
        dim_text = f"D={dims[0]}" if len(dims) == 1 else "D varies with the model"
        label, xof = f"vocabulary V (N={tokens}, {dim_text})", (lambda r: r.v)
    series: dict[str, list] = {}
    for r in sorted(chosen, key=xof):
        series.setdefault(r.provider, []).append((xof(r), r))
    return label, series


def _metric(r: Result, metric: str) -> float | None:
    return r.median_s if metric == "time" else r.peak_mb


def _plot_lines(ax, series: dict, metric: str) -> None:
    for provider in sorted(series, key=_provider_order):
        points = [(x, _metric(r, metric)) for x, r in series[provider] if _metric(r, metric) is not None]
        if not points:
            continue
        ours = provider.startswith("aam-")
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            "-o" if ours else "--s",
            label=provider,
            color=PROVIDER_COLORS.get(provider),
            linewidth=2.2 if ours else 1.2,
        )
    if metric == "time":
        floor = sorted({(x, r.floor_s) for points in series.values() for x, r in points})
        ax.plot([x for x, _ in floor], [f for _, f in floor], ":^", color="black", label="floor")
    ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))


def _plot_bars(ax, series: dict, metric: str) -> None:
    """One shape only: a bar per provider (and the floor as a line)."""
    names = [p for p in sorted(series, key=_provider_order) if _metric(series[p][0][1], metric) is not None]
    values = [_metric(series[p][0][1], metric) for p in names]
    ax.bar(names, values, color=[PROVIDER_COLORS.get(p, "#333333") for p in names])
    if metric == "time" and names:
        ax.axhline(series[names[0]][0][1].floor_s, color="black", linestyle=":", label="floor")
        ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)


def render_plots(results: list[Result], out_stem: Path) -> list[Path]:
    """Time and memory figures: one row per workload, columns against tokens and against vocabulary (a bar chart
    where the workload was measured at one shape only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    workloads = [w for w in WORKLOAD_TITLES if any(r.workload == w for r in results)]
    info = results[0].info
    written = []
    time_label = "median process CPU time (s)" if results[0].clock == "cpu" else "median wall time (s)"
    for metric, ylabel in (("time", time_label), ("memory", "peak extra memory (MB)")):
        fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 3.6 * len(workloads)), squeeze=False)
        for row, workload in enumerate(workloads):
            subset = [r for r in results if r.workload == workload]
            single_shape = len({r.shape for r in subset}) == 1
            for col, axis in enumerate(("tokens", "vocab")):
                ax = axes[row][col]
                if single_shape and col == 1:
                    ax.axis("off")
                    continue
                xlabel, series = _panel_series(subset, axis)
                if single_shape:
                    _plot_bars(ax, series, metric)
                    ax.set_xlabel(f"provider ({subset[0].shape})")
                else:
                    _plot_lines(ax, series, metric)
                    ax.set_xlabel(xlabel)
                    ax.set_yscale("log")
                    ax.legend(fontsize=7)
                ax.set_ylabel(ylabel)
                ax.set_title(WORKLOAD_TITLES[workload], fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"aam_fast vs peers: {metric}, {info['device_name']}, {results[0].dtype}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        path = out_stem.with_name(f"{out_stem.name}-{metric}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_report(paths: list[Path], out_dir: Path, clock: str = "wall", suffix: str = "") -> Path:
    """Write `<device>-<date><suffix>.md` and its plots into `out_dir`; return the markdown's path."""
    results, header = load_results(paths, clock)
    if not results:
        raise ValueError(f"no benchmark results in {', '.join(map(str, paths))}")
    out_dir.mkdir(parents=True, exist_ok=True)
    date = (header.get("datetime") or "unknown-date")[:10]
    stem = out_dir / f"{device_slug(results, header)}-{date}{suffix}"
    plots = render_plots(results, stem)
    markdown = render_markdown(results, header, [p.name for p in plots])
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown)
    return md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="pytest-benchmark JSON file(s) of one device")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall", help="time the tables by wall clock or process CPU time"
    )
    parser.add_argument("--suffix", default="", help="appended to the file names, e.g. -rerun")
    args = parser.parse_args(argv)
    if args.suffix and not re.fullmatch(r"[A-Za-z0-9._-]+", args.suffix):
        parser.error(f"--suffix may hold letters, digits, '.', '_' and '-' only, got {args.suffix!r}")
    try:
        md_path = write_report(args.results, args.out, args.clock, args.suffix)
    except ValueError as exc:
        parser.error(str(exc))
    print(md_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
