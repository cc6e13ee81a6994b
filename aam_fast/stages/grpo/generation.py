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


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers a left-padded batch: attended tokens from 0, padding 0."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def new_cache(config):
    """An empty ``DynamicCache`` for a model of ``config``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers before 4.56 builds it without the config
        return DynamicCache()


def cache_keyword(backbone) -> str:
    """The keyword a transformers backbone takes its KV cache by (``cache`` in recent releases)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


class SharedPrefill:
    """The backbone of ``model`` run once on P prompts, its KV cache and last hidden state repeated ``copies``
    times along the batch (row ``p·copies + g`` continues prompt ``p``): what P·copies identical rows would give."""

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, copies: int):
        self.backbone = model.base_model
        self.keyword = cache_keyword(self.backbone)
        self.cache = new_cache(model.config)
        positions = generation_positions(prompt_mask)
        out = self.forward(prompt_ids, prompt_mask, positions)
        self.cache.batch_repeat_interleave(copies)
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

    def extend(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append ``input_ids [n, k]`` (attended, positions following on) to every row; their hidden states."""
        width = input_ids.shape[1]
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], width))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        positions = self.next_position + torch.arange(width, device=input_ids.device)
        self.next_position = positions[:, -1:] + 1
        return self.forward(input_ids, self.attention_mask, positions)


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
    prefill = SharedPrefill(model, prompt_ids, prompt_mask, copies)
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
