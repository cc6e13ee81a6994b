"""Reading raw records from local files: ``.json``, ``.jsonl``/``.ndjson`` and ``.parquet``, each optionally ``.gz``."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import DataFormatError


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".ndjson"):
        return "jsonl"
    if kind == ".json":
        return "json"
    if kind == ".parquet":
        return "parquet"
    raise DataFormatError(f"{path}: unknown file type (expected .json, .jsonl or .parquet, optionally .gz)")


def iter_file_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(record_index, record)`` from a local json/jsonl/parquet file (gzipped or not).

    A JSON Lines line that is not valid JSON yields a :class:`DataFormatError` instance as its record so that the
    caller can raise or skip it; a file that cannot be read at all raises.
    """
    path = Path(path)
    kind = _format_of(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        try:
            table = pq.read_table(io.BytesIO(raw))
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataFormatError(f"{path}: not a readable parquet file: {exc}") from exc
        yield from enumerate(table.to_pylist())
        return
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataFormatError(f"{path}: cannot read: {exc}") from exc
    if kind == "json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            if "Extra data" not in str(exc):
                raise DataFormatError(f"{path}: invalid JSON: {exc}") from exc
            kind = "jsonl"  # JSON Lines saved as .json, which `datasets` also accepts
        else:
            if isinstance(content, dict):
                lists = [v for v in content.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataFormatError(f"{path}: expected a JSON list of records (or one key holding the list)")
                content = lists[0]
            if not isinstance(content, list):
                raise DataFormatError(f"{path}: expected a JSON list of records, got {type(content).__name__}")
            yield from enumerate(content)
            return
    index = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, DataFormatError(f"{path}: record {index} (line {line_number}): invalid JSON: {exc}")
        index += 1


def looks_like_file(path: Path) -> bool:
    try:
        _format_of(path)
    except DataFormatError:
        return False
    return True
