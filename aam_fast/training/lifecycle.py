"""One training lifecycle for every stage, read top to bottom in :class:`Trainer`: launch → build → engine → resume
→ step / log / evaluate / save cadence → final evaluation → export → close.

The rules live here once: a checkpoint every ``--save-every`` steps and at the last step; no checkpoint or export
of weights that are not all finite; a resumed run's ``trainer_state.json`` checked before anything of the checkpoint
loads, and the run refused when it would be another run (other settings, other inputs by content, another
``batch_size × ranks``) with a log line for the settings that change only the numerics; the export written whole
(staged, then renamed into place); the output folder's lock released however the run ends; the process group closed
by :func:`~.launch.closing`. A stage subclasses :class:`Trainer` and keeps only what is its own, through these hooks:

- ``inputs()``: its input folders and files (``{flag: path}``), which ``--output`` must not be or hold;
- ``identity()``: its inputs by content (data fingerprints, reward sources), checked on resume;
- ``build()``: its model (``self.model``), data, reference and loss; sets ``self.total_steps``;
- ``load_weights(model, folder)``: a checkpoint's weights into the plain model (before the engine wraps it);
- ``_micro_batch_loss(model, batch)``: the root module's forward under DDP/FSDP2 (the loss and what goes with it);
- ``param_groups()``: AdamW's parameter groups (default: every trainable parameter);
- ``prepare(resume_step)``: what needs the engine and the resumed position (caches, extra tables);
- ``on_train_begin()``, ``train_step()`` (one optimizer step: advances ``self.step``, returns its metrics),
  ``postfix(record, seconds)`` (the progress bar's), ``evaluate()`` (a report, or None);
- ``checkpoint_state(record)`` and ``restore_state(folder, state, rank_tensors, rank_json)``: its part of a
  checkpoint (its fields typed in ``state_fields``); ``write_model(folder)`` and ``export(final_report, folder)``:
  its model as it saves it (collectives);
- ``finish(history, final_report)``: what the run returns.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainingConfig
from .launch import build_engine, closing, launch
from .metrics import MetricsWriter
from .run_folder import EXPORT_STAGING, publish_folder, remove_entries
from .runtime import TrainingDiverged, capture_rng, log
from .trainer_state import START_AFRESH, check_identity, check_schedule, validate_state


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
    state_fields: ClassVar[dict[str, Any]] = {}  # the stage's own trainer_state.json fields and their JSON types

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg
        self.started = time.time()
        self.run = launch(cfg, self.inputs())
        try:
            self._start()
        except BaseException:
            self.run.release()
            raise

    def _start(self) -> None:
        """Build the stage, check the checkpoint it resumes from (before anything of it loads), load its weights,
        build the engine and continue from the checkpoint; then the metric sinks."""
        cfg = self.cfg
        self.ctx, self.device, self.amp_dtype, self.output = (
            self.run.ctx,
            self.run.device,
            self.run.amp_dtype,
            self.run.output,
        )
        self.global_batch = cfg.batch_size * self.ctx.world  # examples per micro-batch over all ranks
        self.build()
        self.identity_record = self.identity()
        checkpoint = checkpoints.find_checkpoint(cfg.resume, self.output / "checkpoints")
        state = self._check_checkpoint(checkpoint) if checkpoint is not None else None
        if checkpoint is not None:
            self._load_weights(checkpoint)
        built = build_engine(self.run, cfg, self.model, self._micro_batch_loss, self.param_groups, self.total_steps)
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        self.step, self.num_tokens = 0, 0  # num_tokens: tokens trained on so far, every rank (TRL's)
        self.last_checkpoint = checkpoint
        resume_step = resume_rows = None
        if checkpoint is not None:
            self._resume(checkpoint, state)
            resume_step, resume_rows = self.step, state["metrics_rows"]
        self.writer = self.ctx.writer(
            lambda: MetricsWriter(self.output, cfg.report_to, resume_step, config=cfg, resume_rows=resume_rows)
        )
        self.prepare(resume_step)

    # -- the lifecycle ------------------------------------------------------------------------------------------

    def run_to_end(self) -> Any:
        """:meth:`train`, then the process group closed (:func:`~.launch.closing`: only when it ends normally)."""
        with closing(self.ctx):
            return self.train()

    def train(self) -> Any:
        """Run to the last step, evaluate, export; returns :meth:`finish`'s result. The output folder's lock is
        released however it ends."""
        history: list[dict[str, Any]] = []
        try:
            self._loop(history)
            final_report = self.evaluate()
            self.save_final(final_report)
            return self.finish(history, final_report)
        finally:
            self.writer.close()
            self.run.release()

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

    def check_finite_weights(self, checkpoint: Path | None = None) -> None:
        """TrainingDiverged when a trainable weight is not finite (a collective): nothing of it is saved. With
        ``checkpoint`` (whose weights were just loaded), a ValueError naming it: a resume never starts from them."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.trainable_parameters()]
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in local)
        total = int(self.ctx.all_reduce_sum(torch.tensor([float(bad)])).item())
        if total and checkpoint is not None:
            raise ValueError(f"{checkpoint}: {total} non-finite trainable weights in the checkpoint; {START_AFRESH}")
        if total:
            raise TrainingDiverged(
                f"{total} non-finite trainable weights after step {self.step}; not saved. Last finite checkpoint: "
                f"{self.last_checkpoint or 'none'}"
            )

    def config_record(self) -> dict[str, Any]:
        """The run's settings as JSON values (``unrecorded`` left out; a value of another type as its text; an input
        path that exists as its absolute path, so a relative and an absolute path to one input are one setting)."""
        plain = (str, int, float, bool, list, type(None))
        paths = {flag.lstrip("-").replace("-", "_") for flag in self.inputs()}
        record = {}
        for field in dataclasses.fields(self.cfg):
            value = getattr(self.cfg, field.name)
            if field.name in paths and isinstance(value, str) and value and Path(value).exists():
                value = str(Path(value).resolve())
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
            "identity": self.identity_record,
            "metrics_rows": self.writer.rows,
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

    def _check_checkpoint(self, folder: Path) -> dict[str, Any]:
        """``folder``'s trainer_state.json, checked before anything of the checkpoint loads: present and typed
        (:func:`.trainer_state.validate_state`), the same ``batch_size x ranks``, the same settings (a log line for
        those that change only the numerics) and the same inputs by content (:meth:`identity`)."""
        state = checkpoints.read_state(folder)
        validate_state(folder, state, stage=self.stage, total_steps=self.total_steps, fields=self.state_fields)
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
        check_identity(folder, state["identity"], self.identity_record)
        if changed:
            log(f"resuming {folder} with changed settings: {', '.join(changed)} (the same run, other rounding)")
        return state

    def _load_weights(self, folder: Path) -> None:
        """The checkpoint's weights into the plain model; a damaged or missing weights file is one ValueError."""
        try:
            self.load_weights(self.model, folder)
        except checkpoints.load_errors() as exc:
            raise checkpoints.damaged(folder / "model*.safetensors", exc) from None

    def _resume(self, folder: Path, state: dict[str, Any]) -> None:
        """Continue from ``folder`` (its weights are already in the model, checked finite here; ``state`` checked):
        optimizer, schedule (its base learning rates checked against this run's), RNG states (on as many ranks),
        step, token count and the stage's own part."""
        self.check_finite_weights(folder)
        check_schedule(folder, state["scheduler"], self.scheduler.state_dict())
        rank_tensors, rank_json = checkpoints.restore(
            self.ctx, folder, state, self.engine, self.optimizer, self.scheduler
        )
        self.restore_state(folder, state, rank_tensors, rank_json)
        self.step, self.num_tokens = state["step"], state["num_tokens"]
        log(f"resumed from {folder} at step {self.step}")

    def save_final(self, final_report: dict[str, Any] | None) -> None:
        """The final model into the output folder, its weights checked finite first: :meth:`export` writes it into
        a staging folder whose files are then renamed into place (:func:`.run_folder.publish_folder`), so a kill
        during the export leaves no half-written model file and a resumed run exports again."""
        self.check_finite_weights()
        staging = self.output / EXPORT_STAGING
        if self.ctx.is_main:
            remove_entries([staging] if staging.is_symlink() or staging.exists() else [])
            staging.mkdir()
        self.ctx.barrier()
        self.export(final_report, staging)
        if self.ctx.is_main:
            publish_folder(staging, self.output)
        self.ctx.barrier()

    # -- hooks ----------------------------------------------------------------------------------------------------

    def inputs(self) -> dict[str, str | None]:
        return {}

    def identity(self) -> dict[str, str]:
        """What the run is trained on, by content (``{flag: description}``, e.g. a data fingerprint), after
        :meth:`build`: recorded in every checkpoint; a resume with other content is refused."""
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

    def export(self, final_report: dict[str, Any] | None, folder: Path) -> None:
        self.write_model(folder)

    def finish(self, history: list[dict[str, Any]], final_report: dict[str, Any] | None) -> Any:
        return history
