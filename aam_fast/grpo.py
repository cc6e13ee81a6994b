"""GRPO stage: a policy learns from the AAM reward model (and optional rule rewards) with group-relative advantages.

One optimizer step uses `batch_size × grad_accum` prompts, each sampled `num_generations` (G) times with
`transformers` `generate` (KV cache, left padding, stopping at EOS; a completion without EOS is flagged truncated).
The rollout batch is scored (reward model + weighted rule rewards), turned into advantages per group of G
(`aam_fast.group_advantages`), and reused for `num_iterations` optimizer steps; when it is reused, the policy's
token log-probs at rollout time are kept as `old_logps`. The reference policy (a frozen copy of the initial policy,
only when `beta != 0`) and the old policy are scored forward-only through `aam_fast.linear_logprobs` on the final
hidden states, never through full logits. The loss is `aam_fast.GRPOLoss`, whose gradient is formed during its
forward pass; its normaliser is counted over the whole optimizer step before the micro-batch loop, so gradient
accumulation is exact. The policy runs with dropout off (eval mode), so rollout, old and new log-probs are one
function of the weights.

Under `torchrun --nproc_per_node N -m aam_fast train-grpo --strategy ddp|fsdp2` each rank samples its slice of every
micro-batch's `batch_size × N` prompts, each completion from its own seed (so N ranks sample what one process with the
combined batch samples), the normaliser is all-reduced before the micro-batch loop, the loss runs inside the root
module's forward (`aam_fast.distributed`), advantages and metrics cover every rank, FSDP2 gathers the policy once per
rollout for generation, checkpoints are DCP-sharded and the final export is gathered to rank 0.

`--output DIR` ends holding the final policy as a `save_pretrained` folder (tokenizer included), `metrics.jsonl`
(one line per optimizer step, TRL's metric names), `completions.jsonl` (sampled completions with their rewards and
advantages every `log_completions_every` steps) and `checkpoints/` (atomic, exact resume).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .data import DEFAULT_OPENING_TURN, choose_pad_token_id, is_conversational, load_prompts, render_conversation
from .losses import LOSS_TYPES, GRPOLoss, default_normalizer, group_advantages
from .models import load_causal_lm
from .ops import linear_logprobs
from .packing import add_packing, packed_hidden, padded_columns

KL_CHOICES = ("k1", "k2", "k3")
SCALE_CHOICES = ("group", "batch", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
SCHEDULE_CHOICES = ("constant", "linear", "cosine")
CHECKPOINT_FORMAT = 1
IGNORE_INDEX = -100
# Settings a resumed run may change without breaking the continuation (anything else gets a warning).
RESUME_FREE_SETTINGS = frozenset(
    {
        "prompts",
        "output",
        "resume",
        "max_steps",
        "save_every",
        "keep_checkpoints",
        "log_completions_every",
        "progress",
        "threads",
        "device",
        "strategy",
    }
)

RewardFn = Callable[..., list]


@dataclass
class GRPOConfig:
    """Every setting of a `train-grpo` run (the CLI flags, one to one)."""

    policy: str
    prompts: str | list[dict] = ""
    output: str = "runs/grpo"
    reward_model: str | None = None
    reward_fns: list[str | RewardFn] = field(default_factory=list)
    reward_weights: list[float] | None = None
    scenes: str | None = None
    opening_turn: str = DEFAULT_OPENING_TURN
    max_prompts: int | None = None
    num_generations: int = 4
    max_new_tokens: int = 64
    max_prompt_length: int | None = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.04
    kl: str = "k3"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "token-mean"
    scale_rewards: str = "group"
    num_iterations: int = 1
    entropy_coef: float = 0.0
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 100
    batch_size: int = 2
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    log_completions_every: int = 10
    dtype: str = "auto"
    device: str = "auto"
    rm_max_length: int | None = None
    rm_batch_size: int = 8
    backend: str = "auto"
    trainable_layers: int | None = None
    threads: int | None = None
    progress: bool = True
    strategy: str = "ddp"
    packing: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the setting that cannot work."""
        positive = ("num_generations", "max_new_tokens", "num_iterations", "max_steps", "batch_size", "grad_accum")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO compares completions within a group")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be positive or None, got {self.max_prompt_length}")
        if self.kl not in KL_CHOICES:
            raise ValueError(f"kl must be one of {KL_CHOICES}, got {self.kl!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_CHOICES:
            raise ValueError(f"scale_rewards must be one of {SCALE_CHOICES}, got {self.scale_rewards!r}")
        if self.lr_schedule not in SCHEDULE_CHOICES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULE_CHOICES}, got {self.lr_schedule!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if not self.lr > 0 or self.beta < 0 or self.entropy_coef < 0 or self.epsilon < 0:
            raise ValueError("lr must be > 0 and beta, entropy_coef, epsilon must be >= 0")
        if self.reward_model is None and not self.reward_fns:
            raise ValueError("no reward: give reward_model (--reward-model) and/or reward_fns (--reward-fn)")
        sources = (self.reward_model is not None) + len(self.reward_fns)
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {sources} reward sources "
                "(the reward model first, then each reward function in order)"
            )
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise ValueError(f"trainable_layers must be a positive integer or None, got {self.trainable_layers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {self.threads}")
        if self.strategy not in dist_utils.STRATEGIES:
            raise ValueError(f"strategy must be one of {dist_utils.STRATEGIES}, got {self.strategy!r}")
        if self.save_every < 0 or self.log_completions_every < 0 or self.warmup_steps < 0:
            raise ValueError("save_every, log_completions_every and warmup_steps must be >= 0")


# ----------------------------------------------------------------------------------------------- rewards


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """`module:function` (a dotted module or a path to a .py file) or a callable, with TRL's signature

    `f(prompts, completions, **columns) -> list[float | None]`.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    module_name, function_name = spec.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(f"aam_fast_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name!r} has no callable {function_name!r}")
    return fn


class RewardSources:
    """The weighted sum of the reward model's score and rule rewards, TRL's way.

    Each source scores all samples; `None` from a rule function means "no reward from it for that sample" (NaN),
    and the total is the NaN-ignoring weighted sum (a sample no source scores gets 0, with a warning).
    """

    def __init__(self, scorer: Callable | None, fns: Sequence[str | RewardFn], weights: Sequence[float] | None):
        self.scorer = scorer
        self.fns = [load_reward_fn(f) for f in fns]
        self.names = (["reward_model"] if scorer is not None else []) + [
            getattr(f, "__name__", type(f).__name__) for f in self.fns
        ]
        count = len(self.names)
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * count, dtype=torch.float32)

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(total [n], per_source [n, sources])` float32 on the CPU; NaN where a source gave None."""
        n = len(prompts)
        per_source = []
        if self.scorer is not None:
            texts = [_completion_text(c) for c in completions]
            scores = torch.as_tensor(self.scorer(prompts, texts), dtype=torch.float32).detach().cpu().reshape(-1)
            if scores.shape[0] != n:
                raise ValueError(f"reward model returned {scores.shape[0]} scores for {n} completions")
            per_source.append(scores)
        for fn in self.fns:
            name = getattr(fn, "__name__", repr(fn))
            values = fn(prompts=prompts, completions=completions, **columns)
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise ValueError(f"reward function {name} must return a list of {n} floats or None, got {values!r}")
            try:
                per_source.append(torch.tensor([math.nan if v is None else float(v) for v in values]))
            except (TypeError, ValueError):
                raise ValueError(f"reward function {name} returned a non-numeric value: {values!r}") from None
        table = torch.stack(per_source, dim=1)
        unscored = torch.isnan(table).all(dim=1)
        if bool(unscored.any()):
            warnings.warn(
                f"{int(unscored.sum())} completions got no reward from any source; they count as 0", stacklevel=2
            )
        total = torch.nansum(table * self.weights, dim=1)
        return total, table


def _completion_text(completion: str | list[dict]) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


# ---------------------------------------------------------------------------------------------- policy io


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 autocast on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_policy(path: str, device: torch.device):
    """`(model, tokenizer)`: float32 master weights, left padding, a pad token (`aam_fast.data`'s choice)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"policy {path!r}: not a model folder (config.json + weights, as save_pretrained writes)")
    model = load_causal_lm(path, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    choose_pad_token_id(tokenizer)
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"policy {path!r}: logit soft-capping is not supported by the fused log-prob op")
    model.eval()
    return model, tokenizer


def train_top_layers(model, count: int) -> None:
    """Train only the last `count` decoder layers and the final norm; embeddings and LM head stay frozen.

    The frozen trunk then runs without autograd (nothing saved for backward) and the fused op skips the LM-head
    weight gradient, the largest product at a large vocabulary.
    """
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"trainable_layers needs a backbone with a `layers` list; {type(model.base_model).__name__}")
    if count > len(layers):
        raise ValueError(f"trainable_layers={count} but the policy has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - count :]:
        layer.requires_grad_(True)
    norm = getattr(model.base_model, "norm", None)
    if norm is not None:
        norm.requires_grad_(True)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The union of the tokenizer's EOS and the generation config's EOS ids (chat models end turns with both)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the policy has no EOS token: generation could never stop")
    return sorted(ids)


def encode_prompt(tokenizer, prompt, max_length: int | None) -> tuple[list[int], bool]:
    """Token ids of a prompt, left-truncated; `(ids, truncated)`. Tokenised as the reward model's `PairEncoder` does:

    message lists through the chat template (`aam_fast.data`'s fallback template where the tokenizer has none) with
    the generation prompt and no extra special tokens; strings with the tokenizer's special tokens.
    """
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


def completion_hidden(model, input_ids, attention_mask, prompt_len: int, packing: bool = False) -> torch.Tensor:
    """Final (post-norm) hidden states `[n, C, D]` at the positions that predict the C completion tokens.

    Runs the backbone only (no LM-head call); positions count attended tokens, as `generate` does. With `packing`
    the rows' attended tokens run as one padding-free row (`aam_fast.packing`): the same values, zero at positions
    after a row's last token (whose targets are ignored).
    """
    if packing:
        batch = add_packing({"input_ids": input_ids, "attention_mask": attention_mask})
        hidden = packed_hidden(model.base_model, batch)
        return padded_columns(hidden, batch, prompt_len - 1, input_ids.shape[1] - prompt_len)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state[:, prompt_len - 1 : -1]


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to bfloat16/float16 for the backbone (float32 master weights); float32 runs plain."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def head_inputs(model, hidden: torch.Tensor, dtype: torch.dtype):
    """`(hidden, weight, bias)` for the fused op, in one compute dtype (under autocast the final norm may return
    float32); the casts are differentiable, so gradients reach the float32 LM head."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return hidden.to(dtype), head.weight.to(dtype), None if bias is None else bias.to(dtype)


# ------------------------------------------------------------------------------------------------ rollouts


@dataclass
class MicroBatch:
    """One micro-batch of a rollout: `batch_size` prompts × G completions, prompt left-padded to `prompt_len`."""

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

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    def to(self, device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


@torch.no_grad()
def generate_micro_batch(
    policy,
    tokenizer,
    records: list[dict],
    cfg: GRPOConfig,
    generation_config,
    eos_ids,
    dtype=torch.float32,
    row_seeds: Sequence[int] | None = None,
):
    """Sample G completions for each record; returns `(MicroBatch, per-sample columns, prompts truncated)`.

    With `row_seeds` (one per completion, G per record) each completion is drawn by a :class:`RowSeededSampler`
    from its own seed; otherwise from the global torch RNG, as `generate` does."""
    device = next(policy.parameters()).device
    encoded = [encode_prompt(tokenizer, r["prompt"], cfg.max_prompt_length) for r in records]
    G = cfg.num_generations
    rows = [ids for ids, _ in encoded for _ in range(G)]
    prompt_ids, prompt_mask = left_pad(rows, tokenizer.pad_token_id, device)
    extra = {}
    if row_seeds is not None:
        from transformers import LogitsProcessorList

        if len(row_seeds) != len(rows):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(rows)} completions")
        sampler = RowSeededSampler(row_seeds, prompt_ids.shape[1], generation_config)
        extra["logits_processor"] = LogitsProcessorList([sampler])
    with autocast(device, dtype):
        out = policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config, **extra
        )
    prompt_len = prompt_ids.shape[1]
    completion = out[:, prompt_len:]
    width = completion.shape[1]
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, width, dtype=torch.long))
    keep = torch.arange(width, device=device)[None, :] <= first_eos[:, None]  # the EOS token itself is learned
    completion = torch.where(keep, completion, torch.full_like(completion, tokenizer.pad_token_id))
    texts = []
    for i in range(completion.shape[0]):
        length = int(keep[i].sum()) - int(has_eos[i])
        texts.append(tokenizer.decode(completion[i, :length].tolist(), skip_special_tokens=True))
    prompts = [r["prompt"] for r in records for _ in range(G)]
    columns = {k: [r[k] for r in records for _ in range(G)] for k in records[0] if k != "prompt"}
    batch = MicroBatch(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, keep.long()], dim=1),
        prompt_len=prompt_len,
        targets=torch.where(keep, completion, torch.full_like(completion, IGNORE_INDEX)),
        truncated=~has_eos,
        prompts=prompts,
        completions=texts,
    )
    return batch, columns, sum(t for _, t in encoded)


def completion_seed(seed: int, step: int, position: int, generation: int) -> int:
    """The sampling seed of completion `generation` of the prompt at global `position` of the rollout made at
    optimizer step `step` (63 bits)."""
    high, low = np.random.SeedSequence([seed, step, position, generation]).generate_state(2)
    return (int(high) & 0x7FFFFFFF) << 32 | int(low)


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping multiplication): a counter-based hash."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


class RowSeededSampler:
    """A `generate` logits processor that samples every row from its own seed: token `t` of row `r` is
    `argmax(log p_warped + Gumbel(hash(seed_r, t, vocab)))`, an exact draw from the temperature/top-k/top-p
    distribution (the Gumbel-max trick) that depends on the row's seed, step and logits only, not on the other rows
    of the batch nor on any RNG state. It returns a one-hot score row (0 at the draw, -inf elsewhere), so the
    warpers and the multinomial draw that `generate` applies after it keep exactly that token."""

    def __init__(self, row_seeds: Sequence[int], prompt_width: int, generation_config):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = torch.tensor([_signed(int(s)) for s in row_seeds], dtype=torch.long)
        self.prompt_width = prompt_width
        self.warpers = []
        if generation_config.temperature not in (None, 1.0):
            self.warpers.append(TemperatureLogitsWarper(generation_config.temperature))
        if generation_config.top_k:
            self.warpers.append(TopKLogitsWarper(generation_config.top_k))
        if generation_config.top_p is not None and generation_config.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(generation_config.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_width
        seeds = self.seeds.to(scores.device)
        row_keys = _splitmix64(seeds ^ _splitmix64(torch.full_like(seeds, _signed(step * 0x9E3779B97F4A7C15 + 1))))
        vocab = torch.arange(scores.shape[1], device=scores.device, dtype=torch.long)
        bits = _splitmix64(row_keys[:, None] + (vocab[None, :] + 1) * _GOLDEN)
        # 24-bit uniforms in (0, 1): float32 Gumbels, truncated only where their CDF is below 3e-8 or above 1 - 3e-8
        uniform = (_shift_right(bits, 40).float() + 0.5) * 2.0**-24
        gumbel = -torch.log(-torch.log(uniform))
        chosen = (torch.log_softmax(scores.float(), dim=-1) + gumbel).argmax(dim=-1)
        one_hot = torch.full_like(scores, -math.inf)
        return one_hot.scatter_(1, chosen[:, None], 0.0)


@torch.no_grad()
def token_logprobs(
    model,
    batch: MicroBatch,
    temperature: float,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    packing: bool = False,
) -> torch.Tensor:
    """Forward-only token log-probs `[n, C]` (float32, 0 after EOS) of the completion under `model`; `packing`
    runs the backbone on the padding-free row (:func:`completion_hidden`)."""
    with autocast(batch.input_ids.device, dtype):
        hidden = completion_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_len, packing)
    hidden, weight, bias = head_inputs(model, hidden, dtype)
    return linear_logprobs(hidden, weight, batch.targets, bias=bias, temperature=temperature, backend=backend)


# ------------------------------------------------------------------------------------------------- trainer


def make_scheduler(optimizer, cfg: GRPOConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """Write `path` so that a crash leaves either the old file or the complete new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


DIST_STATE_FILE = "trainer_state.pt"  # the rank-0 file of a distributed (DCP) checkpoint folder


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first: `step-*.pt` files (one process) and `step-*/` folders
    holding a DCP checkpoint (torchrun); a `.tmp` of a crashed save is neither."""
    if not folder.is_dir():
        return []
    files = list(folder.glob("step-*.pt"))
    folders = [p for p in folder.glob("step-*") if p.is_dir() and (p / DIST_STATE_FILE).is_file()]
    return sorted(files + folders, key=lambda p: p.name.removesuffix(".pt"))


def find_checkpoint(resume: str, output: Path) -> Path | None:
    """The checkpoint to resume: `auto` is the latest under `output/checkpoints` (None: start fresh); otherwise
    a checkpoint file, or the latest one in a folder (or in its `checkpoints/`)."""
    if resume == "auto":
        found = list_checkpoints(output / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file() or (path / DIST_STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise ValueError(f"resume={resume!r}: no checkpoint file, and no step-*.pt in it or in its checkpoints/")


class PromptStream:
    """Endless prompt order: a fresh seeded permutation each epoch; `(epoch, index)` is the data position."""

    def __init__(self, records: list[dict], seed: int, epoch: int = 0, index: int = 0):
        self.records, self.seed, self.epoch, self.index = records, seed, epoch, index
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.records), generator=generator).tolist()

    def take(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            if self.index == len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out


class JsonlLog:
    """Append-only JSONL; on resume, rows past the resumed step are dropped first."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= keep_until_step]
            path.write_text("".join(r + "\n" for r in kept))

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class GRPOTrainer:
    """Holds the policy, its frozen reference, the optimizer and the rollout buffer; `train()` runs the loop."""

    def __init__(self, cfg: GRPOConfig, scorer: Callable | None = None):
        cfg.validate()
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.ctx = dist_utils.setup(cfg.strategy, resolve_device(cfg.device))
        self.device = self.ctx.device
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.output = Path(cfg.output)
        if self.ctx.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "checkpoints").mkdir(exist_ok=True)
        self.ctx.barrier()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        records = (
            load_prompts(cfg.prompts, scenes=cfg.scenes, opening_turn=cfg.opening_turn)
            if isinstance(cfg.prompts, (str, Path))
            else list(cfg.prompts)
        )
        if not records:
            raise ValueError("prompts: no prompt records")
        self.records = records[: cfg.max_prompts] if cfg.max_prompts else records

        self.policy, self.tokenizer = load_policy(cfg.policy, self.device)
        self.reference = None
        if cfg.beta != 0:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if cfg.trainable_layers is not None:
            train_top_layers(self.policy, cfg.trainable_layers)
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer)
        self.generation_config = self._generation_config()
        if scorer is None and cfg.reward_model is not None:
            from .models import RewardScorer

            scorer = RewardScorer(
                cfg.reward_model,
                device=self.device,
                dtype=self.amp_dtype,
                max_length=cfg.rm_max_length,
                batch_size=cfg.rm_batch_size,
                packing=cfg.packing,
            )
        self.rewards = RewardSources(scorer, cfg.reward_fns, cfg.reward_weights)
        self.loss_fn = GRPOLoss(
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            beta=cfg.beta,
            kl=cfg.kl,
            entropy_coef=cfg.entropy_coef,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            backend=cfg.backend,
        )
        checkpoint = find_checkpoint(cfg.resume, self.output) if cfg.resume else None
        if checkpoint is None and list_checkpoints(self.output / "checkpoints"):
            raise ValueError(
                f"{self.output / 'checkpoints'} holds checkpoints of an earlier run: pass --resume auto to continue "
                "it, or choose another --output"
            )
        single_process_state = None
        if checkpoint is not None and not checkpoint.is_dir():
            # Our own checkpoint: it holds Python objects (RNG states, rollout texts), hence weights_only=False. Its
            # weights go into the plain policy, before FSDP2 shards it (any number of ranks).
            single_process_state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            if single_process_state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{checkpoint}: not a GRPO checkpoint of format {CHECKPOINT_FORMAT}")
            self.policy.load_state_dict(single_process_state["policy"])
        # The policy under the root LossModule (DDP/FSDP2 under torchrun); FSDP2 shards it in place, so the
        # optimizer is built from its parameters after this.
        self.engine = self.ctx.wrap(self.policy, self._micro_batch_loss, compute_dtype=self.amp_dtype)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.step = 0
        self.stream = PromptStream(self.records, cfg.seed)
        self.rollout: list[MicroBatch] | None = None
        self.rollout_metrics: dict[str, float] = {}
        self.iteration = 0
        resumed_step = self._resume(checkpoint, single_process_state) if checkpoint is not None else None
        self.metrics_log = self.ctx.writer(lambda: JsonlLog(self.output / "metrics.jsonl", resumed_step))
        self.completions_log = self.ctx.writer(lambda: JsonlLog(self.output / "completions.jsonl", resumed_step))

    def _generation_config(self):
        from transformers import GenerationConfig

        cfg = self.cfg
        return GenerationConfig(
            do_sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            num_beams=1,
            repetition_penalty=1.0,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
        )

    # -- rollout ------------------------------------------------------------------------------------------

    def make_rollout(self) -> tuple[list[MicroBatch], dict[str, float]]:
        """Generate, score and take advantages for one optimizer step's worth of prompts.

        Each micro-batch takes `batch_size × ranks` prompts from the shared stream and this rank samples its
        contiguous slice in one `generate` call, each completion from its own `completion_seed(seed, step,
        position, g)` (:class:`RowSeededSampler`), so ranks together sample what one process with the combined
        batch samples. Under FSDP2 the weights are gathered once for the whole rollout.
        Advantages and metrics are taken over every rank's rewards (gathered), as one process would.
        """
        cfg = self.cfg
        G = cfg.num_generations
        global_batch = cfg.batch_size * self.ctx.world
        plan = []  # per micro-batch: this rank's (global position, record) pairs
        for micro in range(cfg.grad_accum):
            records = self.stream.take(global_batch)
            positions = self.ctx.shard(range(micro * global_batch, (micro + 1) * global_batch))
            plan.append([(p, records[p - micro * global_batch]) for p in positions])

        def sample(policy):
            out = []
            for pairs in plan:
                seeds = [completion_seed(cfg.seed, self.step, p, g) for p, _ in pairs for g in range(G)]
                records = [record for _, record in pairs]
                batch, columns, cut = generate_micro_batch(
                    policy, self.tokenizer, records, cfg, self.generation_config, self.eos_ids, self.amp_dtype, seeds
                )
                if cfg.num_iterations > 1:
                    batch.old_logps = self._token_logprobs(policy, batch)
                out.append((batch, columns, cut))
            return out

        sampled = self.ctx.run_unsharded(self.engine, self.policy, sample)
        batches = [b for b, _, _ in sampled]
        all_columns = [c for _, c, _ in sampled]
        prompts_cut = sum(cut for _, _, cut in sampled)
        totals, tables = [], []
        for batch, columns in zip(batches, all_columns, strict=True):
            completion_ids = [t[t != IGNORE_INDEX].tolist() for t in batch.targets]
            completions = self._completions_for_fns(batch)
            total, table = self.rewards(batch.prompts, completions, {**columns, "completion_ids": completion_ids})
            totals.append(total)
            tables.append(table)
        rewards = torch.cat(totals)
        local = rewards.shape[0]
        every_rank = self.ctx.all_gather_rows(rewards)  # whole groups, rank after rank
        advantages = group_advantages(every_rank, G, scale=cfg.scale_rewards)
        advantages = advantages[self.ctx.rank * local : (self.ctx.rank + 1) * local]
        offset = 0
        for batch, table in zip(batches, tables, strict=True):
            n = batch.targets.shape[0]
            batch.rewards, batch.advantages = rewards[offset : offset + n], advantages[offset : offset + n]
            batch.reward_table = table
            offset += n
            if self.reference is not None:
                batch.ref_logps = self._token_logprobs(self.reference, batch)
        lengths = torch.cat([b.mask.sum(dim=1) for b in batches]).float()
        truncated = torch.cat([b.truncated for b in batches]).float()
        metrics = self._rollout_metrics(
            every_rank,
            self.ctx.all_gather_rows(torch.cat(tables)),
            self.ctx.all_gather_rows(lengths),
            self.ctx.all_gather_rows(truncated),
            self.ctx.all_reduce_sum(torch.tensor([float(prompts_cut)])).item(),
        )
        return batches, metrics

    def _token_logprobs(self, model, batch: MicroBatch) -> torch.Tensor:
        cfg = self.cfg
        return token_logprobs(model, batch, cfg.temperature, self.amp_dtype, cfg.backend, cfg.packing)

    def _completions_for_fns(self, batch: MicroBatch) -> list:
        """Completions in TRL's form: a string, or `[{"role": "assistant", "content": ...}]` for chat prompts."""
        return [
            [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
            for prompt, text in zip(batch.prompts, batch.completions, strict=True)
        ]

    def _rollout_metrics(self, rewards, table, lengths, truncated, prompts_cut) -> dict[str, float | None]:
        """Metrics of a rollout from per-sample `rewards`, reward `table`, completion `lengths` and `truncated`
        flags of every rank, and the number of prompts cut over all ranks."""
        G = self.cfg.num_generations
        grouped = rewards.view(-1, G)
        group_std = grouped.std(dim=1)
        metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((grouped.amax(1) == grouped.amin(1)).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.mean()),
            "prompts/truncated": float(prompts_cut),
        }
        for column, name in enumerate(self.rewards.names):
            values = table[:, column]
            finite = values[~torch.isnan(values)]
            metrics[f"rewards/{name}/mean"] = float(finite.mean()) if finite.numel() else None
            metrics[f"rewards/{name}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
        return metrics

    # -- optimisation -------------------------------------------------------------------------------------

    def accumulate_gradients(self, batches: list[MicroBatch]) -> tuple[float, dict[str, float]]:
        """Backward over every micro-batch of one step; `(loss, summed stats)`.

        The normaliser (tokens, sequences, or sequences × max_new_tokens) is counted over all micro-batches of
        every rank before the loop, so the accumulated gradient equals the gradient of the whole step's batch in
        one piece. Under torchrun each rank's loss is its share of that one loss; DDP/FSDP2 average gradients over
        ranks, so the backward runs on `ranks × loss` (the sum of the shares). Loss and stats are summed over
        ranks.
        """
        cfg = self.cfg
        local = sum(float(default_normalizer(b.mask.float(), cfg.loss_type, cfg.max_new_tokens)) for b in batches)
        normalizer = self.ctx.all_reduce_sum(torch.tensor([local])).item()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            with self.ctx.no_sync(self.engine, i == len(batches) - 1):
                out = self.engine({"micro_batch": batch, "normalizer": normalizer})
                (out.loss * self.ctx.world).backward()
            loss_sum += float(out.loss.detach())
            for key, value in out.stats.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        if self.ctx.distributed:
            keys = sorted(totals)
            summed = self.ctx.all_reduce_sum(torch.tensor([loss_sum] + [totals[k] for k in keys])).tolist()
            loss_sum, totals = summed[0], dict(zip(keys, summed[1:], strict=True))
        return loss_sum, totals

    def _micro_batch_loss(self, policy, inputs: dict):
        """The GRPO loss of one micro-batch (`GRPOLoss` output): the root module's forward under DDP/FSDP2, so the
        fused op sees the full LM-head weight."""
        batch = inputs["micro_batch"]
        with autocast(self.device, self.amp_dtype):
            hidden = completion_hidden(
                policy, batch.input_ids, batch.attention_mask, batch.prompt_len, self.cfg.packing
            )
        hidden, weight, bias = head_inputs(policy, hidden, self.amp_dtype)
        return self.loss_fn(
            hidden,
            weight,
            batch.targets,
            batch.advantages.to(hidden.device),
            old_logps=batch.old_logps,
            ref_logps=batch.ref_logps,
            bias=bias,
            normalizer=inputs["normalizer"],
        )

    def optimizer_step(self, batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step (gradient accumulation, clipping, AdamW, schedule); returns its metrics."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, totals = self.accumulate_gradients(batches)
        if not math.isfinite(loss_sum):
            raise RuntimeError(
                f"non-finite loss ({loss_sum}) at step {self.step + 1}; stopping. The last good checkpoint is kept "
                f"in {self.output / 'checkpoints'}"
            )
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(self.ctx.clip_grad_norm(params, max_norm))
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        tokens = max(totals.get("tokens", 0.0), 1.0)
        metrics = {"loss": loss_sum, "grad_norm": grad_norm, "learning_rate": learning_rate}
        if "kl_sum" in totals:
            metrics["kl"] = totals["kl_sum"] / tokens
        if "entropy_sum" in totals:
            metrics["entropy"] = totals["entropy_sum"] / tokens
        metrics["clip_ratio/low_mean"] = totals.get("clip_low_sum", 0.0) / tokens
        metrics["clip_ratio/high_mean"] = totals.get("clip_high_sum", 0.0) / tokens
        metrics["clip_ratio/region_mean"] = totals.get("clip_region_sum", 0.0) / tokens
        return metrics

    # -- loop ---------------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Run to `max_steps`; returns this call's metric rows. Ends by saving the final policy to `output`."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        rows = []
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="grpo",
            disable=not cfg.progress or not self.ctx.is_main,
            dynamic_ncols=True,
        )
        while self.step < cfg.max_steps:
            started = time.perf_counter()
            if self.rollout is None or self.iteration >= cfg.num_iterations:
                self.rollout, self.rollout_metrics = self.make_rollout()
                self.iteration = 0
                if cfg.log_completions_every and self.step % cfg.log_completions_every == 0:
                    self.completions_log.write(self._completion_rows(self.step + 1))
            metrics = self.optimizer_step(self.rollout)
            self.iteration += 1
            self.step += 1
            row = {"step": self.step, "epoch": self.stream.epoch, **self.rollout_metrics, **metrics}
            rows.append(row)
            self.metrics_log.write([row])
            bar.update(1)
            postfix = {"reward": f"{row['reward']:.3f}", "len": f"{row['completions/mean_length']:.1f}"}
            if "kl" in row:
                postfix["kl"] = f"{row['kl']:.4f}"
            postfix["s/step"] = f"{time.perf_counter() - started:.1f}"
            bar.set_postfix(postfix)
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint()
        bar.close()
        self.save_final()
        return rows

    def _completion_rows(self, step: int) -> list[dict]:
        """One row per sampled completion of every rank, in the order one process with the combined batch has
        (micro-batch by micro-batch, ranks in order within each); a collective under torchrun."""
        rows = []
        for batch in self.rollout:
            rows += self.ctx.gather_objects(self._batch_rows(batch, step))
        return rows

    def _batch_rows(self, batch: MicroBatch, step: int) -> list[dict]:
        rows = []
        for i, (prompt, text) in enumerate(zip(batch.prompts, batch.completions, strict=True)):
            per_source = {
                f"rewards/{name}": None if math.isnan(float(value)) else float(value)
                for name, value in zip(self.rewards.names, batch.reward_table[i], strict=True)
            }
            rows.append(
                {
                    "step": step,
                    "prompt": prompt,
                    "completion": text,
                    "reward": float(batch.rewards[i]),
                    "advantage": float(batch.advantages[i]),
                    **per_source,
                    "length": int(batch.mask[i].sum()),
                    "truncated": bool(batch.truncated[i]),
                }
            )
        return rows

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """`checkpoints/step-NNNNNN.pt`: model, optimizer, scheduler, RNG, data position, unfinished rollout.

        Under torchrun, `checkpoints/step-NNNNNN/`: model and optimizer as a DCP sharded checkpoint, each rank's
        RNG and unfinished rollout slice in its own file, the rest in `trainer_state.pt` (rank 0)."""
        cfg = self.cfg
        mid_rollout = self.rollout is not None and self.iteration < cfg.num_iterations
        rank_state = {
            "rng": rng_state(),
            "rollout": [b.to("cpu") for b in self.rollout] if mid_rollout else None,
            "rollout_metrics": self.rollout_metrics if mid_rollout else None,
            "iteration": self.iteration,
        }
        shared = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": {"epoch": self.stream.epoch, "index": self.stream.index, "prompts": len(self.records)},
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("reward_fns", "prompts")},
            "mid_rollout": mid_rollout,
            "global_batch": cfg.batch_size * self.ctx.world,
        }
        folder = self.output / "checkpoints"
        if self.ctx.distributed:
            return self.ctx.save_checkpoint(
                folder,
                f"step-{self.step:06d}",
                self.engine,
                self.optimizer,
                shared,
                rank_state,
                state_file=DIST_STATE_FILE,
                keep=cfg.keep_checkpoints,
                list_checkpoints=list_checkpoints,
            )
        state = {**shared, **rank_state, "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}
        path = folder / f"step-{self.step:06d}.pt"
        atomic_torch_save(state, path)
        old = list_checkpoints(folder)
        if cfg.keep_checkpoints > 0:
            for stale in old[: -cfg.keep_checkpoints]:
                stale.unlink()
        return path

    def _resume(self, path: Path, single_process_state: dict | None) -> int:
        """Continue from checkpoint `path`: a DCP folder (loaded here, resharded onto this run's ranks) or a
        single-process file (`single_process_state`, its weights already in the policy). Another number of ranks
        works when --batch-size x ranks is unchanged and the checkpoint was not saved mid-rollout; the RNG states
        then stay at this run's seeded start (sampling does not use them: each completion has its own seed)."""
        if single_process_state is None:
            state, rank_state = self.ctx.load_checkpoint(path, self.engine, self.optimizer, state_file=DIST_STATE_FILE)
            saved_world = state["world_size"]
        else:
            state, saved_world = single_process_state, 1
            self.ctx.load_optimizer_state(self.engine, self.optimizer, state["optimizer"])
            rank_state = state if self.ctx.world == 1 else None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a GRPO checkpoint of format {CHECKPOINT_FORMAT}")
        if rank_state is None:  # written by another number of ranks
            if state["mid_rollout"]:
                writer = "one process" if saved_world == 1 else f"{saved_world} ranks"
                raise ValueError(f"{path}: saved mid-rollout by {writer}; resume it on as many ranks")
            rank_state = {"rng": None, "rollout": None}
        state.update(rank_state)
        global_batch = self.cfg.batch_size * self.ctx.world
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"{path}: written with {state['global_batch']} prompts per micro-batch over all ranks; this run "
                f"has {global_batch} (--batch-size {self.cfg.batch_size} x {self.ctx.world} ranks): keep "
                "batch-size x ranks the same"
            )
        if state["data"]["prompts"] != len(self.records):
            raise ValueError(
                f"{path}: saved with {state['data']['prompts']} prompts, this run has {len(self.records)}; "
                "resume with the same prompts"
            )
        saved, current = state["config"], asdict(self.cfg)
        # A checkpoint may continue on another number of ranks: batch_size x ranks was checked above.
        free = RESUME_FREE_SETTINGS | {"batch_size"}
        changed = [
            f"{key} ({saved[key]!r} -> {current[key]!r})"
            for key in sorted(saved)
            if key not in free and key in current and saved[key] != current[key]
        ]
        if changed:
            warnings.warn(f"resuming {path} with changed settings: {', '.join(changed)}", stacklevel=3)
        self.scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        self.step = state["step"]
        self.stream = PromptStream(self.records, self.cfg.seed, state["data"]["epoch"], state["data"]["index"])
        if state["rollout"] is not None:
            self.rollout = [b.to(self.device) for b in state["rollout"]]
            self.rollout_metrics = state["rollout_metrics"]
            self.iteration = state["iteration"]
        return self.step

    def save_final(self) -> None:
        """The policy as a `save_pretrained` folder; under torchrun the full weights are gathered and rank 0
        writes them through a plain copy of the policy (a collective)."""
        if not self.ctx.distributed:
            self.policy.save_pretrained(self.output)
            self.tokenizer.save_pretrained(self.output)
            return
        full = self.ctx.full_state_dict(self.engine)
        if self.ctx.is_main:
            plain = load_causal_lm(self.cfg.policy, dtype=torch.float32)
            plain.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
            plain.save_pretrained(self.output)
            self.tokenizer.save_pretrained(self.output)
        self.ctx.barrier()


def train_grpo(cfg: GRPOConfig, scorer: Callable | None = None) -> list[dict]:
    """Run the GRPO stage; returns the metric rows of this call (also in `output/metrics.jsonl`). Under torchrun
    every rank runs it; the process group is closed at the end."""
    trainer = GRPOTrainer(cfg, scorer=scorer)
    rows = trainer.train()
    trainer.ctx.close()
    return rows


# --------------------------------------------------------------------------------------------------- CLI


def add_train_grpo_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `aam-fast train-grpo` (one per `GRPOConfig` field)."""
    d = GRPOConfig(policy="")
    a = parser.add_argument
    a("--policy", required=True, help="policy model folder (save_pretrained / hub-style layout)")
    a("--reward-model", default=None, help="AAM reward model folder written by train-rm")
    a("--prompts", required=True, help="RPBench character cards, demo role-play profiles, or a file with 'prompt'")
    a("--scenes", default=None, help="RPBench scene file: adds each card's scene (matched by id)")
    a("--opening-turn", default=d.opening_turn, help="the user's opening line for RPBench cards")
    a("--max-prompts", type=int, default=None, help="use only the first N prompts")
    a("--reward-fn", dest="reward_fns", action="append", default=[], help="module:function rule reward (repeatable)")
    a("--reward-weights", type=float, nargs="+", default=None, help="one weight per reward source (RM first)")
    a("--num-generations", type=int, default=d.num_generations, help="completions per prompt (G)")
    a("--max-new-tokens", type=int, default=d.max_new_tokens)
    a("--max-prompt-length", type=int, default=d.max_prompt_length, help="prompts are left-truncated to this")
    a("--temperature", type=float, default=d.temperature)
    a("--top-p", type=float, default=d.top_p)
    a("--top-k", type=int, default=d.top_k, help="0 disables top-k")
    a("--beta", type=float, default=d.beta, help="KL coefficient (0: no reference model)")
    a("--kl", choices=KL_CHOICES, default=d.kl, help="KL estimator")
    a("--epsilon", type=float, default=d.epsilon, help="lower clip range")
    a("--epsilon-high", type=float, default=None, help="upper clip range (default: --epsilon)")
    a("--loss-type", choices=LOSS_TYPES, default=d.loss_type)
    a("--scale-rewards", choices=SCALE_CHOICES, default=d.scale_rewards)
    a("--num-iterations", type=int, default=d.num_iterations, help="optimizer steps per rollout batch")
    a("--entropy-coef", type=float, default=d.entropy_coef)
    a("--lr", type=float, default=d.lr)
    a("--lr-schedule", choices=SCHEDULE_CHOICES, default=d.lr_schedule)
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    a("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    a("--batch-size", type=int, default=d.batch_size, help="prompts per micro-batch (each sampled G times)")
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--seed", type=int, default=d.seed)
    a("--output", default=d.output, help="folder for the final policy, metrics.jsonl, completions.jsonl")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: never)")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (0: all)")
    a("--resume", default=None, help="'auto' (latest under OUTPUT/checkpoints), a checkpoint, or a run folder")
    a("--log-completions-every", type=int, default=d.log_completions_every, help="0: never")
    a("--dtype", choices=DTYPE_CHOICES, default=d.dtype, help="autocast dtype (auto: bfloat16 on CUDA)")
    a("--device", default=d.device)
    a("--rm-max-length", type=int, default=None, help="reward model truncation (default: its training length)")
    a("--rm-batch-size", type=int, default=d.rm_batch_size)
    a("--backend", default=d.backend, help="linear_logprobs backend: auto|torch|triton")
    a("--trainable-layers", type=int, default=None, help="train only the top K decoder layers (+ final norm)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    a(
        "--strategy",
        choices=dist_utils.STRATEGIES,
        default=d.strategy,
        help="under torchrun (WORLD_SIZE>1): ddp replicates the policy, fsdp2 shards it per decoder layer",
    )
    a(
        "--packing",
        action="store_true",
        help="padding-free batches for the policy, reference and reward-model passes (flash-attn varlen or SDPA)",
    )


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    names = set(GRPOConfig.__dataclass_fields__)
    return GRPOConfig(**{k: v for k, v in vars(args).items() if k in names})


def print_summary(rows: list[dict], output: str, stream=None) -> None:
    stream = stream or sys.stderr
    if not rows:
        print(f"nothing to do: already at max_steps; policy in {output}", file=stream)
        return
    first, last = rows[0], rows[-1]
    parts = [f"reward {first['reward']:.4f} -> {last['reward']:.4f}"]
    if "kl" in last:
        parts.append(f"kl {first['kl']:.4f} -> {last['kl']:.4f}")
    parts.append(f"mean length {first['completions/mean_length']:.1f} -> {last['completions/mean_length']:.1f}")
    print(f"steps {first['step']}..{last['step']}: " + ", ".join(parts), file=stream)
    print(
        f"policy saved to {output} (AutoModelForCausalLM.from_pretrained); metrics in {output}/metrics.jsonl",
        file=stream,
    )


def run_train_grpo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    rows = train_grpo(cfg)
    if dist_utils.is_main_process():
        print_summary(rows, cfg.output)
    return 0


# ---------------------------------------------------------------------------------------------------- demo

DEMO_RM_NAME = "demo-rm-pr"  # where `aam-fast demo` saves its reward model inside the cache


def demo_prompts(path: str | Path, count: int) -> list[dict]:
    """`count` role-play prompts from the demo profiles, one per character, in file order."""
    chosen, characters = [], set()
    for record in load_prompts(path):
        if record.get("character") not in characters:
            characters.add(record.get("character"))
            chosen.append(record)
        if len(chosen) == count:
            break
    return chosen


def run_demo_grpo(args: argparse.Namespace) -> int:
    """`make demo-grpo`: SmolLM2-135M-Instruct learns from the demo's AAM reward model on a few role-play prompts.

    Two prompts (one per character) in every step, 4 completions each, the top 4 of 30 layers training, KL to the
    initial policy with beta 0.04: a few minutes on a 2-core CPU.
    """
    from .demo_rm import cache_dir, converted_model, demo_data_path

    started = time.time()
    reward_model = Path(args.reward_model) if args.reward_model else cache_dir() / DEMO_RM_NAME
    if not (reward_model / "config.json").is_file():
        raise SystemExit(f"no reward model at {reward_model}: run `make demo` first (or pass --reward-model DIR)")
    policy = converted_model()
    output = Path(args.output) if args.output else cache_dir() / "demo-grpo"
    cfg = GRPOConfig(
        policy=str(policy),
        prompts=demo_prompts(demo_data_path(), args.prompts),
        reward_model=str(reward_model),
        output=str(output),
        num_generations=4,
        max_new_tokens=args.max_new_tokens,
        temperature=0.8,
        batch_size=args.prompts,  # every step sees every prompt, so rewards compare across steps
        max_steps=args.steps,
        lr=args.lr,
        beta=0.04,
        trainable_layers=args.trainable_layers,
        threads=args.threads,
        seed=args.seed,
        log_completions_every=1,
    )
    rows = train_grpo(cfg)
    print(f"\nGRPO on SmolLM2-135M-Instruct with the AAM reward model {reward_model}, {time.time() - started:.0f} s")
    print(f"{'step':>4} {'reward':>8} {'kl':>8} {'length':>7}")
    for row in rows:
        print(
            f"{row['step']:>4} {row['reward']:>8.3f} {row.get('kl', 0.0):>8.4f} {row['completions/mean_length']:>7.1f}"
        )
    table = [json.loads(line) for line in (output / "completions.jsonl").read_text().splitlines() if line]
    if table:
        best = max((r for r in table if r["step"] == table[-1]["step"]), key=lambda r: r["reward"])
        print(f"\nbest completion of the last step (reward {best['reward']:.3f}) to {best['prompt'][-1]['content']!r}:")
        print(f"  {best['completion']!r}")
    print(
        f"\npolicy saved to {output}; metrics in {output / 'metrics.jsonl'}, samples in {output / 'completions.jsonl'}"
    )
    return 0


def add_parser(subparsers) -> None:
    """Register `train-grpo` and `demo-grpo` with the `aam-fast` CLI."""
    train = subparsers.add_parser("train-grpo", help="GRPO: train a policy against an AAM reward model")
    add_train_grpo_arguments(train)
    train.set_defaults(func=run_train_grpo)
    demo = subparsers.add_parser("demo-grpo", help="a short CPU GRPO run on SmolLM2 with the demo reward model")
    demo.add_argument("--reward-model", default=None, help="default: the model `aam-fast demo` saved in the cache")
    demo.add_argument("--output", default=None, help="default: demo-grpo in the cache")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--prompts", type=int, default=2, help="role-play prompts (one per character), all in each step")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--lr", type=float, default=5e-5)
    demo.add_argument("--trainable-layers", type=int, default=4, help="top decoder layers that train (of 30)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy CPU)")
    demo.set_defaults(func=run_demo_grpo)
