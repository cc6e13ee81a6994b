"""The normalised preference record (:class:`PreferencePair`), a loaded set of them, and the data error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Text


class DataFormatError(ValueError):
    """A preference record or file that cannot be read; the message names the file and the record index."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` preferred over ``rejected`` after ``prompt``.

    Standard pairs hold three strings; conversational pairs hold message lists (the completions are the messages
    that follow the prompt, usually one assistant message). ``margin`` is the data's own margin (``margin="fixed"``).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    subset: str | None = None
    origin: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PreferenceData:
    """The pairs read from ``source``; ``skipped`` records were invalid and dropped (``skip_invalid=True``)."""

    pairs: list[PreferencePair]
    source: str
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)
