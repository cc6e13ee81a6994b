"""Shared test setup: Triton runs under its interpreter on CPU; GPU tests are skipped without CUDA."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a lent GPU: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def private_datasets_cache(tmp_path_factory):
    """The tokenisation cache (under datasets' cache folder) of this test session, never the user's."""
    import datasets

    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: stories260k's ops are far too small to split across threads, and on a
    busy CPU doing so costs 10-60x. Modules opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the checkout (real data and a real tiny model); skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: real-data tests need the shared folder beside the repo")
    return SHARED


@pytest.fixture
def paths(shared_dir) -> dict[str, str]:
    """The real small model (stories260k) and preference data (hh-rlhf harmless) of ../shared."""
    return {
        "model": str(shared_dir / "models" / "stories260k"),
        "hh": str(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"),
    }
