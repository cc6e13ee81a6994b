"""Collation: right-padded ``input_ids`` / ``attention_mask`` / ``labels`` batches of encoded pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import IGNORE_INDEX  # the label of prompt and padding positions (no loss)
from .encoding import EncodedPair


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
