"""Data layer: preference pairs and GRPO prompts, from raw records to padded batches.

One concern per module: :mod:`.messages` (the message type and its check), :mod:`.records` (the normalised pair),
:mod:`.formats` (TRL standard/conversational, implicit prompt, hh-rlhf, ShareGPT), :mod:`.files` (json/jsonl/parquet,
gzipped), :mod:`.loading` (:func:`load_preferences`), :mod:`.splitting`, :mod:`.encoding` (:class:`PairEncoder`),
:mod:`.collation` and :mod:`.prompts` (GRPO prompt sources). Imports nothing from the model or training layers.
"""

from .collation import IGNORE_INDEX, collate_pairs, pad_sequences
from .encoding import (
    FALLBACK_CHAT_TEMPLATE,
    EncodedPair,
    EncodedSequence,
    PairEncoder,
    TruncationStats,
    choose_pad_token_id,
    render_conversation,
)
from .files import iter_file_records
from .formats import is_hh_transcript, normalize_record, parse_hh_transcript
from .loading import load_preferences
from .messages import ROLES, Message, Text, check_messages, completion_messages, is_conversational
from .prompts import (
    DEFAULT_OPENING_TURN,
    PREFERENCE_COLUMNS,
    RPBENCH_CHARACTER_TEMPLATE,
    Prompt,
    check_prompt,
    load_prompts,
    read_records,
)
from .records import DataFormatError, PreferenceData, PreferencePair
from .splitting import prompt_hash_fraction, prompt_key, split_by_prompt

__all__ = [
    "DEFAULT_OPENING_TURN",
    "FALLBACK_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "PREFERENCE_COLUMNS",
    "ROLES",
    "RPBENCH_CHARACTER_TEMPLATE",
    "DataFormatError",
    "EncodedPair",
    "EncodedSequence",
    "Message",
    "PairEncoder",
    "PreferenceData",
    "PreferencePair",
    "Prompt",
    "Text",
    "TruncationStats",
    "check_messages",
    "check_prompt",
    "choose_pad_token_id",
    "collate_pairs",
    "completion_messages",
    "is_conversational",
    "is_hh_transcript",
    "iter_file_records",
    "load_preferences",
    "load_prompts",
    "normalize_record",
    "pad_sequences",
    "parse_hh_transcript",
    "prompt_hash_fraction",
    "prompt_key",
    "read_records",
    "render_conversation",
    "split_by_prompt",
]
