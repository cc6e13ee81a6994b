"""The cases of a benchmark run as read from pytest-benchmark JSON (`load_results`), and the helpers the report and
its criteria share: the fastest peer of a case, the providers' order, number formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def cases(results: list[Result]) -> dict[tuple[str, str], list[Result]]:
    cases: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        cases.setdefault((r.workload, r.shape), []).append(r)
    return cases


def fastest_peer(case: list[Result]) -> Result | None:
    peers = [r for r in case if r.peer]
    return min(peers, key=lambda r: r.median_s) if peers else None


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_mb(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


AAM_FIRST = ("aam-triton", "aam-triton-local", "aam-torch", "aam-native")


def provider_order(name: str) -> tuple[int, str]:
    return (AAM_FIRST.index(name) if name in AAM_FIRST else len(AAM_FIRST), name)


def shape_key(case: list[Result]) -> tuple:
    r = case[0]
    return (r.v, r.d, r.tokens)
