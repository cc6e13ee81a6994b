"""A checkpoint's ``trainer_state.json`` checked before anything of the checkpoint loads, and the run's identity: what
the run is trained on, by content (data fingerprints, reward sources), recorded in every checkpoint and compared on
resume. Each problem is one ValueError line naming the file and what to do."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
START_AFRESH = "resume from an earlier checkpoint with --resume PATH, or start afresh with --overwrite"
# Every stage's fields and their JSON types (a stage adds its own: Trainer.state_fields).
COMMON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "stage": str,
    "step": int,
    "scheduler": dict,
    "config": dict,
    "global_batch": int,
    "num_tokens": int,
    "world_size": int,
    "strategy": str,
    "identity": dict,
    "metrics_rows": (int, type(None)),
}
NUMBER = (int, float)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _typed(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not a number
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, kinds)


def validate_state(
    folder: Path, state: Any, *, stage: str, total_steps: int, fields: dict[str, type | tuple[type, ...]]
) -> None:
    """ValueError unless ``state`` (``folder``'s trainer_state.json) is a ``stage`` checkpoint with every field of
    :data:`COMMON_FIELDS` and ``fields`` present and typed, ``step`` within ``[0, total_steps]``, counts not
    negative, the schedule's position at ``step`` and its base learning rates finite numbers."""
    path = folder / STATE_FILE
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a JSON object; {START_AFRESH}")
    if state.get("stage") != stage:
        raise ValueError(f"--resume {folder}: not a {stage} checkpoint (stage {state.get('stage')!r})")
    for name, kind in {**COMMON_FIELDS, **fields}.items():
        if name not in state:
            raise ValueError(f"{path}: no {name!r} field; {START_AFRESH}")
        if not _typed(state[name], kind):
            raise ValueError(f"{path}: {name!r} is {state[name]!r}, not {_kind_name(kind)}; {START_AFRESH}")
    step = state["step"]
    if not 0 <= step <= total_steps:
        raise ValueError(f"{path}: step {step} is outside this run's [0, {total_steps}] steps; {START_AFRESH}")
    for name in ("global_batch", "world_size"):
        if state[name] < 1:
            raise ValueError(f"{path}: {name!r} is {state[name]}, not a positive count; {START_AFRESH}")
    for name in ("num_tokens", "metrics_rows"):
        if (state[name] or 0) < 0:
            raise ValueError(f"{path}: {name!r} is {state[name]}, a negative count; {START_AFRESH}")
    _validate_schedule(path, state["scheduler"], step)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else f"a finite {k.__name__}" for k in kinds)


def _validate_schedule(path: Path, scheduler: dict, step: int) -> None:
    base_lrs = scheduler.get("base_lrs")
    if not isinstance(base_lrs, list) or not base_lrs or not all(_typed(lr, NUMBER) and lr >= 0 for lr in base_lrs):
        raise ValueError(f"{path}: the schedule's base_lrs {base_lrs!r} are not learning rates; {START_AFRESH}")
    if scheduler.get("last_epoch") != step or isinstance(scheduler.get("last_epoch"), bool):
        raise ValueError(
            f"{path}: the schedule is at step {scheduler.get('last_epoch')!r}, the checkpoint at step {step}; "
            + START_AFRESH
        )


def check_schedule(folder: Path, saved: dict, current: dict) -> None:
    """ValueError when the checkpoint's schedule (its base learning rates) is not the one this run's flags give."""
    if [float(lr) for lr in saved["base_lrs"]] != [float(lr) for lr in current["base_lrs"]]:
        raise ValueError(
            f"{folder / STATE_FILE}: the schedule's base learning rates {saved['base_lrs']} are not this run's "
            f"{current['base_lrs']} (--lr, --score-lr); resume with the checkpoint's settings, or {START_AFRESH}"
        )


def check_identity(folder: Path, saved: dict[str, Any], current: dict[str, str]) -> None:
    """ValueError naming every input whose content (``{flag: description}``) differs from the checkpoint's."""
    changed = [
        f"{flag}: content changed since the checkpoint ({saved.get(flag, 'none')} -> {current.get(flag, 'none')})"
        for flag in sorted(set(saved) | set(current))
        if saved.get(flag) != current.get(flag)
    ]
    if changed:
        raise ValueError(
            f"resuming {folder} would change the run: " + "; ".join(changed) + "; resume with the checkpoint's "
            "inputs, or start a new run (--overwrite or another --output)"
        )
