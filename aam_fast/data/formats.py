"""Normalising one raw preference record of any supported format into a :class:`PreferencePair`.

- TRL standard / conversational, explicit ``prompt`` column or implicit (the prompt is the longest common prefix of
  ``chosen`` and ``rejected``: characters for strings, whole messages for message lists, as TRL's ``extract_prompt``);
- hh-rlhf transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` strings), parsed into conversations;
- ShareGPT (``conversations`` list of ``{"from", "value"}`` plus ``chosen``/``rejected`` messages, optional ``system``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .messages import Message, Text, check_messages, completion_messages
from .records import PreferencePair

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_HH_MARKER = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _sharegpt_message(value: Any, what: str) -> Message:
    if isinstance(value, dict) and "from" in value and "value" in value:
        role = _SHAREGPT_ROLES.get(str(value["from"]).lower())
        if role is None:
            raise ValueError(f"{what} has unknown speaker {value['from']!r}")
        if not isinstance(value["value"], str):
            raise ValueError(f"{what} value must be a string")
        return {"role": role, "content": value["value"]}
    if isinstance(value, dict) and "role" in value:
        return check_messages([value], what)[0]
    raise ValueError(f"{what} must be a {{'from', 'value'}} message")


def _sharegpt_completion(value: Any, what: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return [_sharegpt_message(m, f"{what}[{i}]") for i, m in enumerate(value)]
    return [_sharegpt_message(value, what)]


def _parse_sharegpt(record: dict) -> tuple[Text, Text, Text]:
    conversation = record["conversations"]
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} messages")
    prompt = [_sharegpt_message(m, f"conversations[{i}]") for i, m in enumerate(conversation)]
    system = record.get("system")
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    return (
        prompt,
        _sharegpt_completion(record["chosen"], "chosen"),
        _sharegpt_completion(record["rejected"], "rejected"),
    )


def is_hh_transcript(text: Any) -> bool:
    """True for an hh-rlhf style transcript: starts with a Human turn and holds an Assistant turn."""
    return isinstance(text, str) and text.lstrip(" ").startswith("\n\nHuman:") and "\n\nAssistant:" in text


def parse_hh_transcript(text: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise ValueError("hh-rlhf transcript has text before its first '\\n\\nHuman:' turn")
    return [{"role": _HH_ROLES[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts), 2)]


def _split_messages(chosen: list[Message], rejected: list[Message]) -> tuple[list, list, list]:
    """Implicit prompt of two conversations: their longest common prefix of whole messages, moved back so that both
    completions start with an assistant message."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    while common > 0 and any(common >= len(side) or side[common]["role"] != "assistant" for side in (chosen, rejected)):
        common -= 1
    if common == 0:
        raise ValueError("chosen and rejected share no prompt (no common messages before an assistant reply)")
    return chosen[:common], chosen[common:], rejected[common:]


def _split_strings(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt for strings: the longest common character prefix (a space before the split goes with
    the completions)."""
    index = 0
    limit = min(len(chosen), len(rejected))
    while index < limit and chosen[index] == rejected[index]:
        index += 1
    if index < limit and index > 0 and chosen[index - 1] == " ":
        index -= 1
    return chosen[:index], chosen[index:], rejected[index:]


def _parse_margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"'margin' must be a finite number, got {value!r}")
    return float(value)


def normalize_record(record: Any, *, subset_field: str | None = None, origin: str = "") -> PreferencePair:
    """Turn one raw record of any supported format into a :class:`PreferencePair` (``ValueError`` if impossible)."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be an object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise ValueError(f"missing field {key!r} (fields present: {sorted(record)})")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if record.get("conversations") is not None:
        prompt, chosen, rejected = _parse_sharegpt(record)
    elif prompt is not None:
        if isinstance(prompt, str):
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise ValueError("a string 'prompt' needs string 'chosen' and 'rejected'")
        else:
            prompt = check_messages(prompt, "prompt")
            chosen = completion_messages(chosen, "chosen")
            rejected = completion_messages(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if is_hh_transcript(chosen) and is_hh_transcript(rejected):
            prompt, chosen, rejected = _split_messages(parse_hh_transcript(chosen), parse_hh_transcript(rejected))
        else:
            prompt, chosen, rejected = _split_strings(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_messages(
            check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
        )
    else:
        raise ValueError(
            f"'chosen' and 'rejected' must both be strings or both message lists, got "
            f"{type(chosen).__name__} and {type(rejected).__name__}"
        )
    subset = None
    if subset_field is not None:
        if subset_field not in record:
            raise ValueError(f"missing subset field {subset_field!r}")
        subset = str(record[subset_field])
    return PreferencePair(prompt, chosen, rejected, _parse_margin(record.get("margin")), subset, origin)
