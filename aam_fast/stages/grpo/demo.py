"""``aam-fast demo-grpo`` (``make demo-grpo``): SmolLM2-135M-Instruct learns from the demo's AAM reward model on a
few role-play prompts, on a CPU.

Two prompts (one per character) in every step, 4 completions each, the top 4 of 30 layers training, KL to the
initial policy with beta 0.04: a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ...data import prompts_per_character
from ...training.config import SEED_MAX, THREADS_MAX, add_config_command, check_ranges, config_from_args, option
from .config import GRPOConfig
from .trainer import train_grpo


@dataclasses.dataclass(kw_only=True)
class DemoConfig:
    """The settings of ``aam-fast demo-grpo``."""

    reward_model: str | None = option(
        None, help="reward model folder (default: the one `aam-fast demo` publishes in the cache)", group="demo"
    )
    output: str | None = option(None, help="where to save the policy (default: demo-grpo in the cache)", group="demo")
    steps: int = option(8, help="optimizer steps", minimum=1, group="demo")
    prompts: int = option(2, help="role-play prompts (one per character), all in each step", minimum=1, group="demo")
    max_new_tokens: int = option(40, help="completion length limit", minimum=1, group="demo")
    lr: float = option(5e-5, help="learning rate", above=0.0, group="demo")
    trainable_layers: int = option(4, help="top decoder layers that train (of 30)", minimum=1, group="demo")
    seed: int = option(0, help="seed of the sampling", minimum=0, maximum=SEED_MAX, group="demo")
    threads: int | None = option(
        None, help="torch CPU threads (1 is faster on a busy CPU)", minimum=1, maximum=THREADS_MAX, group="demo"
    )

    def validate(self) -> None:
        check_ranges(self)


def demo_config(demo: DemoConfig, policy: Path, reward_model: Path, output: Path, prompts: list) -> GRPOConfig:
    return GRPOConfig(
        policy=str(policy),
        prompts=prompts,
        reward_model=str(reward_model),
        output=str(output),
        num_generations=4,
        max_new_tokens=demo.max_new_tokens,
        temperature=0.8,
        batch_size=demo.prompts,  # every step sees every prompt, so rewards compare across steps
        max_steps=demo.steps,
        lr=demo.lr,
        beta=0.04,
        trainable_layers=demo.trainable_layers,
        threads=demo.threads,
        seed=demo.seed,
        log_completions_every=1,
        overwrite=True,
    )


def run_demo(namespace: argparse.Namespace) -> int:
    from ...demo_assets import DEMO_RM_NAME, cache_dir, converted_model, demo_data_path

    demo = config_from_args(DemoConfig, namespace)
    demo.validate()
    started = time.time()
    reward_model = Path(demo.reward_model) if demo.reward_model else cache_dir() / DEMO_RM_NAME
    if not (reward_model / "config.json").is_file():
        raise SystemExit(f"no reward model at {reward_model}: run `make demo` first (or pass --reward-model DIR)")
    output = Path(demo.output) if demo.output else cache_dir() / "demo-grpo"
    prompts = prompts_per_character(demo_data_path(), demo.prompts)
    rows = train_grpo(demo_config(demo, converted_model(), reward_model, output, prompts))
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
    add_config_command(
        subparsers,
        "demo-grpo",
        DemoConfig,
        run_demo,
        help="a short CPU GRPO run on SmolLM2 with the demo reward model",
        description="GRPO on SmolLM2-135M-Instruct with the AAM reward model of `aam-fast demo`, on a few role-play "
        "prompts, on a CPU.",
    )
