"""Loading preference pairs from a source (:mod:`.sources`): a file, a ``save_to_disk`` folder or a ``datasets`` name.

A record that cannot be normalised raises :class:`DataFormatError` naming the source and the record index, or with
``skip_invalid=True`` is skipped and counted. Degenerate pairs (chosen equal to rejected, an empty response) are
counted and reported in one log line, or dropped under ``skip_invalid``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .formats import Columns, normalize_record
from .records import DataFormatError, PreferenceData, PreferencePair, degenerate_reason
from .sources import iter_source_records

logger = logging.getLogger(__name__)


def load_preferences(
    source: str | Path,
    *,
    split: str = "train",
    subset_field: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    margin_key: str = "margin",
) -> PreferenceData:
    """Read preference pairs from a local file, a ``save_to_disk`` folder (``split`` of a ``DatasetDict``) or a
    ``datasets`` source (hub name or data folder, ``split``).

    Bad records raise :class:`DataFormatError` naming ``source`` and the record index, unless ``skip_invalid``,
    in which case they are dropped and counted in ``skipped``; so are degenerate pairs, which are otherwise kept,
    counted and reported in one log line (a warning of this module's logger). ``limit`` (>= 1) stops after that
    many valid pairs. The ``*_key`` arguments name the fields holding the prompt, the responses and the margin.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    columns = Columns(prompt_key, chosen_key, rejected_key, margin_key)
    name = str(source)
    data = PreferenceData(pairs=[], source=name, margin_column=margin_key)
    for index, record in iter_source_records(source, split=split):
        pair = _read_record(data, index, record, subset_field, columns, skip_invalid)
        if pair is None:
            continue
        data.pairs.append(pair)
        data.with_margin += pair.margin is not None
        if limit is not None and len(data.pairs) >= limit:
            break
    if not data.pairs:
        raise DataFormatError(f"{name}: no valid preference pairs (skipped {data.skipped})")
    note = data.degenerate_note()
    if note and not skip_invalid:
        logger.warning(f"{note}; kept (skip_invalid drops them)")
    return data


def _read_record(
    data: PreferenceData, index: int, record, subset_field: str | None, columns: Columns, skip_invalid: bool
) -> PreferencePair | None:
    """The pair of one record, or None when it is skipped (counted in ``data``); raises unless ``skip_invalid``."""
    name = data.source
    try:
        if isinstance(record, DataFormatError):
            raise record
        pair = normalize_record(record, subset_field=subset_field, origin=f"{name}#{index}", columns=columns)
    except DataFormatError as exc:
        return _skip(data, str(exc), exc, skip_invalid)
    except (ValueError, RecursionError) as exc:
        reason = "nested deeper than Python's recursion limit" if isinstance(exc, RecursionError) else str(exc)
        return _skip(data, f"{name}: record {index}: {reason}", exc, skip_invalid)
    reason = degenerate_reason(pair)
    if reason is not None:
        data.identical += reason == "chosen equals rejected"
        data.empty += reason.startswith("empty")
        if skip_invalid:
            return _skip(data, f"{name}: record {index}: {reason}", None, True)
    return pair


def _skip(data: PreferenceData, message: str, cause: Exception | None, skip_invalid: bool) -> None:
    if not skip_invalid:
        raise DataFormatError(message) from cause
    data.skipped += 1
    data.skip_reasons.append(message)
    return None
