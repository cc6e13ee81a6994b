"""Sampling that does not depend on how a rollout is split over ranks: every completion draws from its own seed.

:func:`completion_seed` names the seed of completion ``g`` of the prompt at global position ``p`` of the rollout
made at step ``s``; :class:`RowSeededSampler` draws each row from its seed only (Gumbel-max with a counter-based
hash), so ``N`` ranks sampling their slices produce what one process sampling the whole batch does. Both samplers
serve the shared-prefix loop (:mod:`.generation`, ``draw``); the row-seeded one also ``generate`` (as a logits
processor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def completion_seed(seed: int, step: int, position: int, generation: int) -> int:
    """The sampling seed of completion ``generation`` of the prompt at global ``position`` of the rollout made at
    optimizer step ``step`` (63 bits)."""
    high, low = np.random.SeedSequence([seed, step, position, generation]).generate_state(2)
    return (int(high) & 0x7FFFFFFF) << 32 | int(low)


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping multiplication): a counter-based hash."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def logits_warpers(generation_config) -> list:
    """The temperature, top-k and top-p warpers of ``generation_config``, in the order ``generate`` applies them."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if generation_config.temperature not in (None, 1.0):
        warpers.append(TemperatureLogitsWarper(generation_config.temperature))
    if generation_config.top_k:
        warpers.append(TopKLogitsWarper(generation_config.top_k))
    if generation_config.top_p is not None and generation_config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(generation_config.top_p))
    return warpers


class MultinomialSampler:
    """Draws the next token of every row from the global torch RNG as ``generate`` does (the warpers, a softmax and
    one ``torch.multinomial`` call per step), so that a loop using it draws what ``generate`` draws."""

    def __init__(self, generation_config):
        self.warpers = logits_warpers(generation_config)

    def draw(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """``[n]`` token ids from float32 ``scores [n, V]`` (``step`` is unused: the RNG state carries it)."""
        for warper in self.warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


class RowSeededSampler:
    """Samples every row from its own seed: token ``t`` of row ``r`` is ``argmax(log p_warped + Gumbel(hash(seed_r,
    t, vocab)))``, an exact draw from the temperature/top-k/top-p distribution (the Gumbel-max trick) that depends
    on the row's seed, step and logits only, not on the other rows of the batch nor on any RNG state.

    :meth:`draw` gives the token ids (the shared-prefix loop of :mod:`.generation` calls it); as a ``generate``
    logits processor (``__call__``) it returns a one-hot score row (0 at the draw, -inf elsewhere), so the warpers
    and the multinomial draw that ``generate`` applies after it keep exactly that token."""

    def __init__(self, row_seeds: Sequence[int], prompt_width: int, generation_config):
        self.seeds = torch.tensor([_signed(int(s)) for s in row_seeds], dtype=torch.long)
        self.prompt_width = prompt_width
        self.warpers = logits_warpers(generation_config)

    def draw(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """``[n]`` token ids of completion position ``step`` from float32 ``scores [n, V]``."""
        for warper in self.warpers:
            scores = warper(None, scores)
        if self.seeds.device != scores.device:  # once, not at every token
            self.seeds = self.seeds.to(scores.device)
        seeds = self.seeds
        row_keys = _splitmix64(seeds ^ _splitmix64(torch.full_like(seeds, _signed(step * 0x9E3779B97F4A7C15 + 1))))
        vocab = torch.arange(scores.shape[1], device=scores.device, dtype=torch.long)
        bits = _splitmix64(row_keys[:, None] + (vocab[None, :] + 1) * _GOLDEN)
        # 24-bit uniforms in (0, 1): float32 Gumbels, truncated only where their CDF is below 3e-8 or above 1 - 3e-8
        uniform = (_shift_right(bits, 40).float() + 0.5) * 2.0**-24
        gumbel = -torch.log(-torch.log(uniform))
        return (torch.log_softmax(scores.float(), dim=-1) + gumbel).argmax(dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.draw(scores, input_ids.shape[1] - self.prompt_width)
        one_hot = torch.full_like(scores, -math.inf)
        return one_hot.scatter_(1, chosen[:, None], 0.0)
