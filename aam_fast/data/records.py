"""The normalised preference record (:class:`PreferencePair`), a loaded set of them, and the data error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses import MARGINS
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


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return all(not message["content"].strip() for message in text)


def degenerate_reason(pair: PreferencePair) -> str | None:
    """Why a pair teaches nothing (its loss is ln 2 whatever the model), or None: ``"chosen equals rejected"``,
    ``"empty chosen response"`` or ``"empty rejected response"`` (blank text, or messages all blank)."""
    if pair.chosen == pair.rejected:
        return "chosen equals rejected"
    for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if _is_empty(text):
            return f"empty {side} response"
    return None


@dataclass
class PreferenceData:
    """The pairs read from ``source``.

    ``skipped`` records were invalid and dropped (``skip_invalid=True``), ``skip_reasons`` says why. ``identical``
    and ``empty`` count the degenerate pairs found (chosen equal to rejected; an empty response): kept and logged
    by default, dropped and also counted in ``skipped`` under ``skip_invalid``. ``with_margin`` counts the
    kept pairs that carry a data margin, read from the ``margin_column`` field.
    """

    pairs: list[PreferencePair]
    source: str
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    identical: int = 0
    empty: int = 0
    with_margin: int = 0
    margin_column: str = "margin"

    def __len__(self) -> int:
        return len(self.pairs)

    def degenerate_note(self) -> str | None:
        """One line on the degenerate pairs found, or None when there were none."""
        if not self.identical and not self.empty:
            return None
        return (
            f"{self.source}: {self.identical} pairs have chosen equal to rejected (no preference: loss ln 2 whatever "
            f"the model) and {self.empty} an empty response (no text of its own to score)"
        )

    def margin_note(self, margin: str) -> str | None:
        """One line when the data carries margins that the ``margin`` variant does not use (only ``"fixed"``
        reads them), else None. ``margin`` is the loss's margin variant (``"bt"``, ``"fixed"``, ``"pr"``, ``"ld"``)."""
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
        if margin == "fixed" or not self.with_margin:
            return None
        return (
            f"{self.source}: {self.with_margin} of {len(self.pairs)} pairs have a {self.margin_column!r} column, "
            f"ignored under margin={margin!r} (only margin='fixed' uses the data's margins)"
        )
