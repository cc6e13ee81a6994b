"""The frozen reference's response log-probs of the training pairs, computed once (``--precompute-ref-logps``, and
by ``--cache-trunk``) so that PR steps need no reference forward and the reference need not stay in memory.

The reference is frozen, so ``log π_ref(y | x)`` of a sequence never changes during a run: one no-grad pass over the
pairs the run visits gives every step's value. The pass runs in chunks of similar length in a fixed order (so a
resumed run, on any number of ranks, computes the same values); chunk ``k`` runs on rank ``k mod world`` and the
ranks add their results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ...data import IGNORE_INDEX, EncodedPair, collate_pairs
from ...modeling import RewardModel, head_inputs
from ...ops import linear_logprobs, sequence_logprobs
from ...training.runtime import autocast, log
from .setup import pairs_visited


class ReferenceLogps:
    """For each training pair, the reference's summed response log-prob and response-token count of the chosen and
    the rejected sequence (float64; pairs not computed hold zeros)."""

    def __init__(self, count: int):
        self.sums = torch.zeros(count, 2, dtype=torch.float64)
        self.counts = torch.zeros(count, 2, dtype=torch.float64)
        self.seconds = 0.0  # wall time of the pass that filled it

    def store(self, indices: Sequence[int], sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Record pairs ``indices`` from ``[2n]`` sums and counts in ``[chosen; rejected]`` order."""
        n = len(indices)
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        self.sums[rows] = sums.detach().double().cpu().view(2, n).T
        self.counts[rows] = counts.detach().double().cpu().view(2, n).T

    def batch(self, indices: Sequence[int], length_norm: str) -> torch.Tensor:
        """The sequence log-probs ``[2B]`` float32 of pairs ``indices`` in ``[chosen; rejected]`` order: the sum, or
        the sum over the response length (``"mean"``; 0 for a sequence without response tokens)."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        sums, counts = self.sums[rows].T.reshape(-1), self.counts[rows].T.reshape(-1)
        values = sums / counts.clamp_min(1) if length_norm == "mean" else sums
        return values.float()


def response_logps(
    reference, ref_hidden: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums [R], counts [R])``: each row's summed response-token log-prob under the reference's LM head from its
    final hidden states ``[R, T, D]``, and its response-token count (``labels`` hold IGNORE_INDEX elsewhere)."""
    hidden, weight, bias = head_inputs(
        ref_hidden[:, :-1], reference.lm_head_weight, reference.lm_head_bias, autocast_dtype
    )
    targets = labels[:, 1:].to(hidden.device)
    with torch.no_grad():
        token_logps = linear_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    return sequence_logprobs(token_logps, targets, length_norm="sum"), (targets != IGNORE_INDEX).sum(-1)


def length_sorted_chunks(pairs: Sequence[EncodedPair], indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` in chunks of ``size`` ordered by the pair's longer sequence (then index): little padding, and
    the same chunks in every run over the same pairs."""
    order = sorted(indices, key=lambda i: (max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)), i))
    return [order[start : start + size] for start in range(0, len(order), size)]


def precompute_reference_logps(
    model: RewardModel,
    reference,
    pairs: Sequence[EncodedPair],
    indices: Sequence[int],
    pad_token_id: int,
    *,
    ctx,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    backend: str,
    progress: bool,
) -> ReferenceLogps:
    """The reference's response log-probs of pairs ``indices`` (forward only, ``batch_size`` pairs a chunk, chunks
    shared out over the ranks of ``ctx`` and summed)."""
    started = time.perf_counter()
    store = ReferenceLogps(len(pairs))
    chunks = length_sorted_chunks(pairs, indices, batch_size)
    mine = [chunk for k, chunk in enumerate(chunks) if k % ctx.world == ctx.rank]
    for chunk in tqdm(mine, desc="reference log-probs", disable=not progress, file=sys.stderr, leave=False):
        batch = collate_pairs([pairs[i] for i in chunk], pad_token_id)
        with torch.no_grad(), autocast(device, autocast_dtype):
            hidden = model.reference_hidden(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), reference
            )
        store.store(chunk, *response_logps(reference, hidden, batch["labels"], autocast_dtype, backend))
    if ctx.distributed:
        store.sums = ctx.all_reduce_sum(store.sums)
        store.counts = ctx.all_reduce_sum(store.counts)
    store.seconds = time.perf_counter() - started
    return store


def reference_logps_of_run(
    cfg,
    model: RewardModel,
    reference,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    ctx,
    device,
    autocast_dtype: torch.dtype | None,
    global_batch: int,
    total_steps: int,
    progress: bool,
    note: str,
) -> ReferenceLogps:
    """:func:`precompute_reference_logps` of every pair a run of ``total_steps`` steps of ``cfg`` (a train-rm config)
    visits from step 0 in global micro-batches of ``global_batch`` pairs; logged with ``note``."""
    visited = pairs_visited(len(pairs), global_batch, cfg.seed, total_steps * cfg.grad_accum)
    store = precompute_reference_logps(
        model,
        reference,
        pairs,
        visited,
        pad_token_id,
        ctx=ctx,
        batch_size=cfg.eval_batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        backend=cfg.backend,
        progress=progress,
    )
    log(f"reference log-probs of {len(visited)} pairs {note} in {store.seconds:.1f} s")
    return store
