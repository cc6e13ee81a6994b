"""The rules of a run folder (``--output``), in one place: one process at a time (a lock file naming its holder), no
earlier run replaced without ``--resume`` or ``--overwrite``, no input inside it, nothing in it followed through a
symbolic link, and every file the run writes written whole (a temporary file, fsynced, then renamed into place).
The rules are described once, in ``docs/checkpoints.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)  # the package's log (aam_fast.training.runtime.package_logger)


LOCK_FILE = ".aam_fast.lock"
EXPORT_MANIFEST = ".aam_fast-export.json"  # the names the last export wrote, so --overwrite removes exactly those
EXPORT_STAGING = ".tmp-export"
# What a run writes besides its exported model (whose names the manifest lists).
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "config.yaml",
    "completions.jsonl",
    "wandb-run-id.txt",
    "checkpoints",
    "tensorboard",
    "wandb",
    "compare.json",
    "compare.md",
    "compare.png",
    EXPORT_MANIFEST,
    EXPORT_STAGING,
)
# The files of a model folder (``save_pretrained`` and its tokenizer, aam_fast's own): an earlier run's export
# written before the manifest existed is recognised by them.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "aam_fast.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


# -- writing whole files ------------------------------------------------------------------------------------------


def fsynced(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` with ``write(handle)`` and flush it to the disk before returning."""
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """``path`` written whole or not at all: into a temporary file beside it, fsynced, then renamed over it (a
    symbolic link at ``path`` is replaced, never written through)."""
    partial = path.with_name(f".tmp-{path.name}")
    if partial.is_symlink() or partial.exists():
        partial.unlink()
    fsynced(partial, write, mode)
    os.replace(partial, path)
    fsync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda handle: handle.write(text), "w")


def publish_folder(staging: Path, output: Path) -> list[str]:
    """Move every file of ``staging`` (a flat folder the export wrote) into ``output``, each by an atomic rename,
    after recording their names in the export manifest; ``staging`` is then removed. Returns the names."""
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        if (staging / name).is_file():
            fsynced(staging / name, lambda handle: None, "ab")
    known = set(exported_names(output)) | set(names)
    write_text_atomic(output / EXPORT_MANIFEST, json.dumps(sorted(known)) + "\n")
    for name in names:
        target = output / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    fsync_folder(output)
    return names


def exported_names(output: Path) -> list[str]:
    """The plain file names the export manifest lists (none when it is missing, a link or not a list of names)."""
    path = output / EXPORT_MANIFEST
    if not path.is_file() or path.is_symlink():
        return []
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


# -- the lock -------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``OUTPUT/.aam_fast.lock``, created exclusively and holding ``{pid, host, started}``; :meth:`release` removes
    it. A lock of a process that no longer runs on this host is taken over (with a log line); any other holder is
    refused (ValueError naming it)."""

    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                self._take_over_stale()
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(self.record) + "\n")
            return
        raise ValueError(f"--output {output}: cannot take the lock {self.path}; remove it if no run uses the folder")

    def _take_over_stale(self) -> None:
        holder = _holder(self.path)
        if self.path.is_symlink() or holder is None:
            logger.info(f"{self.path}: an unreadable lock; taking it over")
        else:
            pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
            mine = host == self.record["host"]
            if not (mine and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not _alive(pid)):
                raise ValueError(
                    f"--output {self.path.parent} is in use by another run (pid {pid} on {host}, started {started}); "
                    f"wait for it to end or choose another --output (if no run uses it, remove {self.path})"
                )
            logger.info(f"{self.path}: pid {pid} (started {started}) no longer runs; taking its lock over")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if not self.path.is_symlink() and _holder(self.path) == self.record:
            self.path.unlink(missing_ok=True)


# -- what the folder may hold ---------------------------------------------------------------------------------------


def check_inputs_outside(output: Path, inputs: dict[str, str | None]) -> None:
    """ValueError when an existing input (``{flag: path}``) is the output folder or lies inside it."""
    root = output.resolve()
    for flag, value in inputs.items():
        if not value or not Path(value).exists():
            continue
        path = Path(value).resolve()
        if path == root:
            raise ValueError(f"--output {output} is the {flag} folder: it would be overwritten; choose another folder")
        if root in path.parents:
            raise ValueError(f"{flag} {value} is inside --output {output}: it could be overwritten; move it out")


def run_entries(output: Path) -> list[Path]:
    """The entries of ``output`` that a run writes (present ones only; the lock and foreign files left out)."""
    names = set(RUN_FILES) | set(exported_names(output))
    found = []
    for entry in sorted(output.iterdir()) if output.is_dir() else []:
        if entry.name in names or any(entry.match(pattern) for pattern in MODEL_FILE_PATTERNS):
            found.append(entry)
    return found


def refuse_links(output: Path, entries: Iterable[Path]) -> None:
    """ValueError naming the first symbolic link among the run's entries or the checkpoints' folders."""
    checkpoints = output / "checkpoints"
    nested = list(checkpoints.iterdir()) if checkpoints.is_dir() and not checkpoints.is_symlink() else []
    for entry in [*entries, *nested]:
        if entry.is_symlink():
            raise ValueError(
                f"{entry} is a symbolic link: a run never writes or deletes through one; remove it or choose another "
                "--output"
            )


def remove_entries(entries: Iterable[Path]) -> None:
    """Delete what an earlier run wrote: files and folders themselves, never what a link points to."""
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry)
