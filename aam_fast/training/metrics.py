"""Metric sinks shared by the stages: ``metrics.jsonl`` (one object per logged step), TensorBoard scalars and a
Weights & Biases run, as ``--report-to`` chooses, plus plain JSONL tables (GRPO's sampled completions). On resume,
rows past the resumed step are dropped first from the JSONL and TensorBoard logs, so an interrupted run's tail is
not logged twice; wandb cannot drop rows, so the resumed wandb run logs those steps again (plotted against
``step``). Every sink gets the same values, non-finite ones included: no sink filters or rewrites them."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from .config_file import config_values
from .run_folder import write_text_atomic

WANDB_MISSING = "--report-to wandb needs the wandb package: pip install wandb"
WANDB_RUN_ID_FILE = "wandb-run-id.txt"  # in the output folder: the run a resumed run continues


class JsonlTable:
    """Append-only JSONL file, each row flushed to the disk as it is written. ``keep_until_step=None`` starts it
    empty; a step keeps the rows up to that step, and, given ``keep_rows`` (how many rows the file held when the
    resumed checkpoint was saved), of those only the first ``keep_rows`` rows: an evaluation logged after that save
    is then not logged twice (and a ``keep_rows`` larger than the checkpoint's rows keeps no later step). The file
    is rewritten through a temporary file (a symbolic link is replaced, never written through); ``rows`` counts the
    rows it holds."""

    def __init__(self, path: Path, keep_until_step: int | None, keep_rows: int | None = None):
        self.path = path
        kept: list[str] = []
        if keep_until_step is not None and path.is_file() and not path.is_symlink():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [row for row in lines[:keep_rows] if _row_step(row) <= keep_until_step]
        write_text_atomic(path, "".join(row + "\n" for row in kept))
        self.rows = len(kept)

    def write(self, rows: list[dict[str, Any]]) -> None:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += len(rows)

    def close(self) -> None:
        pass


def _row_step(line: str) -> float:
    try:
        step = json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return float("inf")  # a damaged row (a crash mid-write) is dropped
    return step if isinstance(step, (int, float)) else float("inf")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a step record (not ``step`` itself, booleans, text or None)."""
    return {
        key: value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def check_wandb_installed() -> None:
    """ValueError saying ``pip install wandb`` where wandb is not importable."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(WANDB_MISSING)


class WandbRun:
    """The scalars of each record to a Weights & Biases run, ``step`` as its x axis. The run's id is kept in
    ``OUTPUT/wandb-run-id.txt``: a resumed run continues that wandb run, a fresh one starts a new id. wandb's own
    environment variables apply (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_DIR, WANDB_API_KEY);
    the project defaults to ``aam-fast``, the name to ``run_name`` or the output folder's name, the files to
    ``OUTPUT/wandb``. The run's config is the resolved settings (as ``OUTPUT/config.yaml`` holds them)."""

    def __init__(self, output: Path, resumed: bool, config: Any | None):
        check_wandb_installed()
        import wandb

        id_file = output / WANDB_RUN_ID_FILE
        run_id = (id_file.read_text().strip() or None) if resumed and id_file.is_file() else None
        name = getattr(config, "run_name", None) or os.environ.get("WANDB_NAME") or output.resolve().name
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "aam-fast",
            name=name,
            id=run_id,  # None: wandb picks a new id
            resume="allow" if run_id else None,
            dir=None if os.environ.get("WANDB_DIR") else str(output),
            config=config_values(config)[0] if config is not None else None,
        )
        write_text_atomic(id_file, self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step", step_sync=True)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({"step": record["step"], **scalars(record)})

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """The step metrics of a run to every sink in ``report_to`` (``jsonl``, ``tensorboard``, ``wandb``).
    ``resume_step`` is the step a resumed run starts after (None: a fresh run), ``resume_rows`` the number of
    ``metrics.jsonl`` rows when its checkpoint was saved (None: unknown, the rows up to ``resume_step`` are kept);
    ``config``, the run's settings, gives wandb its run name and config."""

    def __init__(
        self,
        output: Path,
        report_to: list[str],
        resume_step: int | None,
        *,
        config: Any | None = None,
        resume_rows: int | None = None,
    ):
        jsonl = "jsonl" in report_to
        self.jsonl = JsonlTable(output / "metrics.jsonl", resume_step, resume_rows) if jsonl else None
        self.tensorboard = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError(f"--report-to tensorboard needs the tensorboard package ({exc})") from None
            self.tensorboard = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)
        self.wandb = WandbRun(output, resume_step is not None, config) if "wandb" in report_to else None

    @property
    def rows(self) -> int | None:
        """The rows ``metrics.jsonl`` holds (None without it): a checkpoint records them."""
        return self.jsonl.rows if self.jsonl is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write([record])
        if self.tensorboard is not None:
            for key, value in scalars(record).items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.write(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close()


class NullWriter:
    """The writer of ranks other than 0."""

    rows = None

    def write(self, record: Any) -> None:
        pass

    def close(self) -> None:
        pass
