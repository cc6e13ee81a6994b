"""``aam-fast demo`` (``make demo``): train an AAM-PR reward model on the bundled role-play pairs, on a CPU.

The pairs (``aam_fast/demo/roleplay_pairs.jsonl``: character profiles as system messages, in-character chosen
replies, bland or persona-breaking rejected ones, some ambiguous, some Chinese) are split by prompt hash; only the top
layers of SmolLM2-135M-Instruct (:mod:`aam_fast.demo_assets`) train (the frozen trunk is shared with the PR
reference), and the held-out pairs are evaluated with the length baseline beside the accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ...demo_assets import DEMO_RM_NAME, cache_dir, choose_threads, converted_model, demo_data_path
from .config import RMConfig
from .evaluate import format_report
from .trainer import train_reward_model


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
        overwrite=True,
    )


def run_demo(args: argparse.Namespace) -> int:
    started = time.time()
    output = Path(args.output) if args.output else cache_dir() / DEMO_RM_NAME
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
        "or: from aam_fast.modeling import RewardScorer; RewardScorer(path)(prompts, completions)\n"
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
