"""Deterministic train/dev splitting by a hash of the prompt (every pair of one prompt on one side)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from .messages import Text
from .records import PreferencePair


def prompt_key(prompt: Text) -> str:
    """A canonical string of a prompt (for hashing and grouping)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def prompt_hash_fraction(prompt: Text, salt: str = "aam_fast") -> float:
    """A stable number in [0, 1) from SHA-256 of the prompt: the same on every machine, run and Python."""
    digest = hashlib.sha256(f"{salt}\x00{prompt_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_prompt(
    pairs: Sequence[PreferencePair], dev_fraction: float, *, salt: str = "aam_fast"
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic train/dev split: a pair goes to dev when the hash fraction of its prompt is below
    ``dev_fraction``, so every pair sharing a prompt lands on the same side. Order is kept within each side."""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    train, dev = [], []
    for pair in pairs:
        (dev if prompt_hash_fraction(pair.prompt, salt) < dev_fraction else train).append(pair)
    return train, dev
