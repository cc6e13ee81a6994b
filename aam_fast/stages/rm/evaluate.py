"""Evaluation as RewardBench does it (``eval-rm``, and train-rm's dev evaluations): strict accuracy ``r_c > r_r``
(ties are wrong) overall and per subset, fixed batch size and right padding, the reward-gap distribution, and beside
every accuracy the length-only baseline (the longer response in tokens wins, ties wrong)."""

from __future__ import annotations

import dataclasses
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ...data import (
    EncodedPair,
    PairEncoder,
    choose_pad_token_id,
    collate_pairs,
    encode_pairs,
    read_pairs,
    split_by_prompt,
)
from ...modeling import RewardModel, check_positions, load_reward_model
from ...training.config import DTYPES, check_ranges, option
from ...training.launch import closing, launch
from ...training.runtime import autocast

if TYPE_CHECKING:
    from .trunk_cache import TrunkCache


def _distribution(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    q = torch.quantile(values, quantiles).tolist() if values.numel() else [float("nan")] * 5
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "p10": q[0],
        "p25": q[1],
        "median": q[2],
        "p75": q[3],
        "p90": q[4],
        "max": values.max().item(),
    }


@torch.no_grad()
def score_pairs(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    trunk: TrunkCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``(chosen [n], rejected [n])`` float32 of encoded pairs, ``batch_size`` pairs per forward; with
    ``trunk`` (these pairs' cached trunk) only the top layers and the score head run.

    Pairs are batched in order of length (a fixed order, so scores do not depend on anything but the data) to
    spend little compute on padding; rewards come back in the input order.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: (max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)), i))
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    try:
        for start in tqdm(
            range(0, len(pairs), batch_size), desc="scoring", disable=not progress, file=sys.stderr, leave=False
        ):
            indices = order[start : start + batch_size]
            batch = collate_pairs([pairs[i] for i in indices], pad_token_id)
            cached = {}
            if trunk is not None:  # the trunk's output of these pairs: only the top layers and the score head run
                cached["trunk_hidden"] = trunk.batch(indices, batch["input_ids"].shape[1]).to(device)
            with autocast(device, autocast_dtype):
                out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), **cached)
            rewards = out.rewards.float().cpu()
            chosen[indices] = rewards[: len(indices)]
            rejected[indices] = rewards[len(indices) :]
    finally:
        model.train(was_training)
    return chosen, rejected


def pairwise_report(
    reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, pairs: Sequence[EncodedPair]
) -> dict[str, Any]:
    """Strict accuracy, length baseline, reward-gap distribution and the Bradley-Terry loss ``mean −log σ(r_c −
    r_r)`` (no margin), overall and per subset (counts kept so sections can be weighted by examples)."""
    gap = reward_chosen - reward_rejected
    correct = gap > 0
    longer = torch.tensor([p.chosen.response_tokens > p.rejected.response_tokens for p in pairs])
    report: dict[str, Any] = {
        "accuracy": correct.float().mean().item(),
        "length_baseline": longer.float().mean().item(),
        "num_pairs": len(pairs),
        "ties": int((gap == 0).sum()),
        "bt_loss": torch.nn.functional.softplus(-gap.double()).mean().item(),
        "reward_gap": _distribution(gap),
        "rewards": {"chosen_mean": reward_chosen.mean().item(), "rejected_mean": reward_rejected.mean().item()},
    }
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        if pair.subset is not None:
            groups[pair.subset].append(i)
    if groups:
        report["subsets"] = {
            name: {
                "accuracy": correct[idx].float().mean().item(),
                "length_baseline": longer[idx].float().mean().item(),
                "num_pairs": len(idx),
                "reward_gap_mean": gap[idx].mean().item(),
            }
            for name, idx in sorted(groups.items())
        }
    return report


def evaluate_pairs(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``pairs`` and return :func:`pairwise_report`."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    chosen, rejected = score_pairs(
        model,
        pairs,
        pad_token_id,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    return pairwise_report(chosen, rejected, pairs)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"pairs {report['num_pairs']}  accuracy {report['accuracy']:.4f}  "
        f"(length baseline {report['length_baseline']:.4f}, ties {report['ties']})"
    ]
    gap = report["reward_gap"]
    lines.append(
        "reward gap r_c - r_r: mean {mean:.4f} std {std:.4f} | min {min:.3f} p10 {p10:.3f} p25 {p25:.3f} "
        "median {median:.3f} p75 {p75:.3f} p90 {p90:.3f} max {max:.3f}".format(**gap)
    )
    for name, sub in report.get("subsets", {}).items():
        lines.append(
            f"  {name:<24} pairs {sub['num_pairs']:>5}  accuracy {sub['accuracy']:.4f}  "
            f"(length baseline {sub['length_baseline']:.4f})"
        )
    return "\n".join(lines)


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """The settings of ``eval-rm``."""

    model: str = option(help="saved reward model folder (written by train-rm)", group="eval")
    data: str = option(help="preference file or datasets name", group="eval")
    subset_field: str | None = option(None, help="record field for per-subset accuracy", group="eval")
    max_length: int | None = option(
        None, help="tokens per sequence (default: the training length)", minimum=2, group="eval"
    )
    batch_size: int = option(8, help="pairs per forward (fixed)", minimum=1, group="eval")
    dev_fraction: float | None = option(
        None,
        help="score only the prompt-hash dev part that train-rm held out with this --dev-fraction (default: all pairs)",
        above=0.0,
        below=1.0,
        group="eval",
    )
    data_split: str = option("train", help="split of a datasets source or a save_to_disk DatasetDict", group="eval")
    prompt_key: str = option("prompt", help="record field holding the prompt", group="eval")
    chosen_key: str = option("chosen", help="record field holding the chosen response", group="eval")
    rejected_key: str = option("rejected", help="record field holding the rejected response", group="eval")
    tokenize_cache: bool = option(True, help="reuse (and write) the cache of tokenised pairs", group="eval")
    skip_invalid: bool = option(False, help="skip and count bad records instead of failing", group="eval")
    device: str = option("auto", help="cpu, cuda, cuda:N or auto", group="eval")
    dtype: str = option("auto", help="autocast dtype (auto: bfloat16 on CUDA)", choices=DTYPES, group="eval")
    progress: bool = option(True, help="show a progress bar", group="eval")
    json: bool = option(False, help="print one JSON object on stdout", group="eval")

    def validate(self) -> None:
        check_ranges(self)


def evaluate_folder(cfg: EvalConfig) -> dict[str, Any]:
    """``eval-rm``: score every pair of ``cfg.data`` (or only its prompt-hash dev part) with a saved reward model;
    the report says which pairs were scored."""
    run = launch(cfg)
    with closing(run.ctx):
        model, tokenizer, metadata = load_reward_model(cfg.model, device=run.device)
        if cfg.max_length is not None:
            check_positions(model.lm.config, cfg.max_length, f"--max-length {cfg.max_length}")
        pad_token_id = choose_pad_token_id(tokenizer)
        loaded = read_pairs(
            cfg.data,
            split=cfg.data_split,
            subset_field=cfg.subset_field,
            skip_invalid=cfg.skip_invalid,
            prompt_key=cfg.prompt_key,
            chosen_key=cfg.chosen_key,
            rejected_key=cfg.rejected_key,
        )
        pairs = loaded.pairs
        scored = "all pairs"
        if cfg.dev_fraction:
            _, pairs = split_by_prompt(pairs, cfg.dev_fraction)
            scored = f"the prompt-hash dev split (--dev-fraction {cfg.dev_fraction})"
        encoder = PairEncoder(tokenizer, cfg.max_length or metadata.get("max_length"))
        encoded, stats = encode_pairs(pairs, encoder, cache=cfg.tokenize_cache, progress=cfg.progress)
        report = evaluate_pairs(
            model,
            encoded,
            pad_token_id,
            batch_size=cfg.batch_size,
            device=run.device,
            autocast_dtype=run.amp_dtype,
            progress=cfg.progress,
        )
    report.update(
        model=str(cfg.model),
        data=str(cfg.data),
        scored=scored,
        max_length=encoder.max_length,
        skipped=loaded.skipped,
        truncation=dataclasses.asdict(stats),
    )
    return report
