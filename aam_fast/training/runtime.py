"""Device, precision, seeding, RNG state and the log: one meaning for every command.

``--dtype`` is the compute dtype: parameters stay float32 (the optimizer's master weights) and the forward runs
under ``torch.autocast`` to that dtype; ``auto`` is bfloat16 on CUDA and plain float32 elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys

import numpy as np
import torch

from .config import COMPUTE_DTYPES


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm stopped the run before the step was applied; the message names the step
    and the last finite checkpoint."""


class MainProcessLines(logging.Handler):
    """Each record as one line on stderr, from the main process only, written around the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        from .distributed import is_main_process

        if is_main_process():
            tqdm.write(self.format(record), file=sys.stderr)


def package_logger() -> logging.Logger:
    """The ``aam_fast`` logger, which every layer's module logger reports to (data problems, LoRA, the runs), with a
    :class:`MainProcessLines` handler at INFO installed once (a run calls this first; it does not propagate to the
    root logger, so nothing is printed twice). Without it, as in a library call, warnings reach Python's last-resort
    handler: one bare line on stderr."""
    logger = logging.getLogger("aam_fast")
    if not any(isinstance(handler, MainProcessLines) for handler in logger.handlers):
        logger.addHandler(MainProcessLines())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log(message: str) -> None:
    """A line on stderr from the main process (progress bars stay intact)."""
    package_logger().info(message)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available; ValueError for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--dtype`` on ``device`` (float32 means no autocast)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return COMPUTE_DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to a 16-bit ``dtype``; float32 (or None) runs plain."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, torch.Tensor]:
    """Every RNG state of this process as tensors (loadable with ``torch.load(weights_only=True)``)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *words], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.tensor(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for index, cuda in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{index}"] = cuda
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng`."""
    python = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss[0] if gauss else None))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda = [state[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in state]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
