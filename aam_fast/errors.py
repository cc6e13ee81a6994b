"""How a command's failure reads: each exception a run can end in becomes one line and an exit code
(:func:`describe_failure`), for the one error boundary in :func:`aam_fast.cli.main`.

- ``ValueError``: bad input (a flag, a data record, a file's content), exit 2; its message says what and where.
- :class:`RunError` (a reward function that fails to import or raises, a model folder that cannot be used) and
  :class:`~aam_fast.training.TrainingDiverged`: exit 1, their message names the file or the step.
- ``OSError`` (an unwritable or read-only folder, a file-size limit, a full disk, a missing file), a safetensors or
  torch file that cannot be written or read, a refused pickle, running out of memory (CUDA or CPU): exit 1, one line
  naming the file (where the error names one) and what to do.
- Anything else is a bug: exit 1, one line saying so and that ``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import pickle
import re

import torch

BAD_INPUT = 2
FAILED = 1

_OS_ADVICE = {
    errno.EFBIG: "the file-size limit was reached (raise it: ulimit -f), or choose an --output on another file system",
    errno.ENOSPC: "the disk is full: free space or choose an --output on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose an --output on another disk",
    errno.EROFS: "the file system is read-only: choose another --output",
    errno.EACCES: "permission denied: fix its permissions or choose another --output",
    errno.EPERM: "operation not permitted: fix its permissions or choose another --output",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is not a folder: check the path",
    errno.EISDIR: "it is a folder, not a file: check the path",
}


_QUOTED_ERRNO = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


class RunError(Exception):
    """A failure outside the command line's flags that the user can act on (a reward function that does not import
    or raises, a model folder that cannot be used): the message names the file and what happened; exit 1."""


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip()) or "(no message)"


def _os_error(exc: OSError) -> str:
    """The file (or, when the error names none, the error itself) and what to do about it."""
    where = exc.filename if exc.filename is not None else _one_line(exc)
    return f"{where}: {_OS_ADVICE.get(exc.errno) or exc.strerror or _one_line(exc)}"


def _os_errno(text: str) -> int | None:
    """The errno a library quotes in its message (Rust's ``os error 27``, Python's ``[Errno 27]``), if any."""
    match = _QUOTED_ERRNO.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def _file_format_error(exc: BaseException) -> str | None:
    """A safetensors or torch.save/torch.load failure (they raise their own types, naming no file), in words."""
    text = _one_line(exc)
    advice = _OS_ADVICE.get(_os_errno(text))
    if type(exc).__name__ == "SafetensorError":
        if "serializ" in text and "deserializ" not in text:
            return f"writing a safetensors file failed ({text}): {advice or 'check the disk and its space'}"
        return f"a damaged safetensors file ({text}): {advice or 'replace the file (or the checkpoint) it came from'}"
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStream" in text):
        return (
            f"a torch file could not be written or read ({text}): the disk may be full, the file-size limit "
            "reached (ulimit -f), or the file damaged"
        )
    return None


def _cpu_allocation_failed(exc: BaseException) -> bool:
    """torch's CPU allocator out of memory: a plain RuntimeError (CUDA's is ``torch.OutOfMemoryError``)."""
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one line)`` for the exception a command ended in (see the module's docstring)."""
    from .training.runtime import TrainingDiverged

    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return BAD_INPUT, _one_line(exc)
    if isinstance(exc, (RunError, TrainingDiverged)):
        return FAILED, _one_line(exc)
    if isinstance(exc, OSError):
        return FAILED, _os_error(exc)
    if isinstance(exc, pickle.UnpicklingError):  # torch.load's message runs to a page: its first sentence
        return FAILED, f"a damaged or refused pickle file: {_one_line(exc).split('. ')[0]}"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or _cpu_allocation_failed(exc):
        return FAILED, "out of memory: lower --batch-size (or --max-length), or see docs/cli.md's memory levers"
    described = _file_format_error(exc)
    if described is not None:
        return FAILED, described
    return FAILED, (
        f"unexpected {type(exc).__name__}: {_one_line(exc)} -- this is a bug in aam-fast; run again with --debug for "
        "the traceback and report it"
    )
