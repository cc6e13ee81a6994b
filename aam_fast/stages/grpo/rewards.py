"""GRPO's rewards: the reward model's score and rule functions with TRL's signature, weighted and summed.

A rule function is ``f(prompts, completions, **columns) -> list[float | None]``: ``completions`` in TRL's form (a
string, or ``[{"role": "assistant", "content": ...}]`` for a conversational prompt), ``columns`` the prompt records'
other fields plus ``completion_ids``; ``None`` means "no reward from this function for that sample".
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ...data import is_conversational
from ...errors import RunError
from ...ops.validation import FLOAT32_MAX, check_float32_range
from ...training.trainer_state import file_digest
from .config import RewardFn

logger = logging.getLogger(__name__)


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """``module:function`` (a dotted module or a path to a .py file) or a callable, returned as the callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    module_name, function_name = spec.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"aam_fast_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        with _import_failures(spec, str(path), imports=True):
            module_spec.loader.exec_module(module)
    else:
        try:
            with _import_failures(spec, module_name, imports=False):
                module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name!r} has no callable {function_name!r}")
    return fn


def reward_fn_identity(fn: RewardFn) -> str:
    """A rule function as a run's identity: its file's name, its name and the SHA-256 of its file's bytes."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    source = None
    for target in (fn, type(fn)):
        try:
            source = inspect.getsourcefile(target)
        except TypeError:
            continue
        if source:
            break
    if not source or not Path(source).is_file():
        return f"{name} (no source file)"
    return f"{Path(source).name}:{name} sha256 {file_digest(source)[:16]}"


@contextlib.contextmanager
def _import_failures(spec: str, where: str, *, imports: bool) -> Iterator[None]:
    """A reward module that does not compile or raises while it is imported, as one :class:`RunError` naming the
    file (and the line of a syntax error). An ImportError too when ``imports`` (a file's own import failed), else it
    passes through (a dotted module that is not there: the caller names it)."""
    try:
        yield
    except SyntaxError as err:
        raise RunError(
            f"reward function {spec!r}: {err.filename or where} line {err.lineno}: syntax error: {err.msg}"
        ) from None
    except ImportError as err:
        if not imports:
            raise
        raise RunError(f"reward function {spec!r}: importing {where} raised {type(err).__name__}: {err}") from None
    except Exception as err:
        raise RunError(f"reward function {spec!r}: importing {where} raised {type(err).__name__}: {err}") from None


def completions_for_fns(prompts: Sequence, texts: Sequence[str]) -> list:
    """Completions in TRL's form: the text, or ``[{"role": "assistant", "content": text}]`` for a chat prompt."""
    return [
        [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]


def _checked_reward(value, name: str, row: int) -> float:
    """A rule reward as a float: NaN for None ("no reward from this function"); anything but a real number that
    float32 (the reward table's dtype) holds as a finite value is an error naming the function and the row."""
    if value is None:
        return math.nan
    number = math.inf
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            pass
    if not abs(number) <= FLOAT32_MAX:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(
            f"reward function {name} returned {shown} for row {row}: expected a finite float or None (within "
            f"float32's +-{FLOAT32_MAX:.3g}, the reward table's dtype)"
        )
    return number


def _completion_text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _first_failing_row(fn: RewardFn, prompts: list, completions: list, columns: dict[str, list]) -> int | None:
    """The first row on which ``fn`` raises when called on that row alone (None when every row passes alone): to
    name the sample behind a failure of the batched call (only then: the run stops with that failure anyway)."""
    for row in range(len(prompts)):
        one = {key: values[row : row + 1] for key, values in columns.items()}
        try:
            fn(prompts=prompts[row : row + 1], completions=completions[row : row + 1], **one)
        except Exception:
            return row
    return None


def _excerpt(prompt, limit: int = 60) -> str:
    """A prompt's text (a chat prompt's last message) for an error line, cut to ``limit`` characters."""
    if isinstance(prompt, str):
        text = prompt
    else:
        text = str(prompt[-1].get("content", "")) if prompt else ""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RewardSources:
    """The weighted sum of the reward model's score and rule rewards, TRL's way.

    Each source scores all samples; ``None`` from a rule function is NaN in the table, and the total is the
    NaN-ignoring weighted sum (a sample that no source scores gets 0, with a warning).
    """

    def __init__(self, scorer: Callable | None, fns: Sequence[str | RewardFn], weights: Sequence[float] | None):
        self.scorer = scorer
        self.fns = [load_reward_fn(f) for f in fns]
        self.specs = [f if isinstance(f, str) else getattr(f, "__qualname__", repr(f)) for f in fns]
        self.names = (["reward_model"] if scorer is not None else []) + [
            getattr(f, "__name__", type(f).__name__) for f in self.fns
        ]
        count = len(self.names)
        check_float32_range(**{f"--reward-weights value {i + 1}": w for i, w in enumerate(weights or [])})
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * count, dtype=torch.float32)

    def identity(self, reward_model: str | None) -> dict[str, str]:
        """The sources by content: each rule function (:func:`reward_fn_identity`) with its weight, and the reward
        model (the SHA-256 of its folder's config files, or the scorer given from Python) with its weight."""
        weights = [float(w) for w in self.weights.tolist()]
        fn_weights = weights[1:] if self.scorer is not None else weights
        fns = [f"{reward_fn_identity(fn)} weight {w}" for fn, w in zip(self.fns, fn_weights, strict=True)]
        scorer = "none"
        if self.scorer is not None:
            scorer = f"{getattr(self.scorer, '__qualname__', type(self.scorer).__qualname__)} (from Python)"
            if reward_model is not None:
                files = [Path(reward_model) / name for name in ("config.json", "aam_fast.json")]
                digests = [file_digest(f)[:16] for f in files if f.is_file()]
                scorer = f"config sha256 {'/'.join(digests) or 'none'}"
            scorer += f" weight {weights[0]}"
        return {"--reward-fn": "; ".join(fns) or "none", "--reward-model": scorer}

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total [n], per_source [n, sources])`` float32 on the CPU; NaN where a source gave None."""
        n = len(prompts)
        per_source = []
        if self.scorer is not None:
            texts = [_completion_text(c) for c in completions]
            scores = torch.as_tensor(self.scorer(prompts, texts), dtype=torch.float32).detach().cpu().reshape(-1)
            if scores.shape[0] != n:
                raise ValueError(f"reward model returned {scores.shape[0]} scores for {n} completions")
            bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"reward model scored row {bad[0]} {scores[bad[0]].item()}: not a finite reward")
            per_source.append(scores)
        for fn, spec in zip(self.fns, self.specs, strict=True):
            name = getattr(fn, "__name__", repr(fn))
            try:
                values = fn(prompts=prompts, completions=completions, **columns)
            except Exception as err:
                row = _first_failing_row(fn, prompts, completions, columns)
                at = f" on row {row} of the rollout (prompt {_excerpt(prompts[row])})" if row is not None else ""
                raise RunError(f"reward function {spec!r} raised {type(err).__name__}{at}: {err}") from None
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise ValueError(f"reward function {name} must return a list of {n} floats or None, got {values!r}")
            per_source.append(torch.tensor([_checked_reward(v, name, row) for row, v in enumerate(values)]))
        table = torch.stack(per_source, dim=1)
        unscored = torch.isnan(table).all(dim=1)
        if bool(unscored.any()):
            logger.warning(f"{int(unscored.sum())} completions got no reward from any source; they count as 0")
        total = torch.nansum(table * self.weights, dim=1)
        return total, table
