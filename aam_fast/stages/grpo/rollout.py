"""Rollouts: prompts encoded and left-padded, G completions sampled per prompt (each prompt prefilled once and its
KV cache shared over its G completions, :mod:`.generation`; or ``generate`` on G copies), stopped at EOS, a
completion without EOS flagged truncated; their final hidden states and forward-only token log-probs through the
fused op (never full logits), and the endless seeded prompt order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ...data import IGNORE_INDEX, is_conversational, render_conversation
from ...modeling.heads import head_inputs, lm_head_of
from ...modeling.io import check_positions
from ...modeling.packing import add_packing, packed_hidden, padded_columns
from ...ops import linear_logprobs
from ...training.runtime import autocast
from ...training.trainer_state import START_AFRESH
from .generation import sample_completions, shared_prefix_hidden
from .sampling import MultinomialSampler, RowSeededSampler

TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "targets",
    "truncated",
    "rewards",
    "reward_table",
    "advantages",
    "old_logps",
    "ref_logps",
    "left_out",
)
TEXT_FIELDS = ("prompt_len", "prompts", "completions")
# How completions are sampled (generate_micro_batch's ``method``, train-grpo's --generation).
GENERATION_METHODS = ("shared-prefix", "generate")


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of a rollout: ``batch_size`` prompts × G completions, prompts left-padded to ``prompt_len``."""

    input_ids: torch.Tensor  # [n, P + C]
    attention_mask: torch.Tensor  # [n, P + C]
    prompt_len: int
    targets: torch.Tensor  # [n, C] completion ids, IGNORE_INDEX after EOS
    truncated: torch.Tensor  # [n] bool: no EOS within max_new_tokens
    prompts: list  # [n] the prompt records' prompts, each repeated G times
    completions: list[str]
    rewards: torch.Tensor | None = None  # [n] weighted total
    reward_table: torch.Tensor | None = None  # [n, sources], NaN where a source gave None
    advantages: torch.Tensor | None = None  # [n]
    old_logps: torch.Tensor | None = None  # [n, C]
    ref_logps: torch.Tensor | None = None  # [n, C]
    left_out: torch.Tensor | None = None  # [n] bool: an uninformative group dynamic sampling could not replace

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    def loss_targets(self, mask_truncated: bool) -> torch.Tensor:
        """The targets the loss trains on: ``targets`` with the rows ``left_out`` and, with ``mask_truncated``,
        the truncated completions set to IGNORE_INDEX."""
        rows = torch.zeros_like(self.truncated) if self.left_out is None else self.left_out
        if mask_truncated:
            rows = rows | self.truncated
        return torch.where(rows[:, None], torch.full_like(self.targets, IGNORE_INDEX), self.targets)

    def to(self, device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    def split_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors on the CPU, JSON-able rest)``: how a checkpoint stores an unfinished rollout."""
        tensors = {name: getattr(self, name).cpu() for name in TENSOR_FIELDS if getattr(self, name) is not None}
        return tensors, {name: getattr(self, name) for name in TEXT_FIELDS}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], texts: dict, device) -> MicroBatch:
        """Inverse of :meth:`split_state`, the tensors on ``device``."""
        return cls(**{name: value.to(device) for name, value in tensors.items()}, **texts)


def encode_prompt(tokenizer, prompt, max_length: int | None) -> tuple[list[int], bool]:
    """Token ids of a prompt, left-truncated; ``(ids, truncated)``. Tokenised as the reward model's ``PairEncoder``
    does: message lists through the chat template (:mod:`aam_fast.data`'s fallback template where the tokenizer has
    none) with the generation prompt and no extra special tokens; strings with the tokenizer's special tokens."""
    if is_conversational(prompt):
        text = render_conversation(tokenizer, prompt, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _cut_at_eos(completion: torch.Tensor, eos_ids: Sequence[int], pad_id: int):
    """``(completion padded after its first EOS, keep mask [n, C], has_eos [n])``; the EOS token itself is kept
    (it is learned)."""
    width = completion.shape[1]
    is_eos = torch.isin(completion, torch.tensor(list(eos_ids), device=completion.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, width, dtype=torch.long))
    keep = torch.arange(width, device=completion.device)[None, :] <= first_eos[:, None]
    return torch.where(keep, completion, torch.full_like(completion, pad_id)), keep, has_eos


@torch.no_grad()
def generate_micro_batch(
    policy,
    tokenizer,
    records: list[dict],
    cfg,
    generation_config,
    eos_ids,
    dtype=torch.float32,
    row_seeds: Sequence[int] | None = None,
    method: str | None = None,
):
    """Sample G completions for each record; returns ``(MicroBatch, per-sample columns, prompts truncated)``.

    With ``row_seeds`` (one per completion, G per record) each completion is drawn by a :class:`RowSeededSampler`
    from its own seed; otherwise from the global torch RNG, as ``generate`` does. ``method`` (default
    ``cfg.generation``): ``shared-prefix`` prefills each prompt once and shares its KV cache over its G completions
    (:mod:`.generation`); ``generate`` calls ``generate`` on G copies of every prompt. Both draw the same completions
    (bitwise on the CPU in float32)."""
    method = cfg.generation if method is None else method
    if method not in GENERATION_METHODS:
        raise ValueError(f"method must be one of {GENERATION_METHODS}, got {method!r}")
    device = next(policy.parameters()).device
    encoded = [encode_prompt(tokenizer, r["prompt"], cfg.max_prompt_length) for r in records]
    G = cfg.num_generations
    unique_ids, unique_mask = left_pad([ids for ids, _ in encoded], tokenizer.pad_token_id, device)
    if getattr(policy, "config", None) is not None:
        what = f"--max-new-tokens {generation_config.max_new_tokens} after a prompt of {unique_ids.shape[1]} tokens"
        what += f" (--max-prompt-length {cfg.max_prompt_length})"
        check_positions(policy.config, unique_ids.shape[1] + generation_config.max_new_tokens, what)
    prompt_ids, prompt_mask = unique_ids.repeat_interleave(G, dim=0), unique_mask.repeat_interleave(G, dim=0)
    if row_seeds is not None and len(row_seeds) != prompt_ids.shape[0]:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {prompt_ids.shape[0]} completions")
    if row_seeds is None:
        sampler = MultinomialSampler(generation_config)
    else:
        sampler = RowSeededSampler(row_seeds, prompt_ids.shape[1], generation_config)
    with autocast(device, dtype):
        if method == "shared-prefix":
            completion = sample_completions(
                policy,
                unique_ids,
                unique_mask,
                G,
                sampler,
                generation_config.max_new_tokens,
                eos_ids,
                tokenizer.pad_token_id,
            )
        else:
            completion = _generate_on_copies(policy, prompt_ids, prompt_mask, generation_config, sampler, row_seeds)
    prompt_len = prompt_ids.shape[1]
    completion, keep, has_eos = _cut_at_eos(completion, eos_ids, tokenizer.pad_token_id)
    texts = []
    for i in range(completion.shape[0]):
        length = int(keep[i].sum()) - int(has_eos[i])
        texts.append(tokenizer.decode(completion[i, :length].tolist(), skip_special_tokens=True))
    columns = {k: [r[k] for r in records for _ in range(G)] for k in records[0] if k != "prompt"}
    batch = MicroBatch(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, keep.long()], dim=1),
        prompt_len=prompt_len,
        targets=torch.where(keep, completion, torch.full_like(completion, IGNORE_INDEX)),
        truncated=~has_eos,
        prompts=[r["prompt"] for r in records for _ in range(G)],
        completions=texts,
    )
    return batch, columns, sum(t for _, t in encoded)


def _generate_on_copies(policy, prompt_ids, prompt_mask, generation_config, sampler, row_seeds) -> torch.Tensor:
    """``generate`` on the prompt rows as given (G copies of each): the completion columns of its output."""
    extra = {}
    if row_seeds is not None:
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([sampler])
    out = policy.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config, **extra
    )
    return out[:, prompt_ids.shape[1] :]


def completion_hidden(model, input_ids, attention_mask, prompt_len: int, packing: bool = False) -> torch.Tensor:
    """Final (post-norm) hidden states ``[n, C, D]`` at the positions that predict the C completion tokens.

    Runs the backbone only (no LM-head call); positions count attended tokens, as ``generate`` does. With
    ``packing`` the rows' attended tokens run as one padding-free row (:mod:`aam_fast.modeling.packing`): the same
    values, zero at positions after a row's last token (whose targets are ignored)."""
    if packing:
        batch = add_packing({"input_ids": input_ids, "attention_mask": attention_mask})
        hidden = packed_hidden(model.base_model, batch)
        return padded_columns(hidden, batch, prompt_len - 1, input_ids.shape[1] - prompt_len)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state[:, prompt_len - 1 : -1]


@torch.no_grad()
def token_logprobs(
    model,
    batch: MicroBatch,
    temperature: float,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    packing: bool = False,
    copies: int | None = None,
) -> torch.Tensor:
    """Forward-only token log-probs ``[n, C]`` (float32, 0 after EOS) of the completion under ``model``; ``dtype``
    is the autocast dtype. ``copies``: the rows come in groups of that many sharing their prompt, which runs once per
    group (:func:`.generation.shared_prefix_hidden`; equal to the whole rows' values up to rounding); otherwise
    ``packing`` runs the backbone on the padding-free row (:func:`completion_hidden`)."""
    with autocast(batch.input_ids.device, dtype):
        if copies:
            hidden = shared_prefix_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_len, copies)
        else:
            hidden = completion_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_len, packing)
    hidden, weight, bias = head_inputs(hidden, *lm_head_of(model), dtype)
    return linear_logprobs(hidden, weight, batch.targets, bias=bias, temperature=temperature, backend=backend)


class PromptStream:
    """Endless prompt order: a fresh seeded permutation each epoch; ``(epoch, index)`` is the data position."""

    def __init__(self, records: list[dict], seed: int, epoch: int = 0, index: int = 0):
        self.records, self.seed, self.epoch, self.index = records, seed, epoch, index
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.records), generator=generator).tolist()

    def position(self) -> dict[str, int]:
        """The data position a checkpoint records (with the prompt count, so a resume on other prompts is refused)."""
        return {"epoch": self.epoch, "index": self.index, "prompts": len(self.records)}

    @classmethod
    def restored(cls, records: list[dict], seed: int, position: dict, where) -> PromptStream:
        """The stream at a checkpoint's :meth:`position` (ValueError naming ``where`` when it is not a position in
        ``records``)."""
        values = [position.get(key) if isinstance(position, dict) else None for key in ("epoch", "index", "prompts")]
        if not all(type(value) is int and value >= 0 for value in values) or values[1] > len(records):
            raise ValueError(f"{where}: 'data' {position!r} is not a position in the prompts; {START_AFRESH}")
        if values[2] != len(records):
            raise ValueError(
                f"{where}: saved with {values[2]} prompts, this run has {len(records)}; resume with the same prompts"
            )
        return cls(records, seed, values[0], values[1])

    def take(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            if self.index == len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out
