"""Preference data: loading, normalisation, chat templates, tokenisation with truncation, splitting, collation.

Every supported format is normalised to one :class:`PreferencePair` (``prompt``, ``chosen``, ``rejected``, optional
float ``margin``), either *standard* (three strings) or *conversational* (lists of ``{"role", "content"}`` messages):

- TRL standard / conversational, explicit ``prompt`` column or implicit (the prompt is the longest common prefix of
  ``chosen`` and ``rejected``: characters for strings, whole messages for message lists, as TRL's ``extract_prompt``);
- hh-rlhf transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` strings), parsed into conversations;
- ShareGPT (``conversations`` list of ``{"from", "value"}`` plus ``chosen``/``rejected`` messages, optional ``system``).

Sources: a local ``.json``/``.jsonl``/``.parquet`` file (each optionally ``.gz``) or anything else that
``datasets.load_dataset`` accepts (a hub name, a local folder). A record that cannot be normalised raises
:class:`DataFormatError` naming the file and the record index, or with ``skip_invalid=True`` is skipped and counted.

Tokenisation (:class:`PairEncoder`) renders conversational pairs through the tokenizer's chat template (or
:data:`FALLBACK_CHAT_TEMPLATE` when it has none) and standard pairs as ``prompt + completion + eos``. The response is
the part of the full sequence after the prompt's tokens; its tokens get labels, prompt and padding get -100. A
sequence longer than ``max_length`` loses prompt tokens from the left (after a leading BOS) and keeps its response;
only a response that alone exceeds ``max_length`` is cut on the right. Both cuts are counted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Message = dict[str, str]
Text = str | list[Message]

IGNORE_INDEX = -100

# A chat template for tokenizers that ship none: one tagged block per message, the assistant's turn closed by EOS.
#   <s><|system|>\n{profile}\n<|user|>\n{question}\n<|assistant|>\n{answer}</s>\n
# The generation prompt is "<|assistant|>\n". Saved reward models carry it as their tokenizer's chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_ROLES = {"system", "user", "assistant", "tool"}
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


# ----------------------------------------------------------------------------------------------------------------
# Reading files


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


def _looks_like_file(path: Path) -> bool:
    try:
        _format_of(path)
    except DataFormatError:
        return False
    return True


def _iter_hub_records(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many exception types; keep the cause
        raise DataFormatError(f"{name!r} is neither a local data file nor a loadable dataset: {exc}") from exc
    yield from enumerate(dataset)


# ----------------------------------------------------------------------------------------------------------------
# Normalising records


def _check_messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{what}[{i}] must be a {{'role', 'content'}} message")
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise ValueError(f"{what}[{i}] has unknown role {role!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}] content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _sharegpt_message(value: Any, what: str) -> Message:
    if isinstance(value, dict) and "from" in value and "value" in value:
        role = _SHAREGPT_ROLES.get(str(value["from"]).lower())
        if role is None:
            raise ValueError(f"{what} has unknown speaker {value['from']!r}")
        if not isinstance(value["value"], str):
            raise ValueError(f"{what} value must be a string")
        return {"role": role, "content": value["value"]}
    if isinstance(value, dict) and "role" in value:
        return _check_messages([value], what)[0]
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
            prompt = _check_messages(prompt, "prompt")
            chosen = _completion_messages(chosen, "chosen")
            rejected = _completion_messages(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if is_hh_transcript(chosen) and is_hh_transcript(rejected):
            prompt, chosen, rejected = _split_messages(parse_hh_transcript(chosen), parse_hh_transcript(rejected))
        else:
            prompt, chosen, rejected = _split_strings(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_messages(
            _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
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


def _completion_messages(value: Any, what: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _check_messages(value, what)


def load_preferences(
    source: str | Path,
    *,
    split: str = "train",
    subset_field: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
) -> PreferenceData:
    """Read preference pairs from a local file or a ``datasets`` source (hub name or folder, ``split``).

    Bad records raise :class:`DataFormatError` naming ``source`` and the record index, unless ``skip_invalid``,
    in which case they are dropped and counted in ``skipped``. ``limit`` stops after that many valid pairs.
    """
    path = Path(source)
    if path.is_file():
        records = iter_file_records(path)
    elif _looks_like_file(path):
        raise DataFormatError(f"{path}: no such file")
    else:
        records = _iter_hub_records(str(source), split)
    name = str(source)
    data = PreferenceData(pairs=[], source=name)
    for index, record in records:
        try:
            if isinstance(record, DataFormatError):
                raise record
            pair = normalize_record(record, subset_field=subset_field, origin=f"{name}#{index}")
        except DataFormatError as exc:
            if not skip_invalid:
                raise
            data.skipped += 1
            data.skip_reasons.append(str(exc))
            continue
        except ValueError as exc:
            message = f"{name}: record {index}: {exc}"
            if not skip_invalid:
                raise DataFormatError(message) from exc
            data.skipped += 1
            data.skip_reasons.append(message)
            continue
        data.pairs.append(pair)
        if limit is not None and len(data.pairs) >= limit:
            break
    if not data.pairs:
        raise DataFormatError(f"{name}: no valid preference pairs (skipped {data.skipped})")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Splitting


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


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation


def choose_pad_token_id(tokenizer) -> int:
    """Pick (and set on the tokenizer) a pad token that differs from EOS where possible.

    Rewards are read at the last attended position, which is robust to ``pad == eos``; but transformers'
    ``*ForSequenceClassification`` reads the last token that is not ``pad_token_id``, so an exported model scores a
    sequence ending in EOS identically only when pad differs from EOS. Order: the existing pad, else UNK, else EOS.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return pad
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return unk
    if pad is None:
        if eos is None:
            raise ValueError("tokenizer has neither a pad, an unk nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        return eos
    return pad


def render_conversation(tokenizer, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` through the tokenizer's chat template (or :data:`FALLBACK_CHAT_TEMPLATE`)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of ``[prompt; response]``, the first ``prompt_len`` of them prompt.

    ``response_tokens`` counts the response before any right cut (the length baseline uses it); ``prompt_cut`` and
    ``response_cut`` count the tokens truncation removed.
    """

    ids: list[int]
    prompt_len: int
    response_tokens: int
    prompt_cut: int = 0
    response_cut: int = 0


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedSequence
    rejected: EncodedSequence
    margin: float | None = None
    subset: str | None = None


@dataclass
class TruncationStats:
    sequences: int = 0
    prompts_truncated: int = 0
    prompt_tokens_cut: int = 0
    responses_truncated: int = 0
    response_tokens_cut: int = 0

    def add(self, encoded: EncodedSequence) -> None:
        self.sequences += 1
        self.prompts_truncated += int(encoded.prompt_cut > 0)
        self.prompt_tokens_cut += encoded.prompt_cut
        self.responses_truncated += int(encoded.response_cut > 0)
        self.response_tokens_cut += encoded.response_cut

    def describe(self) -> str:
        return (
            f"{self.prompts_truncated}/{self.sequences} sequences lost {self.prompt_tokens_cut} prompt tokens "
            f"(cut from the left); {self.responses_truncated} responses were longer than max_length and lost "
            f"{self.response_tokens_cut} tokens on the right"
        )


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PairEncoder:
    """Tokenises prompt + completion one way for training, ``eval-rm`` and ``RewardScorer``.

    Conversational: ``full = template(prompt + completion)`` and ``prompt = template(prompt, generation prompt)``,
    tokenised without extra special tokens (templates carry their own). Standard: ``full = prompt + completion`` and
    ``prompt`` tokenised with the tokenizer's special tokens, EOS appended to ``full`` when missing (as TRL's reward
    trainer). The response starts where the token ids of ``full`` and ``prompt`` first differ.

    Each sequence is truncated on its own, so a reward depends only on its (prompt, completion): beyond
    ``max_length`` the prompt loses tokens from the left (a leading BOS stays); a response that alone does not fit
    is cut on the right.
    """

    def __init__(self, tokenizer, max_length: int | None = None):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])

    def tokenize(self, prompt: Text, completion: Text) -> tuple[list[int], int]:
        """``(ids, prompt_len)`` of one prompt + completion, before truncation."""
        if isinstance(prompt, list):
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            prompt_ids = self._ids(render_conversation(self.tokenizer, prompt, add_generation_prompt=True), False)
            full_ids = self._ids(render_conversation(self.tokenizer, prompt + completion), False)
        else:
            if not isinstance(completion, str):
                raise ValueError("a string prompt needs a string completion")
            prompt_ids = self._ids(prompt, True)
            full_ids = self._ids(prompt + completion, True)
            if self.eos_token_id is not None and (not full_ids or full_ids[-1] != self.eos_token_id):
                full_ids.append(self.eos_token_id)
        prompt_len = _common_prefix_len(prompt_ids, full_ids)
        if prompt_len == len(full_ids):  # an empty completion: keep at least one response token
            prompt_len -= 1
        return full_ids, prompt_len

    def encode_sequence(self, prompt: Text, completion: Text) -> EncodedSequence:
        ids, prompt_len = self.tokenize(prompt, completion)
        response_tokens = len(ids) - prompt_len
        if self.max_length is None or len(ids) <= self.max_length:
            return EncodedSequence(ids, prompt_len, response_tokens)
        keep_head = 1 if prompt_len > 1 and self.bos_token_id is not None and ids[0] == self.bos_token_id else 0
        prompt_cut = min(len(ids) - self.max_length, prompt_len - keep_head)
        ids = ids[:keep_head] + ids[keep_head + prompt_cut :]
        response_cut = max(0, len(ids) - self.max_length)
        return EncodedSequence(
            ids[: self.max_length], prompt_len - prompt_cut, response_tokens, prompt_cut, response_cut
        )

    def encode(self, pair: PreferencePair) -> EncodedPair:
        return EncodedPair(
            self.encode_sequence(pair.prompt, pair.chosen),
            self.encode_sequence(pair.prompt, pair.rejected),
            pair.margin,
            pair.subset,
        )

    def encode_all(self, pairs: Iterable[PreferencePair]) -> tuple[list[EncodedPair], TruncationStats]:
        stats = TruncationStats()
        encoded = []
        for pair in pairs:
            try:
                item = self.encode(pair)
            except ValueError as exc:
                raise DataFormatError(f"{pair.origin or 'pair'}: cannot tokenise: {exc}") from exc
            stats.add(item.chosen)
            stats.add(item.rejected)
            encoded.append(item)
        return encoded, stats


# ----------------------------------------------------------------------------------------------------------------
# Collation


def pad_sequences(
    sequences: Sequence[tuple[list[int], int]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, prompt_len)`` sequences into ``input_ids``, ``attention_mask`` and ``labels`` ``[N, T]``
    (labels are the ids with prompt and padding set to -100)."""
    length = max(len(ids) for ids, _ in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(sequences):
        tokens = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = tokens
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = tokens[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(
    pairs: Sequence[EncodedPair], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor | None]:
    """One padded batch ``[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}]`` of ``2B`` rows, plus ``margin``
    ``[B]`` float32 (None unless every pair has one)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    sequences = [(p.chosen.ids, p.chosen.prompt_len) for p in pairs]
    sequences += [(p.rejected.ids, p.rejected.prompt_len) for p in pairs]
    batch: dict[str, torch.Tensor | None] = dict(pad_sequences(sequences, pad_token_id, pad_to_multiple_of))
    margins = [p.margin for p in pairs]
    batch["margin"] = None if any(m is None for m in margins) else torch.tensor(margins, dtype=torch.float32)
    return batch
