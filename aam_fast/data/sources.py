"""Where raw records come from: a local file, a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``, one ``split`` of it), or anything ``datasets.load_dataset`` accepts (a hub name, a data folder).
Preference pairs and GRPO prompts read the same sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import iter_file_records, looks_like_file
from .records import DataFormatError


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def iter_source_records(source: str | Path, *, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Yield ``(record_index, record)`` of ``source`` (see module doc); ``split`` picks the split of a
    ``DatasetDict`` folder or of a ``load_dataset`` source. Unparsable records come as :class:`DataFormatError`."""
    path = Path(source)
    if path.is_file():
        return iter_file_records(path)
    if looks_like_file(path):
        raise DataFormatError(f"{path}: no such file")
    if is_saved_dataset(path):
        return enumerate(_load_saved(path, split))
    return enumerate(_load_dataset(str(source), split))


def _load_saved(path: Path, split: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many exception types; keep the cause
        raise DataFormatError(f"{path}: not a readable save_to_disk folder: {exc}") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataFormatError(f"{path}: no split {split!r} in this DatasetDict (splits: {sorted(dataset)})")
        dataset = dataset[split]
    return dataset


def _load_dataset(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many exception types; keep the cause
        raise DataFormatError(f"{name!r} is neither a local data file nor a loadable dataset: {exc}") from exc
