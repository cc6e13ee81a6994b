"""Checks for the shipped role-play preference set `aam_fast/demo/roleplay_pairs.jsonl` that drives `make demo`.

The file is TRL's conversational preference format (a system character profile, then alternating user/assistant
turns ending on a user turn; one assistant message each in `chosen` and `rejected`) plus `character`, `language`
and `kind` columns. These tests pin the schema and the balance the demo relies on: enough pairs, characters,
ambiguous pairs and Chinese pairs, and a length mix that a length-only baseline cannot exploit.
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest

KINDS = {"bland", "out_of_character", "persona_break", "ambiguous"}
LANGUAGES = {"en", "zh"}
FIELDS = {"prompt", "chosen", "rejected", "character", "language", "kind"}


def _demo_path() -> Path:
    # find_spec locates the package without executing aam_fast/__init__.py (which imports torch).
    spec = importlib.util.find_spec("aam_fast")
    if spec is not None and spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = Path(__file__).resolve().parents[1] / "aam_fast"
    return package_dir / "demo" / "roleplay_pairs.jsonl"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    path = _demo_path()
    text = path.read_bytes().decode("utf-8")  # strict: invalid UTF-8 raises
    lines = text.split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    rows = []
    for index, line in enumerate(lines[:-1]):
        assert line.strip(), f"{path}: blank line at record {index}"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path}: record {index} is not a JSON object"
        rows.append(row)
    return rows


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff"


def _text(message_list: list[dict]) -> str:
    return message_list[0]["content"]


def _check_message(message, role: str, where: str) -> None:
    assert isinstance(message, dict), f"{where}: not an object"
    assert set(message) == {"role", "content"}, f"{where}: keys {sorted(message)}"
    assert message["role"] == role, f"{where}: role {message['role']!r}, expected {role!r}"
    assert isinstance(message["content"], str) and message["content"].strip(), f"{where}: empty content"
    assert message["content"] == message["content"].strip(), f"{where}: stray leading/trailing whitespace"


def test_record_schema(records):
    for index, row in enumerate(records):
        where = f"record {index}"
        assert set(row) == FIELDS, f"{where}: fields {sorted(row)}"
        prompt = row["prompt"]
        assert isinstance(prompt, list) and len(prompt) >= 2 and len(prompt) % 2 == 0, f"{where}: prompt shape"
        _check_message(prompt[0], "system", f"{where} prompt[0]")
        for turn, message in enumerate(prompt[1:], start=1):
            _check_message(message, "user" if turn % 2 == 1 else "assistant", f"{where} prompt[{turn}]")
        for column in ("chosen", "rejected"):
            assert isinstance(row[column], list) and len(row[column]) == 1, f"{where}: {column} shape"
            _check_message(row[column][0], "assistant", f"{where} {column}[0]")
        assert _text(row["chosen"]) != _text(row["rejected"]), f"{where}: chosen == rejected"
        assert isinstance(row["character"], str) and row["character"].strip(), f"{where}: character"
        assert row["language"] in LANGUAGES, f"{where}: language {row['language']!r}"
        assert row["kind"] in KINDS, f"{where}: kind {row['kind']!r}"


def test_counts(records):
    characters = {row["character"] for row in records}
    kinds = [row["kind"] for row in records]
    assert len(records) >= 120
    assert len(characters) >= 12
    assert kinds.count("ambiguous") >= 15
    assert sum(row["language"] == "zh" for row in records) >= 30
    assert {"bland", "out_of_character", "persona_break"} <= set(kinds), "the three failure kinds must all occur"
    assert any(len(row["prompt"]) > 2 for row in records), "expected some multi-turn prompts"
    chosen_texts = [_text(row["chosen"]) for row in records]
    assert len(set(chosen_texts)) == len(chosen_texts), "a chosen reply is duplicated"


def test_each_character_has_one_profile_and_language(records):
    profiles, languages = defaultdict(set), defaultdict(set)
    for row in records:
        profiles[row["character"]].add(row["prompt"][0]["content"])
        languages[row["character"]].add(row["language"])
    for character, texts in profiles.items():
        assert len(texts) == 1, f"{character!r} has {len(texts)} different system profiles"
        assert character in next(iter(texts)), f"{character!r} is not named in its own profile"
        assert len(languages[character]) == 1, f"{character!r} mixes languages"
    assert sum(languages[c] == {"zh"} for c in languages) >= 3, "expected at least 3 Chinese characters"


def test_language_matches_script(records):
    for index, row in enumerate(records):
        texts = [m["content"] for m in row["prompt"]] + [_text(row["chosen"]), _text(row["rejected"])]
        cjk_share = [sum(map(_is_cjk, t)) / len(t) for t in texts]
        if row["language"] == "zh":
            assert min(cjk_share) > 0.3, f"record {index}: marked zh but a message is mostly not Chinese"
        else:
            assert max(cjk_share) == 0.0, f"record {index}: marked en but contains CJK characters"


def test_length_mix_defeats_a_length_only_baseline(records):
    rejected_longer = [len(_text(row["rejected"])) > len(_text(row["chosen"])) for row in records]
    fraction = sum(rejected_longer) / len(records)
    assert 0.3 <= fraction <= 0.6, f"rejected is longer in {fraction:.3f} of pairs"
