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
import re
from pathlib import Path

from .criteria import must_show_lines
from .results import (
    CLOCKS,
    Result,
    cases,
    fastest_peer,
    fmt,
    fmt_mb,
    fmt_time,
    load_results,
    provider_order,
    shape_key,
)

WORKLOAD_TITLES = {
    "logprobs-fwd": "Token log-probs, forward only",
    "logprobs-fwdbwd": "Token log-probs, forward + backward (random upstream gradient)",
    "aam-detached": "AAM pairwise loss, detached margin",
    "aam-trained": "AAM pairwise loss, trained-through margin + SFT",
    "grpo": "GRPO token loss, forward + backward",
}
PROVIDER_COLORS = {
    "aam-triton": "#d62728",
    "aam-triton-local": "#bcbd22",
    "aam-torch": "#ff7f0e",
    "aam-native": "#e377c2",
    "naive": "#7f7f7f",
    "naive-compile": "#8c564b",
    "liger": "#2ca02c",
    "cce": "#1f77b4",
    "torch-lce": "#9467bd",
}


def _versions(results: list[Result]) -> str:
    versions = {"torch": results[0].info.get("torch_version", "?")}
    for r in results:
        dist = {
            "aam-torch": "aam_fast",
            "aam-triton": "aam_fast",
            "aam-triton-local": "aam_fast",
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
    lines += must_show_lines(results)
    by_case = cases(results)
    tflops = info["device"] == "cuda"
    for workload, title in WORKLOAD_TITLES.items():
        keys = sorted((k for k in by_case if k[0] == workload), key=lambda k: shape_key(by_case[k]))
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
            case = sorted(by_case[key], key=lambda r: provider_order(r.provider))
            best = fastest_peer(case)
            first = case[0]
            products = f"{first.floor_products} product" + ("s" if first.floor_products > 1 else "")
            floor_tflops = f" {first.floor_flops / first.floor_wall_s / 1e12:.3g} |" if tflops else ""
            lines.append(
                f"| {first.shape} | *floor ({products})* | {fmt_time(first.floor_s)} | | 1.00 | | | |{floor_tflops} |"
            )
            for r in case:
                time_ratio = r.median_s / best.median_s if best else None
                mem_ratio = r.peak_mb / best.peak_mb if best and r.peak_mb is not None and best.peak_mb else None
                name = f"**{r.provider}**" if not r.peer else r.provider
                lines.append(
                    f"| {r.shape} | {name} | {fmt_time(r.median_s)} | {fmt(time_ratio)} | "
                    f"{fmt(r.median_s / r.floor_s)} | {fmt_mb(r.peak_mb)} | {fmt(mem_ratio)} | "
                    f"{fmt_mb(r.output_mb)} |" + (f" {r.tflops:.3g} |" if tflops else "") + f" {r.rounds} |"
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
    for provider in sorted(series, key=provider_order):
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
    names = [p for p in sorted(series, key=provider_order) if _metric(series[p][0][1], metric) is not None]
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
