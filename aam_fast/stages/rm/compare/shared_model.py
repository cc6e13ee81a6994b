"""The one model of a comparison that trains the whole network (full fine-tuning, or LoRA adapters on every layer):
built once and trained by every variant in turn, so memory holds one model, one CPU copy of only the weights that
train, and one variant's gradients and optimizer at a time.

Before any step, the reference's response log-probs of every pair the variants visit are computed once from the
initial model itself (with its adapters disabled under LoRA, as train-rm's reference; without LoRA no frozen copy
is made: the weights are still the initial ones). Before each variant the initial weights are put back from the
CPU copy and the gradients dropped; :func:`trainable_digest` checks each variant really starts from them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ....data import EncodedPair
from ....modeling import RewardModel, has_lora, initial_reference
from ....training.launch import Launch
from ..config import RMConfig
from ..reference_logps import ReferenceLogps, reference_logps_of_run
from ..setup import count_steps


class SharedModel:
    """The model, its tokenizer and the CPU copy of its initial trainable weights (those any variant trains)."""

    def __init__(self, model: RewardModel, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.initial = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def start(self, cfg: RMConfig) -> RewardModel:
        """The model back at its initial weights, without gradients, training what train-rm would under ``cfg``
        (without LoRA an untied LM head trains only when the loss reaches it)."""
        model = self.model
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.grad = None
                if name in self.initial:
                    param.copy_(self.initial[name])
        if not has_lora(model.lm) and not model.tied:
            model.lm_head.requires_grad_(cfg.trains_lm_head)
        return model


def widest_config(configs: Sequence[RMConfig]) -> RMConfig:
    """The variant setting that trains the most (the LM head when any variant's loss reaches it): the shared model
    is built with it, so its CPU copy holds every weight any variant trains."""
    return next((c for c in configs if c.trains_lm_head), configs[0])


def shared_reference_logps(
    run: Launch, cfg: RMConfig, model: RewardModel, pairs: list[EncodedPair], pad_token_id: int
) -> ReferenceLogps:
    """The initial model's response log-probs of every pair a variant of ``cfg``'s step count visits (the same data
    order for all), in one no-grad pass before any variant trains."""
    _, total_steps = count_steps(cfg, len(pairs), cfg.batch_size)
    return reference_logps_of_run(
        cfg,
        model,
        initial_reference(model, cfg),
        pairs,
        pad_token_id,
        ctx=run.ctx,
        device=run.device,
        autocast_dtype=run.amp_dtype,
        global_batch=cfg.batch_size,
        total_steps=total_steps,
        progress=cfg.progress,
        note="computed once for every variant",
    )


def trainable_digest(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every trainable weight's bytes, by name: equal digests, equal starting weights."""
    return {
        name: hashlib.sha256(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def combined_digest(digest: dict[str, str], names) -> str:
    """One short digest of the weights ``names`` (of a :func:`trainable_digest`), for the report."""
    return hashlib.sha256("".join(f"{n}:{digest[n]};" for n in sorted(names)).encode()).hexdigest()[:16]
