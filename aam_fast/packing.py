"""Padding-free ("packed") batches: the ``n`` sequences of a right-padded batch concatenated into one row.

``add_packing(batch)`` adds to a padded batch (``input_ids``/``attention_mask`` ``[n, T]``, right padding):

- ``packed_input_ids [1, N]`` with ``N = Σ lengths`` (no padding token is ever computed on);
- ``packed_position_ids [1, N]`` restarting at 0 for every sequence;
- ``cu_seq_lens [n + 1]`` int32 cumulative lengths (flash-attn's varlen convention), ``max_seq_len``.

The backbone runs on the packed row with ``position_ids`` and no attention mask: transformers reads the sequence
boundaries from the restarting positions (a block-diagonal causal mask for SDPA/eager, ``cu_seq_lens`` varlen
kernels for flash-attn, which :func:`use_flash_attention` selects on CUDA when ``flash_attn`` is installed). Each
sequence therefore sees exactly the tokens it sees in the padded batch, with the same positions, so rewards
(score head at each sequence's last token) and log-probs equal the padded ones. The hidden states are scattered
back to ``[n, T, D]`` (zeros at padding, which the losses ignore through ``-100`` targets), so the losses run
unchanged on the padded layout; the saving is the backbone's compute on padding.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .models import RewardOutput


def add_packing(batch: dict) -> dict:
    """Add the packed fields (see the module docstring) to a right-padded batch in place; returns it."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("attention_mask has a row without any attended token")
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    if not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("packing needs right-padded rows (attention_mask ones then zeros)")
    batch["packed_input_ids"] = batch["input_ids"][mask].unsqueeze(0)
    batch["packed_position_ids"] = positions[mask].unsqueeze(0)
    batch["cu_seq_lens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch["max_seq_len"] = int(lengths.max())
    return batch


def unpack(packed: torch.Tensor, cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """``packed [N, ...]`` (one row, sequences back to back) -> ``[n, length, ...]`` right-padded with zeros;
    differentiable (a gather)."""
    starts = cu_seq_lens[:-1].long()
    lengths = cu_seq_lens.diff().long()
    positions = torch.arange(length, device=packed.device)
    valid = positions[None, :] < lengths[:, None].to(packed.device)
    index = (starts[:, None].to(packed.device) + positions[None, :]).clamp(max=packed.shape[0] - 1)
    out = packed[index]
    return out * valid.view(*valid.shape, *([1] * (packed.dim() - 1))).to(out.dtype)


def use_flash_attention(lm: nn.Module) -> bool:
    """Switch ``lm`` to flash-attn 2 (varlen kernels for packed rows) when flash_attn is installed and the model
    is on CUDA; True when it runs flash-attn. Otherwise SDPA with the block-diagonal mask is kept."""
    config = lm.config
    if str(getattr(config, "_attn_implementation", "")).startswith("flash_attention"):
        return True
    if importlib.util.find_spec("flash_attn") is None or next(lm.parameters()).device.type != "cuda":
        return False
    try:
        lm.set_attn_implementation("flash_attention_2")
    except Exception:  # an architecture or dtype flash-attn does not take: keep SDPA
        return False
    return True


def _flash_kwargs(lm: nn.Module, batch: dict) -> dict:
    if not str(getattr(lm.config, "_attn_implementation", "")).startswith("flash_attention"):
        return {}
    cu = batch["cu_seq_lens"].to(batch["packed_input_ids"].device)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": batch["max_seq_len"],
        "max_length_k": batch["max_seq_len"],
    }


def packed_hidden(backbone: nn.Module, lm: nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states ``[N, D]`` of the packed row through ``backbone`` (no attention mask: the boundaries
    come from the restarting ``position_ids`` or flash-attn's ``cu_seq_lens``)."""
    out = backbone(
        input_ids=batch["packed_input_ids"],
        position_ids=batch["packed_position_ids"],
        use_cache=False,
        **_flash_kwargs(lm, batch),
    )
    return out.last_hidden_state[0]


def packed_reward_forward(model: nn.Module, batch: dict, *, reference: nn.Module | None = None) -> RewardOutput:
    """:class:`~aam_fast.models.RewardModel`'s forward on a packed batch: rewards ``[n]`` from the score head at
    each sequence's last token, final hidden states unpacked to ``[n, T, D]`` (T the padded batch's length), and
    with a full-backbone ``reference`` its hidden states likewise (computed without gradient)."""
    if "packed_input_ids" not in batch:
        raise ValueError("batch has no packed fields: call add_packing(batch) first")
    if reference is not None and getattr(reference, "top_only", False):
        raise ValueError("packing does not support a top-layers-only reference (trainable_layers with PR margins)")
    length = batch["input_ids"].shape[1]
    cu = batch["cu_seq_lens"]
    hidden = packed_hidden(model.backbone, model.lm, batch)
    last = hidden[cu[1:].long() - 1]
    rewards = model.score(last.to(model.score.weight.dtype)).squeeze(-1).float()
    ref_hidden = None
    if reference is not None:
        with torch.no_grad():
            ref_hidden = unpack(packed_hidden(reference.backbone, model.lm, batch), cu, length)
    return RewardOutput(rewards, unpack(hidden, cu, length), ref_hidden)
