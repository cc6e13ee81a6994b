"""The one chat-message type of the package and its one check, shared by preference pairs and GRPO prompts.

A message is ``{"role": str, "content": str}`` with a role in :data:`ROLES`. ``tool`` is a role of its own (a tool's
result, e.g. ShareGPT's ``observation``): chat templates render it, and a prompt may end with it (the assistant
replies to the tool's output), so preference data and prompts both accept it.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
Text = str | list[Message]

ROLES = ("system", "user", "assistant", "tool")


def check_unicode(value: Text, what: str) -> None:
    """ValueError naming ``what`` (and the message index) unless every text of ``value`` (a string or messages) is
    valid Unicode: JSON can spell a lone surrogate (``"\\ud800"``), which no tokenizer or file can encode."""
    texts = [(what, value)] if isinstance(value, str) else [(f"{what}[{i}]", m["content"]) for i, m in enumerate(value)]
    for name, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{name} holds a lone surrogate {text[err.start]!r} at character {err.start}: not valid Unicode text "
                "(fix the escape sequence in the file)"
            ) from None


def check_messages(value: Any, what: str) -> list[Message]:
    """``value`` as a non-empty list of ``{"role", "content"}`` messages (extra keys dropped), else ``ValueError``
    naming ``what`` and the message index (``what[i]``)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{what}[{i}] must be a {{'role', 'content'}} message")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{what}[{i}] has unknown role {role!r} (expected one of {list(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}] content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    check_unicode(messages, what)
    return messages


def completion_messages(value: Any, what: str) -> list[Message]:
    """A completion as messages: a string becomes one assistant message, a list is checked."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return check_messages(value, what)


def is_conversational(prompt: Text) -> bool:
    """True for a message-list prompt (rendered with the chat template), False for plain text."""
    return isinstance(prompt, list)
