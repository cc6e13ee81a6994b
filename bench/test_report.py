"""bench.report: ratios, the "Must show" verdicts, files written, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from .criteria import MUST_SHOW, criterion_value
from .report import main, write_report
from .results import load_results

SHAPE = {"tokens": 2048, "d": 1024, "v": 151936, "dtype": "float32", "shape": "N2048-D1024-V151936-float32"}


def _bench(workload, provider, median, peak, floor_s, products, cpu_median=None):
    info = {
        **SHAPE,
        "workload": workload,
        "provider": provider,
        "peer": not provider.startswith("aam-"),
        "rows": 1,
        "seq_len": 0,
        "device": "cpu",
        "device_name": "Test CPU, 2 CPUs",
        "threads": 2,
        "load_avg_1m": 1.5,
        "bench_set": "cpu",
        "floor_s": floor_s,
        "cpu_median_s": 2 * median if cpu_median is None else cpu_median,
        "floor_cpu_s": 2 * floor_s,
        "floor_products": products,
        "floor_flops": products * 2 * 2048 * 1024 * 151936,
        "peak_extra_mb": peak,
        "output_mb": 600.0,
        "input_mean_entropy": 2.1,
        "provider_version": "1.0",
        "torch_version": "2.13.0",
    }
    return {"name": f"{workload}[{provider}]", "stats": {"median": median, "rounds": 1}, "extra_info": info}


def _write(tmp_path, benchmarks):
    path = tmp_path / "results.json"
    header = {"machine_info": {"python_version": "3.11"}, "datetime": "2026-11-27T10:00:00", "version": "5.3.1"}
    path.write_text(json.dumps({**header, "benchmarks": benchmarks}))
    return path


def test_ratios_and_verdicts(tmp_path):
    path = _write(
        tmp_path,
        [
            _bench("logprobs-fwdbwd", "aam-torch", 26.0, 700.0, 20.0, 4),
            _bench("logprobs-fwdbwd", "cce", 20.0, 3000.0, 20.0, 4),
            _bench("logprobs-fwdbwd", "naive", 30.0, 5000.0, 20.0, 4),
            _bench("logprobs-fwd", "aam-torch", 5.5, 50.0, 5.0, 1),
            _bench("logprobs-fwd", "naive", 6.0, 2500.0, 5.0, 1),
        ],
    )
    results, _ = load_results([path])
    by_label = {c.label: c for c in MUST_SHOW if c.device == "cpu"}
    time_ratio, against = criterion_value(by_label["fwd+bwd time vs fastest peer"], results)
    assert time_ratio == pytest.approx(1.3) and against.startswith("cce")
    mem_ratio, _ = criterion_value(by_label["fwd+bwd peak extra memory vs fastest peer's"], results)
    assert mem_ratio == pytest.approx(700.0 / 3000.0)
    working, against = criterion_value(
        by_label["fwd+bwd working memory (peak extra − outputs) vs fastest peer's"], results
    )
    assert working == pytest.approx((700.0 - 600.0) / (3000.0 - 600.0)) and against == "cce 2,400 MB"
    native, _ = criterion_value(by_label["fwd+bwd time vs fastest peer"], results, provider="aam-native")
    assert native is None
    floor_ratio, _ = criterion_value(by_label["forward time vs one bare product"], results)
    assert floor_ratio == pytest.approx(1.1)
    assert criterion_value(by_label["GRPO token loss time vs fastest peer"], results) == (None, "not measured")

    md_path = write_report([path], tmp_path / "out")
    assert md_path.name == "cpu-test-cpu-2-cpus-2026-11-27.md"
    text = md_path.read_text()
    crit = "| aam-torch fwd+bwd time vs fastest peer | N=2048, D=1024, V=151936, float32 | ≤ 1.4 | 1.30 |"
    assert crit in text
    assert "| **aam-torch** | 26.00 s | 1.30 | 1.30 | 700 | 0.23 |" in text
    assert "GRPO token loss" not in text.split("## Token")[0]  # an unmeasured criterion is left out
    for suffix in ("-time.png", "-memory.png"):
        plot = md_path.with_name(md_path.stem + suffix)
        assert plot.exists() and plot.stat().st_size > 1000


def test_a_failed_criterion_says_no(tmp_path):
    path = _write(
        tmp_path,
        [
            _bench("logprobs-fwdbwd", "aam-torch", 40.0, 700.0, 20.0, 4, cpu_median=48.0),
            _bench("logprobs-fwdbwd", "cce", 20.0, 900.0, 20.0, 4),
        ],
    )
    text = write_report([path], tmp_path / "out").read_text()
    # Wall clock 40 s / 20 s fails; process CPU time 48 s / 40 s holds: both are shown.
    assert "| ≤ 1.4 | 2.00 | cce 20.00 s | **no** | 1.20 | cce 40.00 s | yes |" in text
    cpu_text = write_report([path], tmp_path / "cpu", clock="cpu").read_text()
    assert "process CPU time" in cpu_text and "| **aam-torch** | 48.00 s | 1.20 |" in cpu_text


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmarks": [{"name": "x", "stats": {"median": 1.0}}]}))
    with pytest.raises(ValueError, match="has no extra_info from bench.runner"):
        load_results([bad])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    assert "not a readable pytest-benchmark JSON file" in capsys.readouterr().err


def test_gpu_report_has_tflops_and_the_gpu_criteria(tmp_path):
    gpu = {"tokens": 8192, "d": 4096, "v": 128256, "dtype": "bfloat16", "shape": "N8192-D4096-V128256-bfloat16"}
    benchmarks = []
    for provider, median, peak in (("aam-triton", 0.060, 1100.0), ("cce", 0.070, 1200.0), ("liger", 0.120, 1500.0)):
        bench = _bench("logprobs-fwdbwd", provider, median, peak, 0.050, 4)
        bench["extra_info"].update(gpu, device="cuda", device_name="NVIDIA H100 80GB HBM3")
        bench["extra_info"]["floor_flops"] = 4 * 2 * 8192 * 4096 * 128256
        benchmarks.append(bench)
    text = write_report([_write(tmp_path, benchmarks)], tmp_path / "out").read_text()
    assert "| out MB | TFLOP/s | rounds |" in text
    assert (
        "| aam-triton fwd+bwd time vs four bare products | N=8192, D=4096, V=128256, bfloat16 | ≤ 1.3 | 1.20 |" in text
    )
    assert "fwd+bwd time vs fastest peer (must be faster) | N=8192, D=4096, V=128256, bfloat16 | < 1.0 | 0.86 |" in text
    # 4 · 2 · 8192 · 4096 · 128256 flops in 60 ms.
    assert f"| {4 * 2 * 8192 * 4096 * 128256 / 0.060 / 1e12:.3g} | 1 |" in text
