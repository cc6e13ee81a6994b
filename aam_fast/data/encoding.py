"""Tokenising preference pairs: chat templates, prompt/response boundaries and truncation (:class:`PairEncoder`).

Conversational pairs are rendered through the tokenizer's chat template (or :data:`FALLBACK_CHAT_TEMPLATE` when it
has none), standard pairs as ``prompt + completion + eos``. The response is the part of the full sequence after the
prompt's tokens; its tokens get labels, prompt and padding get -100. A sequence longer than ``max_length`` loses
prompt tokens from the left (after a leading BOS) and keeps its response; only a response that alone exceeds
``max_length`` is cut on the right. Both cuts are counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .messages import Message, Text
from .records import DataFormatError, PreferencePair

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
    """The text of ``messages`` through the tokenizer's chat template (or :data:`FALLBACK_CHAT_TEMPLATE`). A
    template that fails (its own ``raise_exception``, an undefined name, or an access the sandbox refuses) is a
    ValueError naming the tokenizer's folder."""
    from jinja2 import TemplateError

    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except TemplateError as exc:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(
            f"{where}: its chat template failed ({type(exc).__name__}: {exc}); fix or remove the model folder's "
            "chat template"
        ) from None


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

    def _texts(self, prompt: Text, completion: Text) -> tuple[str, str, bool]:
        """``(prompt_text, full_text, standard)``: the two texts to tokenise, and whether the pair is standard (then
        tokenised with special tokens and closed by EOS) rather than conversational (template carries its own)."""
        if isinstance(prompt, list):
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            prompt_text = render_conversation(self.tokenizer, prompt, add_generation_prompt=True)
            return prompt_text, render_conversation(self.tokenizer, prompt + completion), False
        if not isinstance(completion, str):
            raise ValueError("a string prompt needs a string completion")
        return prompt, prompt + completion, True

    def _finish(self, prompt_ids: list[int], full_ids: list[int], standard: bool) -> tuple[list[int], int]:
        if standard and self.eos_token_id is not None and (not full_ids or full_ids[-1] != self.eos_token_id):
            full_ids.append(self.eos_token_id)
        prompt_len = _common_prefix_len(prompt_ids, full_ids)
        if prompt_len == len(full_ids):  # an empty completion: keep at least one response token
            prompt_len -= 1
        return full_ids, prompt_len

    def tokenize(self, prompt: Text, completion: Text) -> tuple[list[int], int]:
        """``(ids, prompt_len)`` of one prompt + completion, before truncation."""
        prompt_text, full_text, standard = self._texts(prompt, completion)
        return self._finish(self._ids(prompt_text, standard), self._ids(full_text, standard), standard)

    def truncate(self, ids: list[int], prompt_len: int) -> EncodedSequence:
        """Fit ``ids`` into ``max_length``: prompt tokens go from the left (a leading BOS stays), then a response
        that alone does not fit is cut on the right."""
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

    def encode_sequence(self, prompt: Text, completion: Text) -> EncodedSequence:
        return self.truncate(*self.tokenize(prompt, completion))

    def encode_sequences(self, items: Sequence[tuple[Text, Text]]) -> list[EncodedSequence]:
        """``[encode_sequence(p, c) for p, c in items]``, the same output, with one batched tokenizer call per kind
        of text (standard / conversational) and each distinct prompt text tokenised once."""
        texts = [self._texts(prompt, completion) for prompt, completion in items]
        ids: dict[tuple[str, bool], list[int]] = {}
        for standard in (True, False):
            wanted = list(dict.fromkeys(t for p, f, s in texts if s == standard for t in (p, f)))
            if wanted:
                out = self.tokenizer(wanted, add_special_tokens=standard, verbose=False)["input_ids"]
                ids.update(((text, standard), list(row)) for text, row in zip(wanted, out, strict=True))
        return [self.truncate(*self._finish(ids[(p, s)], list(ids[(f, s)]), s)) for p, f, s in texts]

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
