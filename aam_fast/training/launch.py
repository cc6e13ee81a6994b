"""How every command starts and ends: check the config, set threads, join the process group, pick the device and
the compute dtype; for a training run also make the output folder safe to write into and seed every RNG; and the
one rule for closing the process group (:func:`closing`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import prepare_output
from .config import STRATEGIES, TrainingConfig
from .config_file import save_config
from .distributed import DistContext, env_world_size, setup
from .optim import build_scheduler, warmup_steps
from .run_folder import RunLock
from .runtime import compute_dtype, log, package_logger, resolve_device, seed_everything, set_threads


@dataclass
class Launch:
    """A started command: its place among the ranks, its device and autocast dtype, its output folder (None for a
    command that writes none)."""

    ctx: DistContext
    device: torch.device
    amp_dtype: torch.dtype
    output: Path | None
    lock: RunLock | None = None  # rank 0's lock on the output folder, released by :meth:`release`

    def release(self) -> None:
        """Give the output folder's lock back (at the end of the run, also after an error)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def launch(cfg: Any, inputs: dict[str, str | None] | None = None, *, one_process: str | None = None) -> Launch:
    """Validate ``cfg`` (its ``validate()``: ValueError naming the flag) and start the command on its ``device``
    and ``dtype`` (and ``threads``, ``strategy`` where it has them). ``one_process`` (why the command holds
    everything in one process) refuses a start under torchrun, before any process group. A training run (a
    :class:`TrainingConfig`) also gets its output folder checked and made (``inputs``, ``{flag: path}``, are its
    input folders and files, which ``--output`` must not be or hold), locked (rank 0 holds the lock; the caller
    releases it: :meth:`Launch.release`) and every RNG seeded."""
    cfg.validate()
    if one_process is not None and env_world_size() > 1:
        raise ValueError(f"{one_process}; start it without torchrun")
    package_logger()
    _warn_idle_strategy(cfg)
    set_threads(getattr(cfg, "threads", None))
    ctx = setup(getattr(cfg, "strategy", STRATEGIES[0]), resolve_device(cfg.device))
    output, lock = None, None
    if isinstance(cfg, TrainingConfig):
        output = Path(cfg.output)
        if ctx.is_main:
            lock = prepare_output(output, resume=cfg.resume, overwrite=cfg.overwrite, inputs=inputs or {})
            try:
                check_writable(output)
                save_config(cfg, output)  # OUTPUT/config.yaml: --config takes it back
            except BaseException:
                lock.release()
                raise
        ctx.barrier()
        seed_everything(cfg.seed)
    return Launch(ctx, ctx.device, compute_dtype(cfg.dtype, ctx.device), output, lock)


def check_writable(output: Path) -> None:
    """OSError naming ``--output`` unless a file can be created in it (and removed), found before the setup (the
    model, the tokenisation) rather than at the first save."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=output)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"--output {output}") from None


def _warn_idle_strategy(cfg: Any) -> None:
    """A line when ``--strategy`` has no effect: it picks how several processes share the model."""
    if getattr(cfg, "strategy", STRATEGIES[0]) != STRATEGIES[0] and env_world_size() <= 1:
        log(f"--strategy {cfg.strategy} has no effect in one process (it applies under torchrun, WORLD_SIZE>1)")


@contextlib.contextmanager
def closing(ctx: DistContext) -> Iterator[DistContext]:
    """The one rule for closing the process group, for every command: when the body returns, every rank closes it
    (a barrier, then the group destroyed), so no rank leaves while another still communicates. When the body
    raises, nothing collective runs: a rank that fails alone (its data, a non-finite step, out of memory) would
    otherwise wait forever in a barrier that the others, busy in their next collective, never reach; its exit ends
    the run instead (torchrun stops the other ranks). Without torchrun there is no group and nothing to close."""
    yield ctx
    ctx.close()


@dataclass
class Engine:
    """The model ready to train: the root module to call (``engine(batch)``, wrapped for DDP/FSDP2), AdamW and its
    schedule."""

    engine: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_engine(
    run: Launch,
    cfg: TrainingConfig,
    model: torch.nn.Module,
    micro_batch_loss: Callable,
    param_groups: Callable[[], list],
    total_steps: int,
) -> Engine:
    """Put the plain ``model`` (a resumed checkpoint's weights already in it: loaded before FSDP2 shards it, so on
    any number of ranks) under the root loss module (``micro_batch_loss(model, batch)``), then build AdamW over
    ``param_groups()`` (read after wrapping: FSDP2 replaces the parameters) and the warmup-and-decay schedule."""
    engine = run.ctx.wrap(model, micro_batch_loss, compute_dtype=run.amp_dtype)
    optimizer = torch.optim.AdamW(param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = warmup_steps(total_steps, cfg.warmup_ratio, cfg.warmup_steps)
    scheduler = build_scheduler(optimizer, cfg.lr_schedule, warmup, total_steps)
    return Engine(engine, optimizer, scheduler)
