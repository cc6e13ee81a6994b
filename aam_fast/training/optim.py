"""The optimizer step both stages take: warmup and decay from transformers' schedules, the global gradient norm
checked before anything is applied, clipping, AdamW."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .distributed import DistContext
from .runtime import TrainingDiverged


def warmup_steps(total_steps: int, warmup_ratio: float, warmup: int) -> int:
    """``warmup`` when positive, else ``round(warmup_ratio · total_steps)``."""
    return warmup if warmup > 0 else int(round(warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total_steps: int):
    """transformers' ``constant``/``linear``/``cosine`` schedule with ``warmup`` linear steps from 0."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    raise ValueError(f"--lr-schedule must be constant, linear or cosine, got {schedule!r}")


def diverged(what: str, value: float, step: int, last_checkpoint: Path | None) -> TrainingDiverged:
    return TrainingDiverged(
        f"non-finite {what} ({value}) at step {step}; the step was not applied. Last finite checkpoint: "
        f"{last_checkpoint or 'none'}"
    )


def check_loss(loss: float, step: int, last_checkpoint: Path | None) -> None:
    """TrainingDiverged naming ``step`` when ``loss`` is not finite."""
    if not math.isfinite(loss):
        raise diverged("loss", loss, step, last_checkpoint)


def optimizer_step(
    ctx: DistContext,
    optimizer: torch.optim.Optimizer,
    scheduler,
    parameters: Sequence[torch.Tensor],
    max_grad_norm: float,
    step: int,
    last_checkpoint: Path | None,
) -> tuple[float, float]:
    """Clip (``max_grad_norm`` > 0) and apply the accumulated gradients, advance the schedule; returns
    ``(grad_norm, learning rate used)``. A non-finite global gradient norm raises TrainingDiverged before the
    parameters or the optimizer's state are touched (the gradients are dropped)."""
    grad_norm = float(ctx.clip_grad_norm(parameters, max_grad_norm if max_grad_norm > 0 else math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise diverged("gradient norm", grad_norm, step, last_checkpoint)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return grad_norm, learning_rate
