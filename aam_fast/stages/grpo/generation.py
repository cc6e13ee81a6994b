"""G completions per prompt with one prefill per prompt: the prompt's KV cache is computed once and shared.

``generate`` on G copies of every prompt runs each prompt's prefill G times. :func:`sample_completions` runs the
backbone once on the P distinct left-padded prompts, repeats the KV cache G times along the batch
(``Cache.batch_repeat_interleave``) and the last hidden state likewise, then decodes the P·G rows token by token as
``generate`` does: positions numbered by the attention mask, the LM head on the last hidden state, float32 scores,
one token per row from the sampler (:mod:`.sampling`), rows past their EOS fed the pad token, the attention mask
extended by ones, a stop when every row has its EOS or after ``max_new_tokens``.

Identity with ``generate`` on copies: every decode step gets the inputs ``generate``'s step gets (the same P·G
rows), so the completions are the same as soon as the prefill's outputs are. On the CPU in float32 the backbone's
rows do not depend on how many rows the batch holds, so the cache and last hidden state of P rows, repeated, are
bitwise those of the P·G copies (tests/test_rollouts.py checks it); the LM head runs after the repeat, on the
``[P·G, 1, D]`` that ``generate``'s head multiplies, because its matmul on P rows rounds differently (up to 5e-5 on
SmolLM2-135M's logits, measured). Where kernels choose their algorithm by shape (cuBLAS), the prefill may differ
in the last bits, and a draw on a near tie with it: the distribution is the same.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers a left-padded batch: attended tokens from 0, padding 0."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class ReservedCache(DynamicCache):
    """A ``DynamicCache`` that, after :meth:`reserve`, writes each step's keys and values into room allocated once
    instead of concatenating (which copies the whole cache at every token): attention gets views of the filled
    part, the same values as the plain cache's (the logits are bitwise the same, measured on SmolLM2-135M; the
    completions are tested). Without per-layer tensors (transformers before 4.56) it stays a plain cache."""

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens in every full-attention layer (call once the cache holds its
        prompt); sliding-window layers, which drop old tokens, keep concatenating."""
        from transformers.cache_utils import DynamicLayer

        self.room = []
        for layer in getattr(self, "layers", []):
            if type(layer) is not DynamicLayer or not layer.is_initialized:
                self.room.append(None)
                continue
            keys, values = layer.keys, layer.values
            room_keys = keys.new_empty(*keys.shape[:2], keys.shape[2] + extra, keys.shape[3])
            room_values = values.new_empty(*values.shape[:2], values.shape[2] + extra, values.shape[3])
            room_keys[:, :, : keys.shape[2]] = keys
            room_values[:, :, : values.shape[2]] = values
            layer.keys, layer.values = room_keys[:, :, : keys.shape[2]], room_values[:, :, : values.shape[2]]
            self.room.append((room_keys, room_values))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rooms = getattr(self, "room", [])
        room = rooms[layer_idx] if layer_idx < len(rooms) else None
        if room is not None:
            layer = self.layers[layer_idx]
            length = layer.keys.shape[2]
            end = length + key_states.shape[2]
            if end <= room[0].shape[2]:
                room[0][:, :, length:end] = key_states
                room[1][:, :, length:end] = value_states
                layer.keys, layer.values = room[0][:, :, :end], room[1][:, :, :end]
                return layer.keys, layer.values
            rooms[layer_idx] = None  # past the room: concatenate from here on
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def new_cache(config) -> ReservedCache:
    """An empty cache for a model of ``config``."""
    try:
        return ReservedCache(config=config)
    except TypeError:  # transformers before 4.56 builds it without the config
        return ReservedCache()


def cache_keyword(backbone) -> str:
    """The keyword a transformers backbone takes its KV cache by (``cache`` in recent releases)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


class SharedPrefill:
    """The backbone of ``model`` run once on P prompts, its KV cache and last hidden state repeated ``copies``
    times along the batch (row ``p·copies + g`` continues prompt ``p``): what P·copies identical rows would give;
    ``reserve``: room for that many more tokens per row (:class:`ReservedCache`)."""

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, copies: int, reserve: int = 0):
        self.backbone = model.base_model
        self.keyword = cache_keyword(self.backbone)
        self.cache = new_cache(model.config)
        positions = generation_positions(prompt_mask)
        out = self.forward(prompt_ids, prompt_mask, positions)
        self.cache.batch_repeat_interleave(copies)
        if reserve:
            self.cache.reserve(reserve)
        self.last_hidden = out[:, -1:].repeat_interleave(copies, dim=0)  # [P·copies, 1, D]
        self.attention_mask = prompt_mask.repeat_interleave(copies, dim=0)
        self.next_position = positions[:, -1:].repeat_interleave(copies, dim=0) + 1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """The backbone's last hidden states for ``input_ids`` after what the cache holds (which it extends);
        ``attention_mask`` covers the cached tokens and these."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.keyword: self.cache},
        )
        return out.last_hidden_state

    def extend(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``input_ids [n, k]`` to every row (attended where ``attention_mask [n, k]`` says, all by default;
        positions following on); their last hidden states ``[n, k, D]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.attention_mask = torch.cat([self.attention_mask, attention_mask.to(self.attention_mask.dtype)], dim=1)
        positions = self.next_position + torch.arange(input_ids.shape[1], device=input_ids.device)
        self.next_position = positions[:, -1:] + 1
        return self.forward(input_ids, self.attention_mask, positions)


def shared_prefix_hidden(model, input_ids, attention_mask, prompt_len: int, copies: int) -> torch.Tensor:
    """``completion_hidden``'s final hidden states ``[n, C, D]`` (the positions that predict the C completion
    tokens) with each group of ``copies`` rows' common prompt run once: the prompt's last hidden state repeated, then
    the completion tokens but the last one on the repeated cache. ValueError when a group's prompts differ."""
    prompt_ids, prompt_mask = input_ids[::copies, :prompt_len], attention_mask[::copies, :prompt_len]
    if not torch.equal(prompt_ids.repeat_interleave(copies, dim=0), input_ids[:, :prompt_len]):
        raise ValueError(f"the rows of each group of {copies} do not share their prompt")
    prefill = SharedPrefill(model, prompt_ids, prompt_mask, copies)
    if input_ids.shape[1] - prompt_len == 1:
        return prefill.last_hidden
    rest = prefill.extend(input_ids[:, prompt_len:-1], attention_mask[:, prompt_len:-1])
    return torch.cat([prefill.last_hidden, rest], dim=1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    copies: int,
    sampler,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """``[P·copies, C]`` sampled token ids (``C <= max_new_tokens``; the pad token after a row's EOS) for the
    left-padded ``prompt_ids``/``prompt_mask [P, W]``, row ``p·copies + g`` continuing prompt ``p``. ``sampler``
    has ``draw(scores [n, V] float32, step) -> [n]`` (:mod:`.sampling`). Runs under the caller's autocast."""
    head = model.get_output_embeddings()
    prefill = SharedPrefill(model, prompt_ids, prompt_mask, copies, reserve=max_new_tokens - 1)
    hidden = prefill.last_hidden
    eos = torch.tensor(list(eos_ids), device=prompt_ids.device)
    unfinished = torch.ones(hidden.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        scores = head(hidden[:, -1:])[:, -1].float()
        next_ids = torch.where(unfinished, sampler.draw(scores, step), pad_id)
        tokens.append(next_ids)
        unfinished &= ~torch.isin(next_ids, eos)
        if step + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        hidden = prefill.extend(next_ids[:, None])
    return torch.stack(tokens, dim=1)
