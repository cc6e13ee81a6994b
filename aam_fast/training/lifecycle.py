"""One training lifecycle for every stage, read top to bottom in :class:`Trainer`: launch → build → engine → resume
→ step / log / evaluate / save cadence → final evaluation → export → close.

The rules live here once: a checkpoint every ``--save-every`` steps and at the last step; no checkpoint or export
of weights that are not all finite; a resumed run refused when it would be another run (other settings, another
``batch_size × ranks``) and a log line for the settings that change only the numerics; the process group closed by
:func:`~.launch.closing`. A stage subclasses :class:`Trainer` and keeps only what is its own, through these hooks:

- ``inputs()``: its input folders and files (``{flag: path}``), which ``--output`` must not be;
- ``build()``: its model (``self.model``), data, reference and loss; sets ``self.total_steps``;
- ``load_weights(model, folder)``: a checkpoint's weights into the plain model (before the engine wraps it);
- ``_micro_batch_loss(model, batch)``: the root module's forward under DDP/FSDP2 (the loss and what goes with it);
- ``param_groups()``: AdamW's parameter groups (default: every trainable parameter);
- ``prepare(resume_step)``: what needs the engine and the resumed position (caches, extra tables);
- ``on_train_begin()``, ``train_step()`` (one optimizer step: advances ``self.step``, returns its metrics),
  ``postfix(record, seconds)`` (the progress bar's), ``evaluate()`` (a report, or None);
- ``checkpoint_state(record)`` and ``restore_state(folder, state, rank_tensors, rank_json)``: its part of a
  checkpoint; ``write_model(folder)`` and ``export(final_report)``: its model as it saves it (collectives);
- ``finish(history, final_report)``: what the run returns.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainingConfig
from .launch import build_engine, closing, launch
from .metrics import MetricsWriter
from .runtime import TrainingDiverged, capture_rng, log


class Trainer:
    """A training run of one stage; see the module docstring for the hooks. ``stage`` names its checkpoints,
    ``examples`` what a micro-batch holds (for messages), ``resume_free`` / ``resume_numerics`` the stage's settings
    that a resumed run may change freely / with a log line (beside :data:`.checkpoints.RESUME_FREE` and
    :data:`.checkpoints.RESUME_NUMERICS`), ``unrecorded`` the settings a checkpoint does not record (Python
    objects), ``eval_every`` the steps between evaluations (0: only the final one)."""

    stage = ""
    examples = "examples"
    resume_free: frozenset[str] = frozenset()
    resume_numerics: frozenset[str] = frozenset()
    unrecorded: frozenset[str] = frozenset()
    eval_every = 0

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.started = time.time()
        self.run = launch(cfg, self.inputs())
        self.ctx, self.device, self.amp_dtype, self.output = (
            self.run.ctx,
            self.run.device,
            self.run.amp_dtype,
            self.run.output,
        )
        self.global_batch = cfg.batch_size * self.ctx.world  # examples per micro-batch over all ranks
        self.build()
        built = build_engine(
            self.run,
            cfg,
            self.model,
            self._micro_batch_loss,
            self.load_weights,
            self.param_groups,
            self.total_steps,
        )
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.step, self.num_tokens = 0, 0  # num_tokens: tokens trained on so far, every rank (TRL's)
        self.last_checkpoint = built.checkpoint
        if built.checkpoint is not None:
            self._resume(built.checkpoint)
        resume_step = self.step if built.checkpoint is not None else None
        self.writer = self.ctx.writer(lambda: MetricsWriter(self.output, cfg.report_to, resume_step, config=cfg))
        self.prepare(resume_step)

    # -- the lifecycle ------------------------------------------------------------------------------------------

    def run_to_end(self) -> Any:
        """:meth:`train`, then the process group closed (:func:`~.launch.closing`: only when it ends normally)."""
        with closing(self.ctx):
            return self.train()

    def train(self) -> Any:
        """Run to the last step, evaluate, export; returns :meth:`finish`'s result."""
        history: list[dict[str, Any]] = []
        try:
            self._loop(history)
            final_report = self.evaluate()
            self.save_final(final_report)
        finally:
            self.writer.close()
        return self.finish(history, final_report)

    def _loop(self, history: list[dict[str, Any]]) -> None:
        cfg = self.cfg
        self.on_train_begin()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.progress_desc(),
            disable=not cfg.progress or not self.ctx.is_main,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                record = self.train_step()
                self.writer.write(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(self.postfix(record, time.perf_counter() - started))
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == self.total_steps):
                    self.save_checkpoint(record)
        finally:
            bar.close()

    # -- checkpoints and export ---------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def check_finite_weights(self) -> None:
        """TrainingDiverged when a trainable weight is not finite (a collective): nothing of it is saved."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.trainable_parameters()]
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in local)
        total = int(self.ctx.all_reduce_sum(torch.tensor([float(bad)])).item())
        if total:
            raise TrainingDiverged(
                f"{total} non-finite trainable weights after step {self.step}; not saved. Last finite checkpoint: "
                f"{self.last_checkpoint or 'none'}"
            )

    def config_record(self) -> dict[str, Any]:
        """The run's settings as JSON values (``unrecorded`` left out; a value of another type as its text)."""
        plain = (str, int, float, bool, list, type(None))
        record = {}
        for field in dataclasses.fields(self.cfg):
            value = getattr(self.cfg, field.name)
            if field.name not in self.unrecorded:
                record[field.name] = value if isinstance(value, plain) else str(value)
        return record

    def save_checkpoint(self, record: dict[str, Any]) -> Path:
        """``checkpoints/checkpoint-<step>/`` (:mod:`.checkpoints`): the model, the optimizer, the schedule, the
        config, the position, each rank's RNG states and the stage's own part. A collective under torchrun."""
        self.check_finite_weights()
        state, rank_tensors, rank_json = self.checkpoint_state(record)
        state = {
            "stage": self.stage,
            "scheduler": self.scheduler.state_dict(),
            "config": self.config_record(),
            "global_batch": self.global_batch,
            "num_tokens": self.num_tokens,
            **state,
        }
        self.last_checkpoint = checkpoints.save_checkpoint(
            self.ctx,
            self.output / "checkpoints",
            self.step,
            write_model=self.write_model,
            engine=self.engine,
            optimizer=self.optimizer,
            state=state,
            rank_tensors={"rng": capture_rng(), **rank_tensors},
            rank_json=rank_json,
            keep=self.cfg.keep_checkpoints,
        )
        return self.last_checkpoint

    def _resume(self, folder: Path) -> None:
        """Continue from ``folder`` (its weights are already in the model): optimizer, schedule, RNG states (on as
        many ranks), step, token count and the stage's own part."""
        state, rank_tensors, rank_json = checkpoints.restore(
            self.ctx, folder, self.engine, self.optimizer, self.scheduler, self.stage
        )
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{folder}: written with {state['global_batch']} {self.examples} per micro-batch over all ranks; "
                f"this run has {self.global_batch} (--batch-size {self.cfg.batch_size} x {self.ctx.world} ranks): "
                "keep batch-size x ranks the same"
            )
        changed = checkpoints.check_resume_settings(
            state["config"],
            self.config_record(),
            free=checkpoints.RESUME_FREE | self.resume_free,
            numerics=checkpoints.RESUME_NUMERICS | self.resume_numerics,
        )
        if changed:
            log(f"resuming {folder} with changed settings: {', '.join(changed)} (the same run, other rounding)")
        self.restore_state(folder, state, rank_tensors, rank_json)
        self.step, self.num_tokens = state["step"], state.get("num_tokens", 0)
        log(f"resumed from {folder} at step {self.step}")

    def save_final(self, final_report: dict[str, Any] | None) -> None:
        """The final model into the output folder (:meth:`export`), its weights checked finite first."""
        self.check_finite_weights()
        self.export(final_report)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def inputs(self) -> dict[str, str | None]:
        return {}

    def build(self) -> None:
        raise NotImplementedError

    def load_weights(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def _micro_batch_loss(self, model: torch.nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    def param_groups(self) -> list:
        return self.trainable_parameters()

    def prepare(self, resume_step: int | None) -> None:
        pass

    def on_train_begin(self) -> None:
        pass

    def progress_desc(self) -> str:
        return self.stage

    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def postfix(self, record: dict[str, Any], seconds: float) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}"}

    def evaluate(self) -> dict[str, Any] | None:
        return None

    def checkpoint_state(self, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict | None]:
        """``(state JSON, this rank's tensors, this rank's JSON or None)``: the stage's part of a checkpoint."""
        return {}, {}, None

    def restore_state(self, folder: Path, state: dict, rank_tensors: dict | None, rank_json: dict | None) -> None:
        pass

    def write_model(self, folder: Path) -> None:
        raise NotImplementedError

    def export(self, final_report: dict[str, Any] | None) -> None:
        self.write_model(self.output)

    def finish(self, history: list[dict[str, Any]], final_report: dict[str, Any] | None) -> Any:
        return history
