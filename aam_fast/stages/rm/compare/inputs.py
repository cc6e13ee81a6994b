"""What every variant of ``aam-fast compare`` shares, computed once: the encoded training pairs and eval sets, the
PR reference's log-probs of the training pairs when a variant needs them, and either the frozen trunk's output of
every sequence (``--trainable-layers`` without LoRA: a variant is scored from that cached trunk by
:func:`~aam_fast.stages.rm.evaluate.score_pairs`) or the one model every variant trains in turn
(:mod:`.shared_model`)."""

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
from ..reference_logps import ReferenceLogps
from ..setup import build_model, load_pairs
from ..trunk_cache import TrunkCache
from .config import CompareConfig
from .shared_model import SharedModel, shared_reference_logps, widest_config


@dataclass
class EvalSet:
    """A held-out set: its name, encoded pairs and their cached trunk (None when the whole model trains)."""

    name: str
    pairs: list[EncodedPair]
    cache: TrunkCache | None


@dataclass
class SharedInputs:
    """The training pairs with their truncation counts, the eval sets, the pad id, the device and the autocast
    dtype; and either the training pairs' cached trunk (which holds the reference log-probs) or the shared model
    with the reference log-probs beside it."""

    train: list[EncodedPair]
    stats: TruncationStats
    eval_sets: list[EvalSet]
    pad_token_id: int
    device: torch.device
    amp_dtype: torch.dtype | None
    train_fingerprint: str  # the training pairs' content (:func:`aam_fast.data.pairs_fingerprint`)
    train_cache: TrunkCache | None = None
    model: SharedModel | None = None
    reference_logps: ReferenceLogps | None = None


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


def prepare_inputs(run: Launch, cfg: CompareConfig, configs: list[RMConfig]) -> SharedInputs:
    """Load and encode the data once with the variants' settings (``configs``), on ``run``'s device and in its
    compute dtype; then, where ``cfg`` caches the trunk, run it once over every training and eval sequence (and the
    frozen reference over the training ones when a variant needs it), else build the shared model and compute the
    reference log-probs once from it."""
    device, amp_dtype = run.device, run.amp_dtype
    first = widest_config(configs)
    model, tokenizer = build_model(first, device)
    pad_token_id = choose_pad_token_id(tokenizer)
    train_pairs, dev_pairs = load_pairs(configs[0])
    if "fixed" in cfg.margins and any(p.margin is None for p in train_pairs):
        raise ValueError(f"--margins fixed needs a {cfg.margin_key!r} field in every training pair")
    eval_raw = _eval_pairs(cfg, dev_pairs)
    encoder = PairEncoder(tokenizer, cfg.max_length)
    options = {"num_proc": cfg.num_proc, "cache": cfg.tokenize_cache, "progress": cfg.progress}
    train, stats = encode_pairs(train_pairs, encoder, **options)
    encoded_sets = [(name, encode_pairs(pairs, encoder, **options)[0]) for name, pairs in eval_raw]
    fingerprint = pairs_fingerprint(train_pairs, encoder)
    described = (
        f"data: {len(train)} train pairs; eval sets "
        + (", ".join(f"{name} {len(pairs)}" for name, pairs in encoded_sets) or "none")
        + f"; {stats.describe()}"
    )
    needs_reference = any(c.needs_reference for c in configs)
    shared = SharedInputs(train, stats, [], pad_token_id, device, amp_dtype, fingerprint)
    if not cfg.caches_trunk:
        log(described + "; every variant trains the whole model in turn")
        if needs_reference:
            shared.reference_logps = shared_reference_logps(run, first, model, train, pad_token_id)
        shared.model = SharedModel(model, tokenizer)
        shared.eval_sets = [EvalSet(name, pairs, None) for name, pairs in encoded_sets]
        return shared
    size = check_trunk_budget(cfg, [train] + [pairs for _, pairs in encoded_sets], model, amp_dtype)
    where = "in memory" if cfg.trunk_dir is None else f"in files under {cfg.trunk_dir}"
    log(described + f"; cached trunk {size / 1e6:.1f} MB {where}")
    reference = make_reference(model, first) if needs_reference else None
    caching = dict(
        batch_size=cfg.eval_batch_size,
        device=device,
        autocast_dtype=amp_dtype,
        progress=cfg.progress,
        spill_dir=cfg.trunk_dir,
    )
    shared.train_cache = TrunkCache(model, train, pad_token_id, reference=reference, backend=cfg.backend, **caching)
    shared.eval_sets = [
        EvalSet(name, pairs, TrunkCache(model, pairs, pad_token_id, **caching)) for name, pairs in encoded_sets
    ]
    return shared
