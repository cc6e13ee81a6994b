"""Padding-free ("packed") batches: the ``n`` sequences of a padded batch concatenated into one row.

``add_packing(batch)`` adds to a padded batch (``input_ids``/``attention_mask`` ``[n, T]``; each row's attended
tokens one contiguous block: right padding as in train-rm, left padding, or both as GRPO's
``[left-padded prompt; completion; padding after EOS]`` rows):

- ``packed_input_ids [1, N]`` with ``N = Σ lengths`` (no padding token is ever computed on);
- ``packed_position_ids [1, N]`` restarting at 0 for every sequence (as ``attention_mask.cumsum(-1) - 1`` numbers
  the attended tokens of a padded row);
- ``cu_seq_lens [n + 1]`` int32 cumulative lengths (flash-attn's varlen convention), ``max_seq_len``, and
  ``packed_starts [n]``, the column of each row's first attended token.

The backbone runs on the packed row with no attention mask: ``position_ids`` restart per sequence (rotary
positions as in the padded batch) and ``cu_seq_lens`` go to the attention, which :func:`use_packed_attention` makes
flash-attn 2's varlen kernels on CUDA when ``flash_attn`` is installed and otherwise SDPA run on each sequence's own
block (``Σ Lᵢ²`` attention, never ``N²``). Each sequence therefore sees exactly the tokens it sees in the padded
batch, with the same positions, so rewards (score head at each sequence's last token) and log-probs equal the padded
ones. :func:`padded_columns` reads the hidden states back at columns of the padded layout (zeros where a row has no
token, which the losses ignore through ``-100`` targets), so the losses run unchanged on the padded layout; the
saving is the backbone's compute on padding.
"""

from __future__ import annotations

import importlib.util
import itertools

import torch
from torch import nn

from .reward_model import RewardOutput


def add_packing(batch: dict) -> dict:
    """Add the packed fields (see the module docstring) to a padded batch in place; returns it. ValueError when a
    row has no attended token or a gap inside its attended tokens."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError("attention_mask has a row without any attended token")
    starts = mask.int().argmax(-1)
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    positions = columns - starts[:, None]
    if not torch.equal(mask, (positions >= 0) & (positions < lengths[:, None])):
        raise ValueError("packing needs each row's attended tokens in one block (attention_mask 0..0 1..1 0..0)")
    batch["packed_input_ids"] = batch["input_ids"][mask].unsqueeze(0)
    batch["packed_position_ids"] = positions[mask].unsqueeze(0)
    batch["cu_seq_lens"] = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch["max_seq_len"] = int(lengths.max())
    batch["packed_starts"] = starts
    return batch


def unpack(packed: torch.Tensor, cu_seq_lens: torch.Tensor, length: int, shift: torch.Tensor | None = None):
    """``packed [N, ...]`` (sequences back to back) -> ``out [n, length, ...]`` with ``out[i, j]`` token
    ``j + shift[i]`` of sequence ``i`` (``shift`` 0 by default: right padding), zero where that token does not
    exist; differentiable (a gather)."""
    device = packed.device
    starts = cu_seq_lens[:-1].long().to(device)
    lengths = cu_seq_lens.diff().long().to(device)
    index = torch.arange(length, device=device)[None, :]
    if shift is not None:
        index = index + shift.long().to(device)[:, None]
    valid = (index >= 0) & (index < lengths[:, None])
    out = packed[(starts[:, None] + index).clamp(0, packed.shape[0] - 1)]
    return out * valid.view(*valid.shape, *([1] * (packed.dim() - 1))).to(out.dtype)


def padded_columns(packed: torch.Tensor, batch: dict, first: int, width: int) -> torch.Tensor:
    """The values ``packed [N, ...]`` of an :func:`add_packing` batch at columns ``first .. first + width - 1`` of
    its padded layout: ``[n, width, ...]``, zero at padding; differentiable."""
    shift = first - batch["packed_starts"]
    return unpack(packed, batch["cu_seq_lens"], width, shift)


VARLEN_SDPA = "aam_varlen_sdpa"


def _varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An attention function for transformers' ``AttentionInterface``: with ``cu_seq_lens_q`` (a packed row), causal
    SDPA on each sequence's own block, so compute is ``Σ Lᵢ²`` and no ``N × N`` mask exists; without it (a padded
    batch) exactly transformers' SDPA attention. Returns ``[B, T, H, d]`` as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: repeat the key/value heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    dropout = dropout if module.training else 0.0
    bounds = cu.tolist()
    blocks = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, is_causal=True, scale=scaling
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None


def _register_varlen_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)  # padded batches keep SDPA's mask


def _attention(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", ""))


def use_packed_attention(model: nn.Module) -> str:
    """Give ``model`` (a transformers model) an attention that keeps packed sequences apart without an ``N × N``
    mask: flash-attn 2's varlen kernels when flash_attn is installed and the model is on CUDA, else the per-sequence
    SDPA of :func:`_varlen_sdpa_attention` (plain SDPA for padded batches). Returns the implementation's name."""
    current = _attention(model)
    if current.startswith("flash_attention") or current == VARLEN_SDPA:
        return current
    on_cuda = next(model.parameters()).device.type == "cuda"
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        try:
            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except Exception:  # an architecture or dtype flash-attn does not take: per-sequence SDPA
            pass
    _register_varlen_sdpa()
    model.set_attn_implementation(VARLEN_SDPA)
    return VARLEN_SDPA


def packed_hidden(backbone: nn.Module, batch: dict) -> torch.Tensor:
    """Final hidden states ``[N, D]`` of the packed row through ``backbone`` (no attention mask: the boundaries
    go to the attention as ``cu_seq_lens``, and as restarting ``position_ids`` to the rotary embedding)."""
    use_packed_attention(backbone)
    cu = batch["cu_seq_lens"].to(batch["packed_input_ids"].device)
    out = backbone(
        input_ids=batch["packed_input_ids"],
        position_ids=batch["packed_position_ids"],
        use_cache=False,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=batch["max_seq_len"],
        max_length_k=batch["max_seq_len"],
    )
    return out.last_hidden_state[0]


def packed_reward_forward(model: nn.Module, batch: dict, *, reference: nn.Module | None = None) -> RewardOutput:
    """:class:`~aam_fast.modeling.RewardModel`'s forward on a packed batch: rewards ``[n]`` from the score head at
    each sequence's last token, final hidden states unpacked to ``[n, T, D]`` (T the padded batch's length), and
    with a full-backbone ``reference`` its hidden states likewise (computed without gradient)."""
    if "packed_input_ids" not in batch:
        raise ValueError("batch has no packed fields: call add_packing(batch) first")
    if reference is not None and getattr(reference, "top_only", False):
        raise ValueError("packing does not support a top-layers-only reference (trainable_layers with PR margins)")
    length = batch["input_ids"].shape[1]
    hidden = packed_hidden(model.backbone, batch)
    last = hidden[batch["cu_seq_lens"][1:].long() - 1]
    rewards = model.score(last.to(model.score.weight.dtype)).squeeze(-1).float()
    ref_hidden = None
    if reference is not None:
        with torch.no_grad(), reference.running():
            ref_hidden = padded_columns(packed_hidden(reference.backbone, batch), batch, 0, length)
    return RewardOutput(rewards, padded_columns(hidden, batch, 0, length), ref_hidden)
