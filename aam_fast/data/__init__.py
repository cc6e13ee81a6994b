"""Data layer: preference pairs and GRPO prompts, from raw records to padded batches.

One concern per module: :mod:`.messages` (the message type and its check), :mod:`.records` (the normalised pair),
:mod:`.formats` (TRL standard/conversational, implicit prompt, hh-rlhf, ShareGPT, Alpaca, column mapping),
:mod:`.files` (json/jsonl/parquet/csv, gzipped), :mod:`.sources` (files, ``save_to_disk`` folders, ``datasets`` names),
:mod:`.loading` (:func:`load_preferences`), :mod:`.preference_sets` (what the reward-model commands read, each
data problem one log line), :mod:`.splitting`, :mod:`.encoding` (:class:`PairEncoder`),
:mod:`.tokenized` (cached ``datasets.map`` tokenisation), :mod:`.collation` and :mod:`.prompts` (GRPO prompts).
Imports nothing from the model or training layers (only ``losses.MARGINS``).
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
from .files import FILE_TYPES, iter_file_records
from .formats import Columns, alpaca_prompt, is_alpaca, is_hh_transcript, normalize_record, parse_hh_transcript
from .loading import load_preferences
from .messages import ROLES, Message, Text, check_messages, completion_messages, is_conversational
from .preference_sets import load_eval_sets, load_train_dev, read_pairs
from .prompts import (
    ALPACA_PROMPT_FIELDS,
    DEFAULT_OPENING_TURN,
    PREFERENCE_COLUMNS,
    RPBENCH_CHARACTER_TEMPLATE,
    Prompt,
    check_prompt,
    load_prompt_records,
    load_prompts,
    prompts_per_character,
    read_records,
    records_fingerprint,
)
from .records import DataFormatError, PreferenceData, PreferencePair, degenerate_reason
from .sources import is_saved_dataset, iter_source_records
from .splitting import prompt_hash_fraction, prompt_key, split_by_prompt
from .tokenized import ENCODING_VERSION, default_cache_dir, encode_pairs, pairs_fingerprint, tokenizer_fingerprint

__all__ = [
    "ALPACA_PROMPT_FIELDS",
    "Columns",
    "ENCODING_VERSION",
    "FILE_TYPES",
    "alpaca_prompt",
    "default_cache_dir",
    "degenerate_reason",
    "encode_pairs",
    "pairs_fingerprint",
    "is_alpaca",
    "is_saved_dataset",
    "iter_source_records",
    "tokenizer_fingerprint",
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
    "load_eval_sets",
    "load_prompt_records",
    "records_fingerprint",
    "load_prompts",
    "load_train_dev",
    "normalize_record",
    "pad_sequences",
    "parse_hh_transcript",
    "prompt_hash_fraction",
    "prompt_key",
    "prompts_per_character",
    "read_pairs",
    "read_records",
    "render_conversation",
    "split_by_prompt",
]
