"""pytest plumbing for the benchmarks: which shape set, which device, and the parametrisation of every case.

The set is `--bench-set {smoke,cpu,cpu-full,gpu}` (or `--bench-quick` for smoke, or the AAM_BENCH_SET
environment variable); by default "gpu" where CUDA is available, else "cpu". The device is CUDA where
available unless `--bench-device cpu`. `--bench-providers a,b` runs only those providers.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from .providers import PROVIDER_NAMES
from .runner import BenchEnv
from .shapes import SETS, shape_set

# Which shape family each benchmark's `shape` fixture is drawn from.
_FAMILY_OF_FIXTURE = {"token_shape": "token", "pair_shape": "pair", "grpo_shape": "grpo"}


def pytest_addoption(parser):
    group = parser.getgroup("aam-bench", "aam_fast benchmarks")
    group.addoption(
        "--bench-set",
        choices=SETS,
        default=None,
        help="shape set: smoke (tiny), cpu (2-core quick set, < 10 min), cpu-full (whole CPU grid), gpu",
    )
    group.addoption("--bench-quick", action="store_true", help="shorthand for --bench-set smoke")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    group.addoption(
        "--bench-max-rounds",
        type=int,
        default=None,
        help="at most this many timed rounds per case (the GPU check's CPU rehearsal: 1)",
    )
    group.addoption(
        "--bench-providers",
        default=None,
        help="comma-separated provider names to run (default: every provider; bench/providers.py lists them)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Rounds are few and long: a narrower terminal table unless --benchmark-columns was given.
    if hasattr(config.option, "benchmark_columns") and not config.option.benchmark_columns:
        config.option.benchmark_columns = ["min", "median", "max", "rounds"]


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device is available")
    return torch.device(name)


def _set_name(config, device: torch.device) -> str:
    if config.getoption("--bench-quick"):
        return "smoke"
    name = (
        config.getoption("--bench-set")
        or os.environ.get("AAM_BENCH_SET")
        or ("gpu" if device.type == "cuda" else "cpu")
    )
    if name not in SETS:
        raise pytest.UsageError(f"AAM_BENCH_SET must be one of {SETS}, got {name!r}")
    if name == "gpu" and device.type != "cuda":
        raise pytest.UsageError("the gpu bench set needs a CUDA device")
    return name


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    shapes = shape_set(_set_name(config, device), device.type)
    for fixture, family in _FAMILY_OF_FIXTURE.items():
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, shapes[family], ids=[s.id for s in shapes[family]])
    if "provider_name" in metafunc.fixturenames:
        metafunc.parametrize("provider_name", _provider_names(config))


def _provider_names(config) -> list[str]:
    chosen = config.getoption("--bench-providers")
    if not chosen:
        return list(PROVIDER_NAMES)
    names = [name for name in chosen.split(",") if name]
    unknown = [name for name in names if name not in PROVIDER_NAMES]
    if unknown:
        raise pytest.UsageError(f"--bench-providers: unknown {unknown}; known: {', '.join(PROVIDER_NAMES)}")
    return names


@pytest.fixture(scope="session")
def bench_env(request) -> BenchEnv:
    device = _device(request.config)
    env = BenchEnv(device=device, set_name=_set_name(request.config, device))
    max_rounds = request.config.getoption("--bench-max-rounds")
    if max_rounds is not None:
        if max_rounds < 1:
            raise pytest.UsageError(f"--bench-max-rounds must be at least 1, got {max_rounds}")
        env.timing = dataclasses.replace(env.timing, min_rounds=1, max_rounds=max_rounds)
    return env
