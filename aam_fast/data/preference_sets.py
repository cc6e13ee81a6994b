"""The preference sets the reward-model commands read, each problem of the data reported as one log line (how many,
and what happens to them): train-rm's train and dev pairs (a separate dev source, or a prompt-hash split of the
data), compare's held-out eval sets, and :func:`read_pairs` under both and eval-rm."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .loading import load_preferences
from .records import PreferenceData, PreferencePair
from .splitting import split_by_prompt

logger = logging.getLogger(__name__)


def read_pairs(source: str | Path, *, margin: str | None = None, **options: Any) -> PreferenceData:
    """:func:`~.loading.load_preferences` of ``source`` (``options`` are its keywords), logging the records it
    skipped (``skip_invalid``) and, given the loss's ``margin``, a data margin column that margin does not use."""
    data = load_preferences(source, **options)
    if data.skipped:
        logger.warning(f"skipped {data.skipped} invalid records of {source}; first: {data.skip_reasons[0]}")
    note = None if margin is None else data.margin_note(margin)
    if note:
        logger.info(note)
    return data


def load_train_dev(
    source: str | Path,
    *,
    eval_source: str | Path | None = None,
    dev_fraction: float = 0.0,
    margin: str = "bt",
    split: str = "train",
    subset_field: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    **keys: str,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, dev)`` pairs: ``source``'s pairs (the first ``limit``) and ``eval_source``'s, else a prompt-hash
    split of ``source`` (``dev_fraction`` 0: no dev). ``keys`` name the record fields (``prompt_key``,
    ``chosen_key``, ``rejected_key``, ``margin_key``). ValueError when ``margin`` is ``fixed`` and a training pair
    carries no margin."""
    data = read_pairs(
        source, margin=margin, split=split, subset_field=subset_field, skip_invalid=skip_invalid, limit=limit, **keys
    )
    if eval_source:
        train = data.pairs
        dev = read_pairs(eval_source, subset_field=subset_field, skip_invalid=skip_invalid, **keys).pairs
    elif dev_fraction > 0:
        train, dev = split_by_prompt(data.pairs, dev_fraction)
    else:
        train, dev = data.pairs, []
    if margin == "fixed":
        missing = [p.origin for p in train if p.margin is None]
        if missing:
            margin_key = keys.get("margin_key", "margin")
            raise ValueError(f"--margin fixed needs a {margin_key!r} field in every pair; {missing[0]} has none")
    return train, dev


def load_eval_sets(
    sources: Sequence[str | Path], *, subset_field: str | None = None, skip_invalid: bool = False, **keys: str
) -> list[tuple[str, list[PreferencePair]]]:
    """``(name, pairs)`` of each held-out source, named by its file name (``name#i`` when a name repeats);
    ValueError naming ``--eval-data`` for a source without pairs."""
    sets, names = [], set()
    for index, path in enumerate(sources):
        name = Path(path).name
        name = name if name not in names else f"{name}#{index}"
        names.add(name)
        pairs = read_pairs(path, subset_field=subset_field, skip_invalid=skip_invalid, **keys).pairs
        if not pairs:
            raise ValueError(f"--eval-data {path}: no preference pairs to evaluate")
        sets.append((name, pairs))
    return sets
