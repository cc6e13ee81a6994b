"""What a GRPO run logs, under TRL's metric names: rollout metrics (rewards, completion lengths), step metrics (loss,
KL, entropy, clipping) and the rows of ``completions.jsonl``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .rollout import MicroBatch


def rollout_metrics(
    rewards: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    prompts_cut: float,
    num_generations: int,
    names: Sequence[str],
) -> dict[str, float | None]:
    """Metrics of a rollout from every rank's per-sample ``rewards`` (whole groups of ``num_generations``), reward
    ``table`` (one column per source in ``names``, NaN where a source gave None), completion ``lengths`` and
    ``truncated`` flags, and the number of prompts cut to --max-prompt-length over all ranks."""
    grouped = rewards.view(-1, num_generations)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": float(grouped.std(dim=1).mean()),
        "frac_reward_zero_std": float((grouped.amax(1) == grouped.amin(1)).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "prompts/truncated": float(prompts_cut),
    }
    for column, name in enumerate(names):
        values = table[:, column]
        finite = values[~torch.isnan(values)]
        metrics[f"rewards/{name}/mean"] = float(finite.mean()) if finite.numel() else None
        metrics[f"rewards/{name}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
    return metrics


def step_metrics(loss: float, grad_norm: float, learning_rate: float, totals: dict[str, float]) -> dict[str, float]:
    """Metrics of one optimizer step from the loss, gradient norm, learning rate and the loss's summed statistics
    (per-token means: KL, entropy and the clipped fractions, over every rank's tokens)."""
    tokens = max(totals.get("tokens", 0.0), 1.0)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
    if "kl_sum" in totals:
        metrics["kl"] = totals["kl_sum"] / tokens
    if "entropy_sum" in totals:
        metrics["entropy"] = totals["entropy_sum"] / tokens
    metrics["clip_ratio/low_mean"] = totals.get("clip_low_sum", 0.0) / tokens
    metrics["clip_ratio/high_mean"] = totals.get("clip_high_sum", 0.0) / tokens
    metrics["clip_ratio/region_mean"] = totals.get("clip_region_sum", 0.0) / tokens
    return metrics


def completion_rows(batch: MicroBatch, step: int, names: Sequence[str]) -> list[dict]:
    """One ``completions.jsonl`` row per sampled completion of ``batch``: prompt, completion, total and
    per-source rewards (None where a source gave none), advantage, length and truncation."""
    rows = []
    for i, (prompt, text) in enumerate(zip(batch.prompts, batch.completions, strict=True)):
        per_source = {
            f"rewards/{name}": None if math.isnan(float(value)) else float(value)
            for name, value in zip(names, batch.reward_table[i], strict=True)
        }
        rows.append(
            {
                "step": step,
                "prompt": prompt,
                "completion": text,
                "reward": float(batch.rewards[i]),
                "advantage": float(batch.advantages[i]),
                **per_source,
                "length": int(batch.mask[i].sum()),
                "truncated": bool(batch.truncated[i]),
            }
        )
    return rows


def summary_lines(rows: list[dict], output: str) -> list[str]:
    """The end-of-run summary: first and last step's reward, KL and completion length, and where the policy is."""
    if not rows:
        return [f"nothing to do: already at --max-steps; policy in {output}"]
    first, last = rows[0], rows[-1]
    parts = [f"reward {first['reward']:.4f} -> {last['reward']:.4f}"]
    if "kl" in last:
        parts.append(f"kl {first['kl']:.4f} -> {last['kl']:.4f}")
    parts.append(f"mean length {first['completions/mean_length']:.1f} -> {last['completions/mean_length']:.1f}")
    return [
        f"steps {first['step']}..{last['step']}: " + ", ".join(parts),
        f"policy saved to {output} (AutoModelForCausalLM.from_pretrained); metrics in {output}/metrics.jsonl",
    ]
