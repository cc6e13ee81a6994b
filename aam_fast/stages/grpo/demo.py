"""``aam-fast demo-grpo`` (``make demo-grpo``): SmolLM2-135M-Instruct learns from the demo's AAM reward model on a
few role-play prompts, on a CPU.

Two prompts (one per character) in every step, 4 completions each, the top 4 of 30 layers training, KL to the
initial policy with beta 0.04: a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ...data import prompts_per_character
from .config import GRPOConfig
from .trainer import train_grpo


def demo_config(args: argparse.Namespace, policy: Path, reward_model: Path, output: Path, prompts: list) -> GRPOConfig:
    return GRPOConfig(
        policy=str(policy),
        prompts=prompts,
        reward_model=str(reward_model),
        output=str(output),
        num_generations=4,
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        batch_size=args.prompts,  # every step sees every prompt, so rewards compare across steps
        max_steps=args.steps,
        lr=args.lr,
        beta=0.04,
        trainable_layers=args.trainable_layers,
        threads=args.threads,
        seed=args.seed,
        log_completions_every=1,
        overwrite=True,
    )


def run_demo(args: argparse.Namespace) -> int:
    from ...demo_assets import DEMO_RM_NAME, cache_dir, converted_model, demo_data_path

    started = time.time()
    reward_model = Path(args.reward_model) if args.reward_model else cache_dir() / DEMO_RM_NAME
    if not (reward_model / "config.json").is_file():
        raise SystemExit(f"no reward model at {reward_model}: run `make demo` first (or pass --reward-model DIR)")
    output = Path(args.output) if args.output else cache_dir() / "demo-grpo"
    prompts = prompts_per_character(demo_data_path(), args.prompts)
    rows = train_grpo(demo_config(args, converted_model(), reward_model, output, prompts))
    print(f"\nGRPO on SmolLM2-135M-Instruct with the AAM reward model {reward_model}, {time.time() - started:.0f} s")
    print(f"{'step':>4} {'reward':>8} {'kl':>8} {'length':>7}")
    for row in rows:
        print(
            f"{row['step']:>4} {row['reward']:>8.3f} {row.get('kl', 0.0):>8.4f} {row['completions/mean_length']:>7.1f}"
        )
    table = [json.loads(line) for line in (output / "completions.jsonl").read_text().splitlines() if line]
    if table:
        best = max((r for r in table if r["step"] == table[-1]["step"]), key=lambda r: r["reward"])
        print(f"\nbest completion of the last step (reward {best['reward']:.3f}) to {best['prompt'][-1]['content']!r}:")
        print(f"  {best['completion']!r}")
    print(
        f"\npolicy saved to {output}; metrics in {output / 'metrics.jsonl'}, samples in {output / 'completions.jsonl'}"
    )
    return 0


def add_parser(subparsers) -> None:
    """Register ``demo-grpo``."""
    demo = subparsers.add_parser(
        "demo-grpo",
        help="a short CPU GRPO run on SmolLM2 with the demo reward model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--reward-model", default=None, help="reward model (None: `aam-fast demo`'s, in the cache)")
    demo.add_argument("--output", default=None, help="where to save the policy (None: demo-grpo in the cache)")
    demo.add_argument("--steps", type=int, default=8, help="optimizer steps")
    demo.add_argument("--prompts", type=int, default=2, help="role-play prompts (one per character), all in each step")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="completion length limit")
    demo.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    demo.add_argument("--trainable-layers", type=int, default=4, help="top decoder layers that train (of 30)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy CPU)")
    demo.set_defaults(func=run_demo)
