"""How a command's failure reads: each exception a run can end in becomes one line and an exit code
(:func:`describe_failure`), for the one error boundary in :func:`aam_fast.cli.main`.

- ``ValueError``: bad input (a flag, a data record, a file's content), exit 2; its message says what and where.
- :class:`RunError` (a reward function that fails to import or raises, a model folder that cannot be used) and
  :class:`~aam_fast.training.TrainingDiverged`: exit 1, their message names the file or the step.
- ``OSError`` (an unwritable or read-only folder, a file-size limit, a full disk, a missing file), a damaged
  safetensors or pickle file, running out of memory: exit 1, one line naming the file and what to do.
- Anything else is a bug: exit 1, one line saying so and that ``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import pickle

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


class RunError(Exception):
    """A failure outside the command line's flags that the user can act on (a reward function that does not import
    or raises, a model folder that cannot be used): the message names the file and what happened; exit 1."""


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip()) or "(no message)"


def _os_error(exc: OSError) -> str:
    """The file (or, when the error names none, the error itself) and what to do about it."""
    where = exc.filename if exc.filename is not None else _one_line(exc)
    return f"{where}: {_OS_ADVICE.get(exc.errno) or exc.strerror or _one_line(exc)}"


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one line)`` for the exception a command ended in (see the module's docstring)."""
    from .training.runtime import TrainingDiverged

    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return BAD_INPUT, _one_line(exc)
    if isinstance(exc, (RunError, TrainingDiverged)):
        return FAILED, _one_line(exc)
    if isinstance(exc, OSError):
        return FAILED, _os_error(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return FAILED, f"a damaged or refused pickle file: {_one_line(exc)}"
    if type(exc).__name__ == "SafetensorError":
        return FAILED, f"a damaged safetensors file: {_one_line(exc)}"
    if isinstance(exc, torch.OutOfMemoryError):
        return FAILED, "out of memory: lower --batch-size (or --max-length), or see docs/cli.md's memory levers"
    first = _one_line(exc)
    return FAILED, (
        f"unexpected {type(exc).__name__}: {first} -- this is a bug in aam-fast; run again with --debug for the "
        "traceback and report it"
    )
