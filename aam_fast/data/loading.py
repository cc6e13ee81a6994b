"""Loading preference pairs from a source: a local file or anything ``datasets.load_dataset`` accepts.

A record that cannot be normalised raises :class:`DataFormatError` naming the source and the record index, or with
``skip_invalid=True`` is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import iter_file_records, looks_like_file
from .formats import normalize_record
from .records import DataFormatError, PreferenceData


def _iter_hub_records(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many exception types; keep the cause
        raise DataFormatError(f"{name!r} is neither a local data file nor a loadable dataset: {exc}") from exc
    yield from enumerate(dataset)


def load_preferences(
    source: str | Path,
    *,
    split: str = "train",
    subset_field: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> PreferenceData:
    """Read preference pairs from a local file or a ``datasets`` source (hub name or folder, ``split``).

    Bad records raise :class:`DataFormatError` naming ``source`` and the record index, unless ``skip_invalid``,
    in which case they are dropped and counted in ``skipped``. ``limit`` stops after that many valid pairs.
    """
    path = Path(source)
    if path.is_file():
        records = iter_file_records(path)
    elif looks_like_file(path):
        raise DataFormatError(f"{path}: no such file")
    else:
        records = _iter_hub_records(str(source), split)
    name = str(source)
    data = PreferenceData(pairs=[], source=name)
    for index, record in records:
        try:
            if isinstance(record, DataFormatError):
                raise record
            pair = normalize_record(record, subset_field=subset_field, origin=f"{name}#{index}")
        except DataFormatError as exc:
            if not skip_invalid:
                raise
            data.skipped += 1
            data.skip_reasons.append(str(exc))
            continue
        except ValueError as exc:
            message = f"{name}: record {index}: {exc}"
            if not skip_invalid:
                raise DataFormatError(message) from exc
            data.skipped += 1
            data.skip_reasons.append(message)
            continue
        data.pairs.append(pair)
        if limit is not None and len(data.pairs) >= limit:
            break
    if not data.pairs:
        raise DataFormatError(f"{name}: no valid preference pairs (skipped {data.skipped})")
    return data
