"""Reading raw records from local files: ``.json``, ``.jsonl``/``.ndjson``, ``.parquet`` and ``.csv``, each
optionally ``.gz``.

A record that cannot be parsed (invalid JSON, or JSON nested deeper than Python's recursion limit) is yielded as a
:class:`DataFormatError` naming the file and the record, so the caller can raise it or skip and count it; a file
that cannot be read at all raises.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import DataFormatError

FILE_TYPES = ("json", "jsonl", "parquet", "csv")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
# A JSON string, a bracket or a comma: enough to find the top-level items of an array without parsing them.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)
_TOO_DEEP = "JSON nested deeper than Python's recursion limit"


def file_type(path: Path) -> str:
    """One of :data:`FILE_TYPES` from the suffix (a trailing ``.gz`` ignored), else :class:`DataFormatError`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise DataFormatError(f"{path}: unknown file type (expected .json, .jsonl, .parquet or .csv, optionally .gz)")
    return kind


def looks_like_file(path: Path) -> bool:
    """True when ``path`` has a data-file suffix (so a missing one is an error, not a dataset name)."""
    try:
        file_type(path)
    except DataFormatError:
        return False
    return True


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from exc


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark, as Windows editors write, dropped); bytes that are not
    UTF-8 are an error naming the line that holds them."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}: line {line} is not UTF-8 text: {exc}") from exc


def iter_file_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(record_index, record)`` from a local json/jsonl/parquet/csv file (gzipped or not).

    An unparsable record is yielded as a :class:`DataFormatError` instance (raise or skip it); CSV cells are
    strings (an empty cell is ``""``).
    """
    path = Path(path)
    kind = file_type(path)
    if kind == "parquet":
        yield from enumerate(_parquet_records(path))
    elif kind == "csv":
        yield from enumerate(_csv_records(path))
    elif kind == "json":
        yield from _json_records(path, _read_text(path))
    else:
        yield from _jsonl_records(path, _read_text(path))


def _parquet_records(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(_read_bytes(path))).to_pylist()
    except DataFormatError:
        raise
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataFormatError(f"{path}: not a readable parquet file: {exc}") from exc


def _csv_records(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)  # long responses exceed the default 128 KiB cell limit
    try:
        return list(csv.DictReader(io.StringIO(_read_text(path), newline=""), restkey="_extra_cells"))
    except csv.Error as exc:
        raise DataFormatError(f"{path}: not a readable CSV file: {exc}") from exc


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        yield index, _parse_json(line, f"{path}: record {index} (line {line_number})")
        index += 1


def _parse_json(text: str, where: str) -> Any:
    """The parsed value, or a :class:`DataFormatError` naming ``where`` (returned, not raised)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return DataFormatError(f"{where}: invalid JSON: {exc}")
    except RecursionError:
        return DataFormatError(f"{where}: {_TOO_DEEP}")


def _json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        if "Extra data" not in str(exc):
            raise DataFormatError(f"{path}: invalid JSON: {exc}") from exc
        yield from _jsonl_records(path, text)  # JSON Lines saved as .json, which `datasets` also accepts
        return
    except RecursionError:
        # Too deep for one parse: parse the top-level list item by item so only the deep record fails.
        if not text.lstrip().startswith("["):
            raise DataFormatError(f"{path}: {_TOO_DEEP}") from None
        for index, item in enumerate(_json_array_items(text)):
            yield index, _parse_json(item, f"{path}: record {index}")
        return
    if isinstance(content, dict):
        lists = [v for v in content.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFormatError(f"{path}: expected a JSON list of records (or one key holding the list)")
        content = lists[0]
    if not isinstance(content, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(content).__name__}")
    yield from enumerate(content)


def _json_array_items(text: str) -> list[str]:
    """The source text of each top-level item of a JSON array (found by brackets and commas outside strings)."""
    items, depth, start = [], 0, None
    for token in _JSON_TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth == 1:
                start = token.end()
        elif char in "]}":
            depth -= 1
            if depth == 0:
                items.append(text[start : token.start()])
                break
        elif char == "," and depth == 1:
            items.append(text[start : token.start()])
            start = token.end()
    else:
        if start is not None:
            items.append(text[start:])  # an unclosed array: its last item then fails to parse, by index
    return [item for item in items if item.strip()]
