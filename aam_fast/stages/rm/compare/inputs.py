"""What every variant of ``aam-fast compare`` shares, computed once: the encoded training pairs and eval sets, and the
frozen trunk's output of every one of their sequences (with the PR reference's log-probs of the training
sequences when a variant needs them). A trained variant is scored from that cached trunk by
:func:`~aam_fast.stages.rm.evaluate.score_pairs`."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ....data import (
    EncodedPair,
    PairEncoder,
    TruncationStats,
    choose_pad_token_id,
    encode_pairs,
    load_eval_sets,
    pairs_fingerprint,
)
from ....modeling import RewardModel, make_reference
from ....training.launch import Launch
from ....training.runtime import log
from ..config import RMConfig
from ..setup import build_model, load_pairs
from ..trunk_cache import TrunkCache
from .config import CompareConfig


@dataclass
class EvalSet:
    """A held-out set: its name, encoded pairs and their cached trunk."""

    name: str
    pairs: list[EncodedPair]
    cache: TrunkCache


@dataclass
class SharedInputs:
    """The training pairs with their truncation counts and cached trunk, the eval sets, the pad id, the device and
    the autocast dtype."""

    train: list[EncodedPair]
    stats: TruncationStats
    train_cache: TrunkCache
    eval_sets: list[EvalSet]
    pad_token_id: int
    device: torch.device
    amp_dtype: torch.dtype | None
    train_fingerprint: str  # the training pairs' content (:func:`aam_fast.data.pairs_fingerprint`)


def _eval_pairs(cfg: CompareConfig, dev_pairs: list) -> list[tuple[str, list]]:
    """``(name, pairs)`` of every eval set: each ``--eval-data`` file (named by its file name), else the dev split."""
    if not cfg.eval_data:
        return [("dev", dev_pairs)] if dev_pairs else []
    return load_eval_sets(
        cfg.eval_data, subset_field=cfg.subset_field, skip_invalid=cfg.skip_invalid, **cfg.column_keys()
    )


def trunk_bytes(pair_sets: Sequence[Sequence[EncodedPair]], hidden_size: int, itemsize: int) -> int:
    """Bytes the cached trunk takes: one ``hidden_size`` vector of ``itemsize`` bytes per token of every sequence."""
    tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for pairs in pair_sets for p in pairs)
    return tokens * hidden_size * itemsize


def check_trunk_budget(cfg: CompareConfig, pair_sets, model: RewardModel, amp_dtype: torch.dtype | None) -> int:
    """The cached trunk's size in bytes; ValueError naming ``--trunk-memory-gb`` when it exceeds the budget in memory,
    or naming ``--trunk-dir`` when that folder's disk lacks the space."""
    hidden = model.lm.config.get_text_config().hidden_size
    itemsize = (amp_dtype or next(model.parameters()).dtype).itemsize
    size = trunk_bytes(pair_sets, hidden, itemsize)
    what = (
        f"{size / 1e9:.2f} GB ({sum(len(s) for s in pair_sets)} pairs x their tokens x hidden {hidden} x {itemsize} B)"
    )
    if cfg.trunk_dir is not None:
        folder = Path(cfg.trunk_dir)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if size > free:
            raise ValueError(f"--trunk-dir {folder}: the cached trunk needs {what}, the disk has {free / 1e9:.2f} GB")
    elif size > cfg.trunk_memory_gb * 1e9:
        raise ValueError(
            f"--trunk-memory-gb {cfg.trunk_memory_gb}: the cached trunk would take {what}; raise the budget, keep it "
            "on disk with --trunk-dir, or lower --max-pairs / --max-length"
        )
    return size


def prepare_inputs(run: Launch, cfg: CompareConfig, first: RMConfig, needs_reference: bool) -> SharedInputs:
    """Load and encode the data with ``first``'s settings, then run the frozen trunk once over every training and
    eval sequence (and the frozen reference over the training ones when ``needs_reference``), on ``run``'s device
    and in its compute dtype."""
    device, amp_dtype = run.device, run.amp_dtype
    model, tokenizer = build_model(first, device)
    pad_token_id = choose_pad_token_id(tokenizer)
    train_pairs, dev_pairs = load_pairs(first)
    if "fixed" in cfg.margins and any(p.margin is None for p in train_pairs):
        raise ValueError(f"--margins fixed needs a {cfg.margin_key!r} field in every training pair")
    eval_raw = _eval_pairs(cfg, dev_pairs)
    encoder = PairEncoder(tokenizer, cfg.max_length)
    options = {"num_proc": cfg.num_proc, "cache": cfg.tokenize_cache, "progress": cfg.progress}
    train, stats = encode_pairs(train_pairs, encoder, **options)
    encoded_sets = [(name, encode_pairs(pairs, encoder, **options)[0]) for name, pairs in eval_raw]
    fingerprint = pairs_fingerprint(train_pairs, encoder)
    size = check_trunk_budget(cfg, [train] + [pairs for _, pairs in encoded_sets], model, amp_dtype)
    log(
        f"data: {len(train)} train pairs; eval sets "
        + (", ".join(f"{name} {len(pairs)}" for name, pairs in encoded_sets) or "none")
        + f"; {stats.describe()}; cached trunk {size / 1e6:.1f} MB "
        + ("in memory" if cfg.trunk_dir is None else f"in files under {cfg.trunk_dir}")
    )
    reference = make_reference(model, cfg) if needs_reference else None
    caching = dict(
        batch_size=cfg.eval_batch_size,
        device=device,
        autocast_dtype=amp_dtype,
        progress=cfg.progress,
        spill_dir=cfg.trunk_dir,
    )
    train_cache = TrunkCache(model, train, pad_token_id, reference=reference, backend=cfg.backend, **caching)
    eval_sets = [
        EvalSet(name, pairs, TrunkCache(model, pairs, pad_token_id, **caching)) for name, pairs in encoded_sets
    ]
    return SharedInputs(train, stats, train_cache, eval_sets, pad_token_id, device, amp_dtype, fingerprint)
