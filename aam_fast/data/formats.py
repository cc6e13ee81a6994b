"""Normalising one raw preference record of any supported format into a :class:`PreferencePair`.

- TRL standard / conversational, explicit ``prompt`` column or implicit (the prompt is the longest common prefix of
  ``chosen`` and ``rejected``: characters for strings, whole messages for message lists, as TRL's ``extract_prompt``);
- hh-rlhf transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` strings), parsed into conversations;
- ShareGPT (``conversations`` list of ``{"from", "value"}`` plus ``chosen``/``rejected`` messages, optional ``system``);
- Alpaca (``instruction``, optional ``input``, ``system`` and ``history``; see :func:`alpaca_prompt`).

Field names can be mapped first (:class:`Columns`: ``prompt_key``, ``chosen_key``, ``rejected_key``, ``margin_key``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from ..ops.validation import FLOAT32_MAX
from .messages import Message, Text, check_messages, check_unicode, completion_messages
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


_FLOAT_MAX = sys.float_info.max


def _is_big(number: Any) -> bool:
    """A finite float64 that float32 cannot hold (it turns into inf there)."""
    return isinstance(number, float) and math.isfinite(number) and abs(number) > FLOAT32_MAX


def _parse_margin(value: Any, column: str = "margin") -> float | None:
    """A finite float, or None for a missing value; a numeric string (as CSV holds) is parsed, a blank one is None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, int) and not isinstance(number, bool):
        number = float(number) if abs(number) <= _FLOAT_MAX else math.inf  # a huge integer is out of float range
    if isinstance(number, bool) or not isinstance(number, float) or not abs(number) <= FLOAT32_MAX:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        beyond = f" (beyond float32's +-{FLOAT32_MAX:.3g}, where the loss computes)" if _is_big(number) else ""
        raise ValueError(f"{column!r} must be a finite number, got {shown}{beyond}")
    return number


@dataclass(frozen=True)
class Columns:
    """Which record fields hold the prompt, the two responses and the margin (OpenRLHF's ``--prompt-key`` etc.)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str = "margin"

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected", "margin"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}_key must be a non-empty string, got {value!r}")
        keys = [self.prompt, self.chosen, self.rejected, self.margin]
        if len(set(keys)) != len(keys):
            raise ValueError(f"prompt_key, chosen_key, rejected_key and margin_key must differ, got {keys}")

    def rename(self, record: dict) -> dict:
        """``record`` with the mapped fields under their standard names (a mapped field replaces a standard one).
        A mapped ``prompt_key`` must be present; a missing margin is None."""
        mapping = {
            canonical: source
            for canonical, source in (
                ("prompt", self.prompt),
                ("chosen", self.chosen),
                ("rejected", self.rejected),
                ("margin", self.margin),
            )
            if canonical != source
        }
        if not mapping:
            return record
        if "prompt" in mapping and self.prompt not in record:
            raise ValueError(f"missing field {self.prompt!r} (prompt_key; fields present: {sorted(record)})")
        renamed = {k: v for k, v in record.items() if k not in mapping and k not in mapping.values()}
        for canonical, source in mapping.items():
            if source in record:
                renamed[canonical] = record[source]
        return renamed


def alpaca_prompt(record: dict) -> list[Message]:
    """An Alpaca-style prompt as messages, laid out as LLaMA-Factory does: the ``system`` string, the ``history``
    ``[[user, assistant], ...]`` turns, then one user turn ``instruction + "\n" + input`` (an empty input left out)."""
    parts = []
    for name in ("instruction", "input"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string, got {type(value).__name__}")
        if value:
            parts.append(value)
    query = "\n".join(parts)
    if not query.strip():
        raise ValueError("'instruction' and 'input' are both empty")
    messages: list[Message] = []
    system = record.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError(f"'history' must be a list of [user, assistant] pairs, got {type(history).__name__}")
    for turn, item in enumerate(history):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
            raise ValueError(f"history[{turn}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
    messages.append({"role": "user", "content": query})
    return messages


def is_alpaca(record: dict) -> bool:
    """An Alpaca-style record: an ``instruction`` field and no ``prompt`` field."""
    return "instruction" in record and record.get("prompt") is None


def normalize_record(
    record: Any, *, subset_field: str | None = None, origin: str = "", columns: Columns | None = None
) -> PreferencePair:
    """Turn one raw record of any supported format into a :class:`PreferencePair` (``ValueError`` if impossible);
    ``columns`` maps the record's field names first."""
    if not isinstance(record, dict):
        raise ValueError(f"record must be an object, got {type(record).__name__}")
    columns = columns or Columns()
    record = columns.rename(record)
    for key, name in (("chosen", columns.chosen), ("rejected", columns.rejected)):
        if key not in record or record[key] is None:
            raise ValueError(f"missing field {name!r} (fields present: {sorted(record)})")
    prompt, chosen, rejected = _prompt_and_completions(record)
    for what, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        check_unicode(text, what)
    subset = None
    if subset_field is not None:
        if subset_field not in record:
            raise ValueError(f"missing subset field {subset_field!r}")
        subset = str(record[subset_field])
    margin = _parse_margin(record.get("margin"), columns.margin)
    return PreferencePair(prompt, chosen, rejected, margin, subset, origin)


def _prompt_and_completions(record: dict) -> tuple[Text, Text, Text]:
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if record.get("conversations") is not None:
        return _parse_sharegpt(record)
    if prompt is None and is_alpaca(record):
        return alpaca_prompt(record), completion_messages(chosen, "chosen"), completion_messages(rejected, "rejected")
    if prompt is not None:
        if isinstance(prompt, str):
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise ValueError("a string 'prompt' needs string 'chosen' and 'rejected'")
            return prompt, chosen, rejected
        prompt = check_messages(prompt, "prompt")
        return prompt, completion_messages(chosen, "chosen"), completion_messages(rejected, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if is_hh_transcript(chosen) and is_hh_transcript(rejected):
            return _split_messages(parse_hh_transcript(chosen), parse_hh_transcript(rejected))
        return _split_strings(chosen, rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _split_messages(check_messages(chosen, "chosen"), check_messages(rejected, "rejected"))
    raise ValueError(
        f"'chosen' and 'rejected' must both be strings or both message lists, got "
        f"{type(chosen).__name__} and {type(rejected).__name__}"
    )
