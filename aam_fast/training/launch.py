"""How every trainer starts: check the config, set threads, join the process group, make the output folder safe
to write into, pick the compute dtype and seed every RNG."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import find_checkpoint, prepare_output
from .config import TrainingConfig
from .distributed import DistContext, setup
from .optim import build_scheduler, warmup_steps
from .runtime import compute_dtype, package_logger, resolve_device, seed_everything, set_threads


@dataclass
class Launch:
    """A started run: its place among the ranks, its device and autocast dtype, its output folder."""

    ctx: DistContext
    device: torch.device
    amp_dtype: torch.dtype
    output: Path


def launch(cfg: TrainingConfig, inputs: dict[str, str | None]) -> Launch:
    """Validate ``cfg`` (ValueError naming the flag), start the run and seed it. ``inputs`` (``{flag: path}``) are
    the run's input folders and files, which ``--output`` must not be."""
    cfg.validate()
    package_logger()
    set_threads(cfg.threads)
    ctx = setup(cfg.strategy, resolve_device(cfg.device))
    output = Path(cfg.output)
    if ctx.is_main:
        prepare_output(output, resume=cfg.resume, overwrite=cfg.overwrite, inputs=inputs)
        output.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    seed_everything(cfg.seed)
    return Launch(ctx, ctx.device, compute_dtype(cfg.dtype, ctx.device), output)


@dataclass
class Engine:
    """The model ready to train: the root module to call (``engine(batch)``, wrapped for DDP/FSDP2), AdamW, its
    schedule, and the checkpoint the run resumes from (None when it starts fresh)."""

    engine: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint: Path | None


def build_engine(
    run: Launch,
    cfg: TrainingConfig,
    model: torch.nn.Module,
    micro_batch_loss: Callable,
    load_weights: Callable[[torch.nn.Module, Path], None],
    param_groups: Callable[[], list],
    total_steps: int,
) -> Engine:
    """Load the resumed checkpoint's weights into the plain ``model`` (before FSDP2 shards it, so on any number of
    ranks), put it under the root loss module (``micro_batch_loss(model, batch)``), then build AdamW over
    ``param_groups()`` (read after wrapping: FSDP2 replaces the parameters) and the warmup-and-decay schedule."""
    checkpoint = find_checkpoint(cfg.resume, run.output / "checkpoints")
    if checkpoint is not None:
        load_weights(model, checkpoint)
    engine = run.ctx.wrap(model, micro_batch_loss, compute_dtype=run.amp_dtype)
    optimizer = torch.optim.AdamW(param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = warmup_steps(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, warmup, total_steps)
    return Engine(engine, optimizer, scheduler, checkpoint)
