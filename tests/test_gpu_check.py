"""The GPU check (bench/gpu_check.sh) rehearsed on this CPU: every step at tiny shapes under the Triton interpreter,
exit 0, every result file; and the GPU tests run where `datasets` is not installed."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("phases", "correctness", "providers", "gpu-tests")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow  # a dozen Python processes, each importing torch
def test_the_cpu_rehearsal_runs_every_step_and_writes_every_file(tmp_path):
    """`PYTHON=... BENCH_SET=smoke bash bench/gpu_check.sh`: exit 0 and the 8 files a GPU run brings back, each part
    holding what it claims; within two minutes of CPU time (counted over every process it starts, so a busy shared
    machine does not fail it; on an idle 2-core machine about as long in wall-clock time)."""
    out = tmp_path / "out"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},  # its pytest runs are no workers
        "PYTHON": sys.executable,
        "BENCH_SET": "smoke",
        "OUT": str(out),
        "WHEELS_DIR": str(tmp_path / "no-wheels"),  # a developer's .whl/ (GPU wheels) stays out of the rehearsal
    }
    cpu_before, start = _children_cpu_seconds(), time.monotonic()
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    cpu, wall = _children_cpu_seconds() - cpu_before, time.monotonic() - start
    log = (out / "bench.log").read_text() if (out / "bench.log").exists() else result.stdout + result.stderr
    print(f"rehearsal: {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert result.returncode == 0, log[-6000:]
    files = sorted(path.name for path in out.iterdir())
    assert len(files) == 8 and all(f"{part}.json" in files for part in PARTS), files
    assert sum(name.endswith(".md") for name in files) == 1 and sum(name.endswith(".png") for name in files) == 2

    phases = json.loads((out / "phases.json").read_text())
    assert len(phases["phases"]) == 11 and all("median_ms" in entry for entry in phases["phases"].values())
    assert phases["fallback_fired"] is False and "tuned_configs" in phases
    correctness = json.loads((out / "correctness.json").read_text())["shapes"][0]["providers"]
    for name in ("aam-triton", "aam-triton-local", "aam-triton-filter"):
        assert correctness[name]["ok"] is True, (name, correctness[name])
    assert all(("ok" in entry) or entry.get("skipped") for entry in correctness.values())
    timed = {case["extra_info"]["provider"] for case in json.loads((out / "providers.json").read_text())["benchmarks"]}
    assert {"aam-triton", "aam-triton-local", "aam-triton-filter"} <= timed
    tests = json.loads((out / "gpu-tests.json").read_text())["tests"]
    assert {case["outcome"] for case in tests} <= {"passed", "skipped"} and any(
        case["outcome"] == "passed" and "pinned_autotuning" in case["test"] for case in tests
    )
    assert cpu <= 120, f"the rehearsal took {cpu:.0f} s of CPU time ({wall:.0f} s wall)"


def test_the_gpu_tests_run_where_datasets_is_missing():
    """tests/conftest.py imports `datasets` only where a test needs it: with it unimportable, a Triton test file
    still runs (the GPU image may lack it)."""
    code = (
        "import sys; sys.modules['datasets'] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
        "'tests/test_triton_chunks.py::test_bad_chunk_budget_is_refused_by_name']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
