"""One checkpoint format for every stage: ``OUTPUT/checkpoints/checkpoint-<step>/`` folders whose every file loads
with ``json`` or ``torch.load(weights_only=True)``, saved atomically (a temporary folder renamed into place), and the
checks that make a resumed run the same run. The format, what each file holds and the resume rules are described once,
in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .distributed import DistContext

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_TMP_PREFIX = ".tmp-"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (their state file written), oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_incomplete(root: Path) -> list[Path]:
    """Delete the temporary folders of saves that crashed; returns what was removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def find_checkpoint(resume: str | None, root: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is the latest complete one under ``root`` (None when there is
    none); otherwise a checkpoint folder, or a run folder whose ``checkpoints/`` holds one (ValueError if neither)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise ValueError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) and no {PREFIX}* folder in it")


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder / STATE_FILE}: not a readable checkpoint state ({exc})") from None


def load_tensors(path: Path) -> Any:
    """A checkpoint's tensor file, read without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsynced(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    ctx: DistContext,
    root: Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    engine: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rank_tensors: dict[str, Any],
    rank_json: dict[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Write ``root/checkpoint-<step>`` (a collective under torchrun): ``write_model(folder)`` is called on every
    rank (it gathers the weights; rank 0 writes them), then the optimizer, each rank's state and, last, ``state``
    as JSON; the folder is renamed into place and the checkpoints beyond the newest ``keep`` (0: all) deleted."""
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ctx.barrier()
    write_model(tmp)
    optimizer_state = ctx.optimizer_state(engine, optimizer)
    if ctx.is_main:
        _fsynced(tmp / OPTIMIZER_FILE, lambda handle: torch.save(optimizer_state, handle))
    _fsynced(tmp / f"rank{ctx.rank}.pt", lambda handle: torch.save(rank_tensors, handle))
    if rank_json is not None:
        _fsynced(tmp / f"rank{ctx.rank}.json", lambda handle: json.dump(rank_json, handle), "w")
    ctx.barrier()
    if ctx.is_main:
        record = {**state, "step": step, "world_size": ctx.world, "strategy": ctx.strategy}
        _fsynced(tmp / STATE_FILE, lambda handle: handle.write(json.dumps(record, indent=2) + "\n"), "w")
        _fsync_folder(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def load_rank_state(ctx: DistContext, folder: Path, state: dict[str, Any]) -> tuple[dict | None, dict | None]:
    """This rank's ``(tensors, json)`` from a checkpoint written by as many ranks, else ``(None, None)``: per-rank
    state cannot be mapped onto another number of ranks."""
    if state.get("world_size") != ctx.world:
        return None, None
    tensors_file, json_file = folder / f"rank{ctx.rank}.pt", folder / f"rank{ctx.rank}.json"
    tensors = load_tensors(tensors_file) if tensors_file.is_file() else None
    extra = json.loads(json_file.read_text()) if json_file.is_file() else None
    return tensors, extra


def prepare_output(output: Path, *, resume: str | None, overwrite: bool, inputs: dict[str, str | None]) -> None:
    """Refuse an output folder that would lose or mix data: a file, one of the run's inputs (``{flag: path}``), or a
    folder holding another run's checkpoints unless ``--resume`` or ``--overwrite`` (which deletes them) is given.
    Removes the leftovers of crashed saves."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: is a file, not a folder")
    for flag, value in inputs.items():
        if value and Path(value).exists() and Path(value).resolve() == output.resolve():
            raise ValueError(f"--output {output} is the {flag} folder: it would be overwritten; choose another folder")
    root = output / "checkpoints"
    if list_checkpoints(root) and not resume:
        if not overwrite:
            raise ValueError(
                f"{root} holds checkpoints of an earlier run: pass --resume auto to continue it, --overwrite to "
                "start afresh (deleting them), or choose another --output"
            )
        for old in list_checkpoints(root):
            shutil.rmtree(old)
    remove_incomplete(root)


# Settings a resumed run may change in every stage: where it writes, what it shows, the devices and ranks (each
# stage checks batch_size x ranks itself).
RESUME_FREE = frozenset(
    {"output", "resume", "overwrite", "save_every", "keep_checkpoints", "report_to", "run_name", "progress"}
    | {"device", "threads", "strategy", "liger", "batch_size"}
)
# Settings that change only how the same numbers are computed: allowed, with a warning.
RESUME_NUMERICS = frozenset({"dtype", "backend", "packing", "gradient_checkpointing", "attn_implementation"})


def restore(ctx: DistContext, folder: Path, engine: torch.nn.Module, optimizer, scheduler, stage: str):
    """Load a checkpoint's optimizer, schedule and (written by as many ranks) RNG states into this run; returns
    ``(state, this rank's tensors, this rank's json)``, the last two None when the number of ranks changed."""
    state = read_state(folder)
    if state.get("stage") != stage:
        raise ValueError(f"--resume {folder}: not a {stage} checkpoint")
    rank_tensors, rank_json = load_rank_state(ctx, folder, state)
    ctx.load_optimizer_state(engine, optimizer, load_tensors(folder / OPTIMIZER_FILE))
    scheduler.load_state_dict(state["scheduler"])
    if rank_tensors is not None:  # per-rank RNG states carry over only to the same number of ranks
        from .runtime import restore_rng

        restore_rng(rank_tensors["rng"])
    return state, rank_tensors, rank_json


def check_resume_settings(
    saved: dict[str, Any], current: dict[str, Any], *, free: frozenset[str] = RESUME_FREE, numerics=RESUME_NUMERICS
) -> list[str]:
    """Compare a checkpoint's config with this run's: a change to a setting outside ``free`` (which cannot change
    what is trained: output, logging, devices) and ``numerics`` (which changes only rounding: dtype, backend,
    packing) would make the resumed run a different run, and is refused (ValueError naming every such setting);
    returns the ``numerics`` changes, for a warning and the run's record."""
    changed = {
        key: (saved[key], current[key])
        for key in sorted(saved)
        if key in current and key not in free and saved[key] != current[key]
    }
    refused = [f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in numerics]
    if refused:
        raise ValueError(
            "resuming would change the run: " + ", ".join(refused) + "; resume with the checkpoint's settings, or "
            "start a new run (--overwrite or another --output)"
        )
    return [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()]
