"""Tokenising many pairs through ``datasets.map``: batched, optionally in ``num_proc`` processes, with a progress
bar, and cached on disk under a fingerprint of (pair texts, tokenizer, ``max_length``, encoder version), so a second
run (or ``eval-rm``) on the same data and tokenizer reads the token ids back instead of tokenising again.

The result is exactly :meth:`PairEncoder.encode_all`'s: the same :class:`PairEncoder` encodes each sequence; only
the loop and the storage differ. Margins, subsets and origins are not cached (they do not change token ids) and are
taken from the pairs of this call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from .encoding import FALLBACK_CHAT_TEMPLATE, EncodedPair, EncodedSequence, PairEncoder, TruncationStats
from .records import DataFormatError, PreferencePair

ENCODING_VERSION = 1  # bump when PairEncoder's output changes, so old caches are not reused
_SIDES = ("chosen", "rejected")
_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "origin")
_FIELDS = ("ids", "prompt_len", "response_tokens", "prompt_cut", "response_cut")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: its class, its pipeline (vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens; truncation/padding state left out), chat template and special
    tokens (a tokenizer without a chat template counts as having the fallback one that encoding uses, so a reward
    model saved with that template reuses its training run's cache). A slow tokenizer falls back to ``datasets``'
    hasher of the whole object."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        body = json.dumps(pipeline, sort_keys=True)
    else:
        from datasets.fingerprint import Hasher

        body = Hasher.hash(tokenizer)
    parts = [
        type(tokenizer).__name__,
        body,
        str(getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE),  # the template encoding uses
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str((tokenizer.bos_token_id, tokenizer.eos_token_id)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``<datasets' cache folder>/aam_fast-tokenized`` (``$HF_DATASETS_CACHE``, ~/.cache/huggingface/datasets)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "aam_fast-tokenized"


def _text_columns(pairs: Sequence[PreferencePair]) -> dict[str, list[str]]:
    """Prompt and completions JSON-encoded (one string column each, whether standard or conversational)."""
    columns: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": [], "origin": []}
    for pair in pairs:
        columns["prompt"].append(json.dumps(pair.prompt, ensure_ascii=False))
        columns["chosen"].append(json.dumps(pair.chosen, ensure_ascii=False))
        columns["rejected"].append(json.dumps(pair.rejected, ensure_ascii=False))
        columns["origin"].append(pair.origin)
    return columns


def _fingerprint(columns: dict[str, list[str]], encoder: PairEncoder) -> str:
    digest = hashlib.sha256(f"aam_fast-pairs-v{ENCODING_VERSION}\x00{encoder.max_length}\x00".encode())
    digest.update(tokenizer_fingerprint(encoder.tokenizer).encode())
    for name in ("prompt", "chosen", "rejected"):
        digest.update(f"\x00{name}\x00{len(columns[name])}".encode())
        for text in columns[name]:
            digest.update(text.encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:40]


def pairs_fingerprint(pairs: Sequence[PreferencePair], encoder: PairEncoder) -> str:
    """The content of ``pairs`` as a training run's identity: the tokenisation cache's fingerprint (texts, order,
    tokenizer, ``max_length``) extended by each pair's margin and subset (hex, 40 characters)."""
    digest = hashlib.sha256(_fingerprint(_text_columns(pairs), encoder).encode())
    for pair in pairs:
        digest.update(f"\x00{pair.margin!r}\x00{pair.subset!r}".encode())
    return digest.hexdigest()[:40]


def _encode_batch(batch: dict[str, list], encoder: PairEncoder) -> dict[str, list]:
    """Columns of the encoded chosen and rejected sequences of one batch (one batched tokenizer call per kind)."""
    prompts = [json.loads(p) for p in batch["prompt"]]
    items = [(p, json.loads(c)) for p, c in zip(prompts, batch["chosen"], strict=True)]
    items += [(p, json.loads(r)) for p, r in zip(prompts, batch["rejected"], strict=True)]
    try:
        sequences = encoder.encode_sequences(items)
    except ValueError:
        _raise_naming_the_pair(items, batch["origin"], encoder)
        raise
    out: dict[str, list] = {}
    for offset, side in ((0, "chosen"), (len(prompts), "rejected")):
        rows = sequences[offset : offset + len(prompts)]
        out.update({f"{side}_{name}": [getattr(seq, name) for seq in rows] for name in _FIELDS})
    return out


def _raise_naming_the_pair(items: list, origins: list[str], encoder: PairEncoder) -> None:
    for index, (prompt, completion) in enumerate(items):
        try:
            encoder.encode_sequence(prompt, completion)
        except ValueError as exc:
            origin = origins[index % len(origins)]
            raise DataFormatError(f"{origin or 'pair'}: cannot tokenise: {exc}") from exc


def _features():
    import datasets

    integer = datasets.Value("int64")
    features = {}
    for side in _SIDES:
        features[f"{side}_ids"] = datasets.List(datasets.Value("int32"))
        features.update({f"{side}_{name}": integer for name in _FIELDS[1:]})
    return datasets.Features(features)


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    import datasets

    turn_off = not enabled and not datasets.are_progress_bars_disabled()
    if turn_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            datasets.enable_progress_bars()


def encode_pairs(
    pairs: Sequence[PreferencePair],
    encoder: PairEncoder,
    *,
    num_proc: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[list[EncodedPair], TruncationStats]:
    """``encoder.encode_all(pairs)`` through ``datasets.map``: identical output, batched, in ``num_proc`` processes
    (None or 1: this process), cached as an Arrow file in ``cache_dir`` (default :func:`default_cache_dir`) unless
    ``cache=False``, with a progress bar unless ``progress=False``."""
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc must be a positive integer or None, got {num_proc!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not pairs:
        return [], TruncationStats()
    import datasets

    columns = _text_columns(pairs)
    fingerprint = _fingerprint(columns, encoder)
    cache_file = None
    if cache:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"pairs-{fingerprint}.arrow")
    source = datasets.Dataset.from_dict(columns)
    with _progress_bars(progress):
        mapped = source.map(
            _encode_batch,
            fn_kwargs={"encoder": encoder},
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc if num_proc and num_proc > 1 and len(pairs) > 1 else None,
            remove_columns=list(columns),
            features=_features(),
            cache_file_name=cache_file,
            load_from_cache_file=cache,
            keep_in_memory=not cache,
            new_fingerprint=fingerprint,
            desc="Tokenising pairs",
        )
    return _encoded_pairs(mapped, pairs)


def _encoded_pairs(mapped, pairs: Sequence[PreferencePair]) -> tuple[list[EncodedPair], TruncationStats]:
    table = mapped.with_format("arrow")[:]
    values = {name: table.column(name).to_pylist() for name in table.column_names}
    if len(values["chosen_ids"]) != len(pairs):
        raise RuntimeError(f"tokenised {len(values['chosen_ids'])} pairs, expected {len(pairs)}")
    stats = TruncationStats()
    encoded = []
    for row, pair in enumerate(pairs):
        chosen, rejected = (EncodedSequence(*(values[f"{side}_{name}"][row] for name in _FIELDS)) for side in _SIDES)
        stats.add(chosen)
        stats.add(rejected)
        encoded.append(EncodedPair(chosen, rejected, pair.margin, pair.subset))
    return encoded, stats
