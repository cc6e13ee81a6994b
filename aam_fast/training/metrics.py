"""Metric sinks shared by the stages: ``metrics.jsonl`` (one object per logged step) and TensorBoard scalars, as
``--report-to`` chooses, plus plain JSONL tables (GRPO's sampled completions). On resume, rows past the resumed
step are dropped first, so an interrupted run's tail is not logged twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlTable:
    """Append-only JSONL file; ``keep_until_step=None`` starts it empty, a step keeps the rows up to that step."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None or not path.exists():
            path.write_text("")
        else:
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [row for row in rows if json.loads(row).get("step", 0) <= keep_until_step]
            path.write_text("".join(row + "\n" for row in kept))

    def write(self, rows: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        pass


class MetricsWriter:
    """The step metrics of a run to every sink in ``report_to`` (``jsonl``, ``tensorboard``)."""

    def __init__(self, output: Path, report_to: list[str], resume_step: int | None):
        self.jsonl = JsonlTable(output / "metrics.jsonl", resume_step) if "jsonl" in report_to else None
        self.tensorboard = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError(f"--report-to tensorboard needs the tensorboard package ({exc})") from None
            self.tensorboard = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write([record])
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class NullWriter:
    """The writer of ranks other than 0."""

    def write(self, record: Any) -> None:
        pass

    def close(self) -> None:
        pass
