"""The frozen trunk's output cached across epochs, for ``--cache-trunk``."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...data import EncodedPair, collate_pairs
from ...modeling import ReferenceModel, RewardModel
from ...training.runtime import autocast
from .reference_logps import ReferenceLogps, length_sorted_chunks, response_logps


class TrunkCache:
    """The frozen trunk's output for every training sequence, computed once (in fixed chunks of the data order, so
    a resumed run caches exactly the same values) and reused every epoch: later steps run only the top layers.

    With a ``reference`` the reference's response log-probs are cached too (:attr:`reference_logps`): they depend
    only on the frozen trunk and the frozen reference top, so training steps need no reference forward.
    Memory: ``2 · pairs · tokens · D`` values, so this is for small data sets such as the demo's; with ``spill_dir``
    they live instead in one memory-mapped file there (unlinked at once, so nothing is left behind), which the OS
    pages in and out, and :meth:`batch` moves each batch to ``device``.
    """

    def __init__(
        self,
        model: RewardModel,
        pairs: Sequence[EncodedPair],
        pad_token_id: int,
        *,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        progress: bool,
        reference: ReferenceModel | None = None,
        backend: str = "auto",
        spill_dir: str | Path | None = None,
    ):
        count = len(pairs)
        self.device = device
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        store, offset = None, 0
        total_tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
        self.reference_logps = None if reference is None else ReferenceLogps(count)
        # Chunks of similar length pad little; the order is fixed, so every run caches the same values.
        for chunk in tqdm(
            length_sorted_chunks(pairs, range(count), batch_size),
            desc="caching frozen trunk",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        ):
            n = len(chunk)
            batch = collate_pairs([pairs[i] for i in chunk], pad_token_id)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            with autocast(device, autocast_dtype):
                hidden = model.trunk_output(input_ids, attention_mask)
            if spill_dir is not None and store is None:
                store = _file_tensor(Path(spill_dir), total_tokens, hidden.shape[-1], hidden.dtype)
            for row, index in enumerate(chunk):
                chosen_len, rejected_len = len(pairs[index].chosen.ids), len(pairs[index].rejected.ids)
                chosen, rejected = hidden[row, :chosen_len], hidden[n + row, :rejected_len]
                if store is None:
                    self.rows[index] = (chosen.clone(), rejected.clone())
                    continue
                end = offset + chosen_len + rejected_len
                store[offset : offset + chosen_len] = chosen
                store[offset + chosen_len : end] = rejected
                self.rows[index] = (store[offset : offset + chosen_len], store[offset + chosen_len : end])
                offset = end
            if reference is not None:
                with torch.no_grad():
                    with autocast(device, autocast_dtype):
                        out = model(input_ids, attention_mask, reference=reference, trunk_hidden=hidden)
                self.reference_logps.store(
                    chunk, *response_logps(reference, out.ref_hidden, batch["labels"], autocast_dtype, backend)
                )

    def batch(self, indices: Sequence[int], length: int) -> torch.Tensor:
        """``[2B, length, D]`` trunk outputs of pairs ``indices`` in ``[chosen; rejected]`` order, zero-padded."""
        sample = self.rows[indices[0]][0]
        out = torch.zeros(2 * len(indices), length, sample.shape[-1], dtype=sample.dtype, device=self.device)
        for row, index in enumerate(indices):
            chosen, rejected = self.rows[index]
            out[row, : chosen.shape[0]] = chosen
            out[len(indices) + row, : rejected.shape[0]] = rejected
        return out


def _file_tensor(folder: Path, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed ``[rows, width]`` tensor backed by a new file in ``folder`` (memory-mapped, shared), the file
    unlinked at once: the mapping stays valid and the space is freed when the tensor is."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, prefix="trunk-", suffix=".bin")
    os.close(handle)
    try:
        flat = torch.from_file(name, shared=True, size=max(rows * width, 1), dtype=dtype)
    finally:
        os.remove(name)
    return flat[: rows * width].view(rows, width)
