"""What a reward-model run is built from, before its loop: the model and tokenizer, the encoded train and dev pairs
and their truncation counts, the number of steps, and the data order (a function of ``(seed, epoch)``, so the
position in the data is the number of micro-batches consumed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...data import EncodedPair, PairEncoder, TruncationStats, encode_pairs, load_train_dev, pairs_fingerprint
from ...modeling import (
    RewardModel,
    add_configured_lora,
    check_exportable,
    check_positions,
    disable_dropout,
    enable_checkpointing,
    is_reward_model_dir,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from ...training.config import STEPS_MAX
from ...training.runtime import log
from .config import RMConfig


def build_model(cfg: RMConfig, device: torch.device) -> tuple[RewardModel, Any]:
    """The reward model (float32 master weights, dropout off, LoRA and checkpointing as ``cfg`` asks) and its
    tokenizer, from a causal LM or a saved reward model."""
    if is_reward_model_dir(cfg.model):
        model, tokenizer, _ = load_reward_model(
            cfg.model, trainable_layers=cfg.trainable_layers, train_lm_head=cfg.trains_lm_head, **cfg.load_kwargs()
        )
    else:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        lm = load_causal_lm(cfg.model, **cfg.load_kwargs())
        check_exportable(lm.config, f"--model {cfg.model}")
        model = RewardModel(lm, trainable_layers=cfg.trainable_layers, train_lm_head=cfg.trains_lm_head)
    disable_dropout(model)
    add_configured_lora(cfg, model.lm, model.backbone)  # after disable_dropout: --lora-dropout applies
    if cfg.gradient_checkpointing:
        enable_checkpointing(model.lm)
    check_positions(model.lm.config, cfg.max_length, f"--max-length {cfg.max_length}")
    return model.to(device), tokenizer


def load_pairs(cfg: RMConfig) -> tuple[list, list]:
    """``(train, dev)`` preference pairs of ``cfg`` (:func:`aam_fast.data.load_train_dev`)."""
    return load_train_dev(
        cfg.data,
        eval_source=cfg.eval_data,
        dev_fraction=cfg.dev_fraction,
        margin=cfg.margin,
        split=cfg.data_split,
        subset_field=cfg.subset_field,
        skip_invalid=cfg.skip_invalid,
        limit=cfg.max_pairs,
        **cfg.column_keys(),
    )


@dataclass
class EncodedData:
    """The run's encoded training and dev pairs, the training pairs' truncation counts and the content
    fingerprints of both (:func:`aam_fast.data.pairs_fingerprint`: the run's identity)."""

    train: list[EncodedPair]
    dev: list[EncodedPair]
    stats: TruncationStats
    train_fingerprint: str
    dev_fingerprint: str


def encode_data(cfg: RMConfig, tokenizer, progress: bool) -> EncodedData:
    """Load and encode (cached by fingerprint) the run's pairs; logs their counts and truncation."""
    train_pairs, dev_pairs = load_pairs(cfg)
    encoder = PairEncoder(tokenizer, cfg.max_length)
    options = {"num_proc": cfg.num_proc, "cache": cfg.tokenize_cache, "progress": progress}
    train, stats = encode_pairs(train_pairs, encoder, **options)
    dev, _ = encode_pairs(dev_pairs, encoder, **options)
    log(f"data: {len(train)} train / {len(dev)} dev pairs; {stats.describe()}")
    fingerprints = pairs_fingerprint(train_pairs, encoder), pairs_fingerprint(dev_pairs, encoder)
    return EncodedData(train, dev, stats, *fingerprints)


def count_steps(cfg: RMConfig, n_pairs: int, global_batch: int) -> tuple[int, int]:
    """``(micro-batches per epoch, optimizer steps)`` of ``n_pairs`` training pairs in global micro-batches of
    ``global_batch`` (``--max-steps``, else ``--epochs`` passes); ValueError when not one micro-batch fits or the
    epochs give more steps than ``--max-steps`` may."""
    if n_pairs < global_batch:
        raise ValueError(f"{n_pairs} training pairs is fewer than --batch-size x ranks {global_batch}")
    per_epoch = n_pairs // global_batch
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    if steps > STEPS_MAX:
        raise ValueError(f"--epochs {cfg.epochs:g} gives {steps} optimizer steps, more than {STEPS_MAX}")
    return per_epoch, steps


def micro_batch_indices(n_pairs: int, batch_size: int, seed: int, index: int) -> tuple[int, list[int]]:
    """``(epoch, pair indices)`` of global micro-batch ``index``: epoch ``e`` visits the pairs in the order of a
    permutation seeded by ``(seed, e)``, in full batches (the ragged tail of an epoch is dropped)."""
    per_epoch = n_pairs // batch_size
    epoch, position = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator)
    return epoch, order[position * batch_size : (position + 1) * batch_size].tolist()


def pairs_visited(n_pairs: int, batch_size: int, seed: int, micro_batches: int) -> list[int]:
    """The indices of the pairs that global micro-batches ``0 .. micro_batches - 1`` visit, ascending."""
    per_epoch = n_pairs // batch_size
    if micro_batches >= per_epoch:  # a whole epoch: every pair but the epoch's dropped tail, so take them all
        return list(range(n_pairs))
    generator = torch.Generator().manual_seed(seed * 1_000_003)
    return sorted(torch.randperm(n_pairs, generator=generator)[: micro_batches * batch_size].tolist())
