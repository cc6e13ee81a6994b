"""What a GRPO run logs, under TRL's metric names: rollout metrics (rewards, completion lengths), step metrics (loss,
KL, entropy, clipping), the step's wall-time split and the rows of ``completions.jsonl``.

As TRL 1.16's GRPOTrainer: ``completions/{mean,min,max}_terminated_length`` are over the completions that ended with
EOS (0.0 each when none did); ``clip_ratio/low_mean``, ``high_mean`` and ``region_mean`` are fractions of every
rank's completion tokens; ``clip_ratio/low_min`` is the smallest and ``clip_ratio/high_max`` the largest
per-sequence clipped fraction over every rank's sequences of the step (TRL gathers the per-sequence fractions over
processes and takes nanmin/nanmax); ``num_tokens`` is the cumulative count of prompt + completion tokens sampled so
far over every rank (the trainer adds it to each row).

``timing/generation``, ``timing/scoring``, ``timing/logprobs`` and ``timing/update`` are this step's wall seconds on
this rank (rank 0's in ``metrics.jsonl``): sampling the completions (prompt encoding, ``generate``, decoding),
computing the rewards (reward model and reward functions), the forward-only old and reference log-prob passes, and
the optimizer step (loss forward and backward over the micro-batches, gradient clipping, AdamW). A step that reuses
its rollout (``num_iterations > 1``) has 0.0 for the first three. Their sum is at most the step's wall time: what is
left are the collectives of advantages and metrics, an FSDP2 weight gather and the logging. On CUDA each reading
synchronises the device first, so that the seconds hold the kernels launched in the phase."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

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
        **terminated_length_metrics(lengths, truncated),
        "prompts/truncated": float(prompts_cut),
    }
    for column, name in enumerate(names):
        values = table[:, column]
        finite = values[~torch.isnan(values)]
        metrics[f"rewards/{name}/mean"] = float(finite.mean()) if finite.numel() else None
        metrics[f"rewards/{name}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
    return metrics


def terminated_length_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """Mean, min and max length of the completions that ended with EOS (``truncated`` False); 0.0 each when none
    did, as TRL's GRPOTrainer logs them."""
    terminated = lengths[~truncated.bool()].float()
    if not terminated.numel():
        terminated = torch.zeros(1)
    return {
        "completions/mean_terminated_length": float(terminated.mean()),
        "completions/min_terminated_length": float(terminated.min()),
        "completions/max_terminated_length": float(terminated.max()),
    }


def merge_stats(totals: dict[str, float], stats: dict) -> None:
    """Fold one micro-batch's loss statistics into ``totals`` in place: ``*_min`` keys by minimum, ``*_max`` keys by
    maximum, the rest (sums) by adding."""
    for key, value in stats.items():
        value = float(value)
        if key not in totals:
            totals[key] = value
        elif key.endswith("_min"):
            totals[key] = min(totals[key], value)
        elif key.endswith("_max"):
            totals[key] = max(totals[key], value)
        else:
            totals[key] += value


def step_metrics(loss: float, grad_norm: float, learning_rate: float, totals: dict[str, float]) -> dict[str, float]:
    """Metrics of one optimizer step from the loss, gradient norm, learning rate and the loss's statistics over
    every rank (:func:`merge_stats`): per-token means (KL, entropy and the clipped fractions) and the per-sequence
    extremes of the clipped fractions (None when no sequence had a completion token)."""
    tokens = max(totals.get("tokens", 0.0), 1.0)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
    if "kl_sum" in totals:
        metrics["kl"] = totals["kl_sum"] / tokens
    if "entropy_sum" in totals:
        metrics["entropy"] = totals["entropy_sum"] / tokens
    metrics["clip_ratio/low_mean"] = totals.get("clip_low_sum", 0.0) / tokens
    metrics["clip_ratio/high_mean"] = totals.get("clip_high_sum", 0.0) / tokens
    metrics["clip_ratio/region_mean"] = totals.get("clip_region_sum", 0.0) / tokens
    low_min, high_max = totals.get("clip_low_seq_min", math.inf), totals.get("clip_high_seq_max", -math.inf)
    metrics["clip_ratio/low_min"] = low_min if math.isfinite(low_min) else None
    metrics["clip_ratio/high_max"] = high_max if math.isfinite(high_max) else None
    return metrics


TIMING_PHASES = ("generation", "scoring", "logprobs", "update")


class PhaseTimer:
    """Wall seconds spent per phase (:data:`TIMING_PHASES`) since :meth:`reset`; ``with timer("scoring"): ...``
    adds the block's time. On a CUDA ``device`` the clock is read after a device synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(TIMING_PHASES, 0.0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(TIMING_PHASES, 0.0)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase not in self.seconds:
            raise ValueError(f"phase must be one of {TIMING_PHASES}, got {phase!r}")
        started = self._now()
        try:
            yield
        finally:
            self.seconds[phase] += self._now() - started

    def metrics(self) -> dict[str, float]:
        """``timing/<phase>`` seconds of every phase."""
        return {f"timing/{phase}": seconds for phase, seconds in self.seconds.items()}


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


def progress_postfix(row: dict, seconds: float) -> dict[str, str]:
    postfix = {"reward": f"{row['reward']:.3f}", "len": f"{row['completions/mean_length']:.1f}"}
    if "kl" in row:
        postfix["kl"] = f"{row['kl']:.4f}"
    postfix["s/step"] = f"{seconds:.1f}"
    return postfix
