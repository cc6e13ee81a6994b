"""Shared test setup: Triton runs under its interpreter on CPU; GPU tests are skipped without CUDA.

Model and data fixtures. `tiny_paths` (session scope) builds a tiny Llama, its tokenizer and small synthetic
preference and prompt files in a temporary folder (aam_fast/testing.py; no download): the stage, model, packing,
CLI and distributed tests run on it in any clone. `real_paths` / `shared_dir` point into the shared folder beside
the checkout (the real stories260k model and real data sets) and skip where it is absent; the environment variable
AAM_FAST_SHARED overrides its location (AAM_FAST_SHARED=/nonexistent simulates a clone without it).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the test process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (make test): each worker process takes one core, and so do the commands it starts; N workers
    # of two intra-op threads each would contend for the cores, which costs the tiny models' ops 10-60x.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

SHARED = Path(os.environ.get("AAM_FAST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def pytest_collection_modifyitems(config, items):
    """The modules that hold a `slow` test run first (the order is otherwise kept): spread over workers (make test:
    `-n auto --dist loadscope --no-loadscope-reorder`), the longest modules start at once and the short ones fill
    in around them, instead of one long module starting last. Without CUDA the `gpu` tests are skipped."""
    slow = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on a lent GPU: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def private_datasets_cache(tmp_path_factory):
    """The tokenisation cache (under datasets' cache folder) of this test session, never the user's.

    Set without importing `datasets`: through HF_DATASETS_CACHE, which `datasets` reads when a test first imports
    it (and on its config where it is imported already), so the tests that do not use it run where it is absent.
    """
    folder = str(tmp_path_factory.mktemp("datasets-cache"))
    previous = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = folder
    imported = sys.modules.get("datasets")
    if imported is not None:
        imported.config.HF_DATASETS_CACHE = folder
    yield
    if previous is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = previous


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: the tiny models' ops are far too small to split across threads, and on a
    busy CPU doing so costs 10-60x. Modules opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LoggedLines:
    """The lines logged during a test as a command prints them (the package's log handler: one line per message on
    stderr, never a Python warning); :meth:`count` matches them, :meth:`clear` forgets those seen so far."""

    def __init__(self, capsys):
        self.capsys, self.lines = capsys, []

    def clear(self) -> None:
        self.capsys.readouterr()
        self.lines = []

    def count(self, pattern: str) -> int:
        """How many lines logged since the last :meth:`clear` match ``pattern`` (``re.search``)."""
        import re

        self.lines += self.capsys.readouterr().err.splitlines()
        return sum(bool(re.search(pattern, line)) for line in self.lines)


@pytest.fixture
def logged(capsys) -> LoggedLines:
    from aam_fast.training.runtime import package_logger

    package_logger()
    lines = LoggedLines(capsys)
    lines.clear()
    return lines


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (real data and a real tiny model; AAM_FAST_SHARED or ../shared); skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared folder not found at {SHARED} (set AAM_FAST_SHARED): a real-data test")
    return SHARED


@pytest.fixture(scope="session")
def real_paths(shared_dir) -> dict[str, str]:
    """The real small model (stories260k) and data of the shared folder: hh-rlhf harmless pairs, RPBench cards."""
    return {
        "model": str(shared_dir / "models" / "stories260k"),
        "hh": str(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"),
        "cards": str(shared_dir / "data" / "rpbench-auto" / "rpbench_character.jsonl"),
        "scenes": str(shared_dir / "data" / "rpbench-auto" / "rpbench_scene.jsonl"),
    }


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama and synthetic data built in this session (see aam_fast/testing.py), no download:

    `model` (a save_pretrained folder with its byte-level BPE tokenizer, `aam_fast.testing.LAYERS` layers, tied
    embeddings, no chat template), `hh` (hh-rlhf transcripts, .jsonl.gz), `pairs` (TRL conversational records with
    `character` and `topic` columns), `cards` / `scenes` (RPBench-Auto-like). Read-only for the tests.
    """
    from aam_fast.testing import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_period_id(tiny_paths) -> int:
    """The token id of "." in the tiny tokenizer (completions in the GRPO tests stop there)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_paths["model"]).convert_tokens_to_ids(".")
