"""Score ``(prompt, completion)`` pairs with a saved reward model: GRPO's reward source."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import PairEncoder, Text, choose_pad_token_id, pad_sequences
from .io import load_reward_model
from .packing import add_packing, packed_reward_forward


class RewardScorer:
    """Score ``(prompt, completion)`` pairs with a saved reward model, exactly as ``eval-rm`` does.

    ``prompts[i]`` is a string (standard: ``prompt + completion + eos``) or a message list (conversational: the
    completion becomes an assistant message, rendered by the saved chat template). Sequences are truncated as in
    training (``max_length`` defaults to the one the model was trained with) and scored in batches of
    ``batch_size``, right-padded (``packing``: each batch as one padding-free row, :mod:`aam_fast.modeling.packing`).
    Returns float32 rewards ``[n]`` on CPU. ``load_kwargs`` (``attn_implementation``, ``trust_remote_code``) go to
    ``from_pretrained``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        batch_size: int = 8,
        packing: bool = False,
        **load_kwargs,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.packing = packing
        self.model, self.tokenizer, self.metadata = load_reward_model(
            model_dir, dtype=dtype, device=device, **load_kwargs
        )
        self.model.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pad_token_id = choose_pad_token_id(self.tokenizer)
        self.encoder = PairEncoder(self.tokenizer, max_length or self.metadata.get("max_length"))

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[tuple[list[int], int]]) -> torch.Tensor:
        """Rewards of already tokenised ``(ids, prompt_len)`` sequences, in order (batched by length, as
        ``eval-rm`` batches pairs, to spend little compute on padding)."""
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
        rewards = torch.zeros(len(sequences))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = pad_sequences([sequences[i] for i in indices], self.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.packing:
                out = packed_reward_forward(self.model, add_packing(batch))
            else:
                out = self.model(batch["input_ids"], batch["attention_mask"])
            rewards[indices] = out.rewards.float().cpu()
        return rewards

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
        encoded = [self.encoder.encode_sequence(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_sequences([(e.ids, e.prompt_len) for e in encoded])
