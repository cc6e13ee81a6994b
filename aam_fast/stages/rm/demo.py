"""``aam-fast demo`` (``make demo``): train Bradley-Terry and AAM-PR reward models side by side on the bundled
role-play pairs, on a CPU, through ``aam-fast compare``.

The pairs (``aam_fast/demo/roleplay_pairs.jsonl``: character profiles as system messages, in-character chosen
replies, bland or persona-breaking rejected ones, some ambiguous, some Chinese) are split by prompt hash; only the top
layers of SmolLM2-135M-Instruct (:mod:`aam_fast.demo_assets`) train, the frozen trunk below them is computed once for
both models, and the held-out pairs are evaluated with bootstrap intervals, the paired difference of AAM-PR against BT
and the length baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ...demo_assets import DEMO_RM_NAME, cache_dir, choose_threads, converted_model, demo_data_path
from ...training.config import THREADS_MAX, add_config_command, check_ranges, config_from_args, option
from .compare import CompareConfig, run_compare
from .config import RMConfig

DEMO_COMPARE_NAME = "demo-rm-compare"  # the demo's compare output in the cache: bt/, pr/, compare.md


@dataclasses.dataclass(kw_only=True)
class DemoConfig:
    """The settings of ``aam-fast demo``."""

    output: str | None = option(
        None, help="the comparison's folder: bt/, pr/, compare.md (default: in the cache)", group="demo"
    )
    epochs: float | None = option(None, help="override the demo's 2 epochs", above=0.0, group="demo")
    threads: int | None = option(
        None,
        help="intra-op CPU threads (default: torch's, or 1 on a busy CPU)",
        minimum=1,
        maximum=THREADS_MAX,
        group="demo",
    )
    quick: bool = option(False, help="4 steps only (a smoke test)", group="demo")
    json: bool = option(False, help="also print a JSON summary line on stderr", group="demo")

    def validate(self) -> None:
        check_ranges(self)


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


def demo_compare_config(model: Path, output: Path, *, quick: bool = False) -> CompareConfig:
    """:func:`demo_config`'s settings for both BT and AAM-PR (``aam-fast compare --margins bt pr``)."""
    base = demo_config(model, output, quick=quick)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(RMConfig)}
    for fixed in ("margin", "cache_trunk", "packing", "resume", "eval_every", "strategy"):
        values.pop(fixed)
    return CompareConfig(**values, margins=["bt", "pr"], bootstrap=2000)


def publish_model(folder: Path, link: Path) -> None:
    """Make ``link`` (where ``demo-grpo`` looks for the demo's reward model) point at ``folder``: a symlink, replacing
    an earlier demo's folder or link (a copy where symlinks are not allowed)."""
    if link.resolve() == folder.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(folder.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(folder, link)


def format_demo(report: dict, seconds: float, threads: int) -> str:
    """The side-by-side lines: held-out accuracy with its 95% interval per model, AAM-PR against BT, per kind."""
    section = report["eval_sets"]["dev"]
    bt, pr = section["variants"]["bt"], section["variants"]["pr"]
    test = pr["vs_baseline"]
    margin = report["variants"]["pr"]["aam_margin"]
    lines = [
        f"\nBT and AAM-PR reward models on SmolLM2-135M-Instruct, role-play pairs ({report['train_pairs']} train, "
        f"{section['num_pairs']} held out by prompt hash), top {report['trainable_layers']} layers, "
        f"{report['variants']['pr']['steps']} steps each, {seconds:.0f} s in all on {threads} CPU thread(s) (the "
        f"frozen trunk computed once for both: {report['cost']['prepare_seconds']:.0f} s)",
        f"held-out accuracy (95% bootstrap interval), length baseline {section['length_baseline']:.3f}:",
    ]
    for name, row in (("BT    ", bt), ("AAM-PR", pr)):
        low, high = row["accuracy_ci"]
        lines.append(f"  {name} {row['accuracy']:.3f}  [{low:.3f}, {high:.3f}]")
    lines.append(
        f"  AAM-PR - BT {test['diff']:+.3f}  [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}] paired bootstrap, "
        f"McNemar exact p {test['p_value']:.3g} ({test['baseline_only']} pairs only BT gets right, "
        f"{test['variant_only']} only AAM-PR)"
    )
    for kind, sub in section.get("subsets", {}).items():
        lines.append(
            f"  {kind:<18} {sub['num_pairs']:>3} pairs  BT {sub['variants']['bt']['accuracy']:.3f}  "
            f"AAM-PR {sub['variants']['pr']['accuracy']:.3f}  (length baseline {sub['length_baseline']:.3f})"
        )
    lines.append(
        f"AAM-PR margin |m| during training: mean {margin['abs_mean']:.4f}, std {margin['abs_std']:.4f}, "
        f"max {margin['abs_max']:.4f}; correlation with the reward gap "
        + ("n/a" if margin["corr_with_gap"] is None else f"{margin['corr_with_gap']:.3f}")
    )
    return "\n".join(lines)


def usage_text(folder: Path) -> str:
    return (
        "use it:\n"
        "  from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"  model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        "  messages = [{'role': 'system', 'content': 'You are ...'}, {'role': 'user', 'content': '...'},\n"
        "              {'role': 'assistant', 'content': '...'}]\n"
        "  ids = tokenizer.apply_chat_template(messages, return_tensors='pt', return_dict=True)\n"
        "  reward = model(**ids).logits[0, 0]\n"
        "or: from aam_fast.modeling import RewardScorer; RewardScorer(path)(prompts, completions)\n"
        f"    aam-fast eval-rm --model {folder} --data pairs.jsonl"
    )


def run_demo(args: argparse.Namespace) -> int:
    demo = config_from_args(DemoConfig, args)
    demo.validate()
    started = time.time()
    output = Path(demo.output) if demo.output else cache_dir() / DEMO_COMPARE_NAME
    threads = choose_threads(demo.threads)
    model = converted_model()
    cfg = demo_compare_config(model, output, quick=demo.quick)
    if demo.epochs is not None:
        cfg.epochs = demo.epochs
    report = run_compare(cfg)
    elapsed = time.time() - started
    pr_folder = Path(report["variants"]["pr"]["output"])
    if not demo.output:
        publish_model(pr_folder, cache_dir() / DEMO_RM_NAME)
    print(format_demo(report, elapsed, threads))
    print(
        f"\nsaved: AAM-PR to {pr_folder}, BT to {report['variants']['bt']['output']}; table in {output / 'compare.md'}"
    )
    print(usage_text(pr_folder))
    if demo.json:
        section = report["eval_sets"]["dev"]
        summary = {name: section["variants"][name]["accuracy"] for name in ("bt", "pr")}
        summary.update(length_baseline=section["length_baseline"], threads=threads, seconds=round(elapsed, 1))
        summary.update(pr_vs_bt=section["variants"]["pr"]["vs_baseline"], output=str(output))
        print(json.dumps(summary), file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    """Register ``demo``."""
    add_config_command(
        subparsers,
        "demo",
        DemoConfig,
        run_demo,
        help="train BT and AAM-PR role-play reward models side by side on CPU and compare them",
        description="Train Bradley-Terry and AAM-PR reward models side by side on the bundled role-play pairs (the "
        "top layers of SmolLM2-135M-Instruct, the frozen trunk computed once for both) and compare their held-out "
        "accuracy.",
    )
