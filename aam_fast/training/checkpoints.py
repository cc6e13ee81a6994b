"""One checkpoint format for every stage: ``OUTPUT/checkpoints/checkpoint-<step>/`` folders whose every file loads
with ``json`` or ``torch.load(weights_only=True)``, saved atomically (a temporary folder renamed into place), and the
checks that make a resumed run the same run. The format, what each file holds and the resume rules are described once,
in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .distributed import DistContext
from .run_folder import (
    RunLock,
    check_inputs_outside,
    fsync_folder,
    fsynced,
    refuse_links,
    remove_entries,
    run_entries,
)
from .runtime import log
from .trainer_state import START_AFRESH, STATE_FILE

PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.pt"
_TMP_PREFIX = ".tmp-"
# What a run writes before its end: a folder holding only these (no model, no summary) holds no finished run.
UNFINISHED_RUN_FILES = frozenset(
    {"metrics.jsonl", "config.yaml", "completions.jsonl", "checkpoints", "tensorboard", "wandb", "wandb-run-id.txt"}
)


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
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / STATE_FILE}: not a readable checkpoint state ({exc}); {START_AFRESH}") from None


def load_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged, truncated or missing tensor file raises (torch, pickle, safetensors): a file that is
    not a zip archive is read as a legacy pickle, which can fail in many ways (IndexError, struct.error, a
    UnicodeDecodeError, ...)."""
    from safetensors import SafetensorError

    return (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        KeyError,
        IndexError,
        ValueError,
        TypeError,
        OverflowError,
        struct.error,
        SafetensorError,
    )


def damaged(path: Path, exc: BaseException) -> ValueError:
    """The one line for a checkpoint file that cannot be read or does not fit this run."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ValueError(f"{path}: damaged, missing or not this run's checkpoint file ({reason}); {START_AFRESH}")


def load_tensors(path: Path) -> Any:
    """A checkpoint's tensor file, read without unpickling arbitrary objects (ValueError naming it when damaged)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except load_errors() as exc:
        raise damaged(path, exc) from None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_folder(folder)


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
        fsynced(tmp / OPTIMIZER_FILE, lambda handle: torch.save(optimizer_state, handle))
    fsynced(tmp / f"rank{ctx.rank}.pt", lambda handle: torch.save(rank_tensors, handle))
    if rank_json is not None:
        fsynced(tmp / f"rank{ctx.rank}.json", lambda handle: json.dump(rank_json, handle), "w")
    ctx.barrier()
    if ctx.is_main:
        record = {**state, "step": step, "world_size": ctx.world, "strategy": ctx.strategy}
        fsynced(tmp / STATE_FILE, lambda handle: handle.write(json.dumps(record, indent=2) + "\n"), "w")
        _fsync_tree(tmp)
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
    state cannot be mapped onto another number of ranks. Every checkpoint holds each rank's tensors (its RNG
    states): a missing file is a damaged checkpoint, not a resume without them."""
    if state.get("world_size") != ctx.world:
        return None, None
    tensors_file, json_file = folder / f"rank{ctx.rank}.pt", folder / f"rank{ctx.rank}.json"
    tensors = load_tensors(tensors_file)
    try:
        extra = json.loads(json_file.read_text(encoding="utf-8")) if json_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise damaged(json_file, exc) from None
    return tensors, extra


def prepare_output(output: Path, *, resume: str | None, overwrite: bool, inputs: dict[str, str | None]) -> RunLock:
    """Make ``output`` safe to write into and lock it (:mod:`.run_folder`; the returned lock is released at the
    end of the run). Refused (ValueError): a file; an input (``{flag: path}``) that is the folder or lies inside it;
    a folder in another run's use; a symbolic link among the run's files (``--overwrite`` removes the link itself);
    a folder holding an earlier run unless ``--resume`` (continue it) or ``--overwrite`` (remove only what a run
    writes; foreign files stay); ``--resume auto`` with no checkpoint in a folder holding a finished run's model or
    summary. Removes the leftovers of crashed saves."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: is a file, not a folder")
    check_inputs_outside(output, inputs)
    output.mkdir(parents=True, exist_ok=True)
    lock = RunLock(output)
    try:
        _clear_for_run(output, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _importance(name: str) -> tuple[int, str]:
    order = ("summary.json", "model.safetensors", "checkpoints", "metrics.jsonl")
    return (order.index(name) if name in order else len(order), name)


def _never_trained(entries: list[Path]) -> bool:
    """Whether ``entries`` are only what a run writes before its first step: its config.yaml and empty tables."""
    for entry in entries:
        plain = entry.is_file() and not entry.is_symlink()
        empty_table = entry.name in ("metrics.jsonl", "completions.jsonl") and plain and entry.stat().st_size == 0
        if not (entry.name == "config.yaml" and plain) and not empty_table:
            return False
    return True


def _clear_for_run(output: Path, resume: str | None, overwrite: bool) -> None:
    entries = run_entries(output)
    if not overwrite or resume:
        refuse_links(output, entries)
    root = output / "checkpoints"
    if entries and not resume:
        if not overwrite and _never_trained(entries):  # a run that failed in its setup: nothing of it to keep
            log(f"{output}: replacing the settings of a run that never trained a step ({entries[0].name})")
        elif not overwrite:
            shown = sorted((e.name for e in entries if not e.name.startswith(".")), key=_importance)
            names = ", ".join(shown[:4]) + (", ..." if len(shown) > 4 else "")
            raise ValueError(
                f"--output {output} holds an earlier run ({names}): pass --resume auto to continue it, --overwrite "
                "to replace it (only a run's own files are removed), or choose another --output"
            )
        else:
            log(f"--overwrite: removed the earlier run's {len(entries)} entries from {output}")
        remove_entries(entries)
    elif resume == "auto" and not list_checkpoints(root):
        finished = [e.name for e in entries if e.name not in UNFINISHED_RUN_FILES]
        if finished:
            raise ValueError(
                f"--resume auto: {output} holds a finished run ({', '.join(finished[:4])}) but no checkpoint to "
                "continue; pass --overwrite to replace it, or choose another --output"
            )
    remove_incomplete(root)


# Settings a resumed run may change in every stage: where it writes, what it shows, the devices and ranks (each
# stage checks batch_size x ranks itself).
RESUME_FREE = frozenset(
    {"output", "resume", "overwrite", "save_every", "keep_checkpoints", "report_to", "run_name", "progress"}
    | {"device", "threads", "strategy", "liger", "batch_size"}
)
# Settings that change only how the same numbers are computed: allowed, with a warning.
RESUME_NUMERICS = frozenset({"dtype", "backend", "packing", "gradient_checkpointing", "attn_implementation"})


def _check_learning_rates(path: Path, optimizer: torch.optim.Optimizer, scheduler) -> None:
    """ValueError unless the optimizer's learning rates are the ones the schedule gives at its step."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    expected = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
    actual = [float(group["lr"]) for group in optimizer.param_groups]
    if actual != expected:
        raise ValueError(
            f"{path}: its learning rates {actual} are not the schedule's {expected} at step {scheduler.last_epoch}; "
            + START_AFRESH
        )


def restore(ctx: DistContext, folder: Path, state: dict[str, Any], engine: torch.nn.Module, optimizer, scheduler):
    """Load a checkpoint's optimizer, schedule and (written by as many ranks) RNG states into this run (``state``:
    its validated trainer_state.json); returns ``(this rank's tensors, this rank's json)``, None when the number of
    ranks changed. A file that cannot be read or does not fit is one ValueError naming it."""
    rank_tensors, rank_json = load_rank_state(ctx, folder, state)
    path = folder / OPTIMIZER_FILE
    saved = load_tensors(path)
    try:
        ctx.load_optimizer_state(engine, optimizer, saved)
    except (*load_errors(), ValueError, TypeError, AttributeError) as exc:
        raise damaged(path, exc) from None
    _check_finite_optimizer(path, saved)
    scheduler.load_state_dict(state["scheduler"])
    _check_learning_rates(path, optimizer, scheduler)
    if rank_tensors is not None:  # per-rank RNG states carry over only to the same number of ranks
        from .runtime import restore_rng

        try:
            if not isinstance(rank_tensors, dict) or not isinstance(rank_tensors.get("rng"), dict):
                raise TypeError("no dict of RNG states under 'rng'")
            restore_rng(rank_tensors["rng"])
        except (KeyError, TypeError, RuntimeError, ValueError, IndexError, AttributeError) as exc:
            raise damaged(folder / f"rank{ctx.rank}.pt", exc) from None
    return rank_tensors, rank_json


def _check_finite_optimizer(path: Path, saved: dict[str, Any]) -> None:
    """ValueError naming ``path`` when its optimizer state (the file every rank read) holds a NaN or inf: resumed,
    the first step would be refused as non-finite, naming this very checkpoint as the last finite one."""
    tensors = [v for values in saved["state"].values() for v in values.values() if isinstance(v, torch.Tensor)]
    bad = sum(int((~torch.isfinite(v)).sum()) for v in tensors if v.is_floating_point())
    if bad:
        raise ValueError(f"{path}: {bad} non-finite values in the optimizer state; {START_AFRESH}")


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
