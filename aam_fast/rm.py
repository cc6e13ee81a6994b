"""The reward-model stage: train with the AAM loss (``aam-fast train-rm``) and evaluate (``aam-fast eval-rm``).

Training, per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs, each one concatenated
``[chosen; rejected]`` forward through :class:`~aam_fast.models.RewardModel` (and the frozen reference for PR), the
loss from :class:`aam_fast.AAMLoss` on the final hidden states and the LM-head weight, AdamW, linear warmup then
cosine decay, gradient clipping. The data order is a function of (seed, epoch), so the position in the data is just
the number of micro-batches consumed; a checkpoint holds the model, optimizer, scheduler, RNG states and that count,
and resuming from it continues the identical loss curve. A checkpoint resumes on another number of ranks too (a
single-process folder on N ranks, a sharded one written by N ranks on M or in one process) when ``batch_size x
ranks`` is unchanged; the RNG states then stay at the run's seeded start, which changes nothing here (dropout is off
and the data order does not use them).

``--output DIR`` ends holding the final model (a ``save_pretrained`` folder that
``AutoModelForSequenceClassification`` loads), ``metrics.jsonl`` (TRL's metric names), ``summary.json`` and
``checkpoints/step-XXXXXXXX/`` (written to a temporary folder, then renamed: a crash mid-save leaves the previous
checkpoint intact).

Evaluation (:func:`evaluate_pairs`), as RewardBench: strict accuracy ``r_c > r_r`` (ties are wrong) overall and per
subset, fixed batch size and right padding, the reward-gap distribution, and beside every accuracy the length-only
baseline (the longer response in tokens wins, ties wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import AAMLoss, linear_logprobs
from . import distributed as dist_utils
from .data import (
    IGNORE_INDEX,
    EncodedPair,
    PairEncoder,
    choose_pad_token_id,
    collate_pairs,
    load_preferences,
    split_by_prompt,
)
from .models import (
    LM_HEAD_FILE,
    ReferenceModel,
    RewardModel,
    disable_dropout,
    is_reward_model_dir,
    load_causal_lm,
    load_reward_model,
    read_safetensors,
    save_reward_model,
)

MARGINS = ("bt", "fixed", "pr", "ld")
NAMED_GAMMA = {"pr": 1.0, "ld": 0.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm stopped the run; the last good checkpoint is kept."""


@dataclasses.dataclass
class RMConfig:
    """Everything ``train-rm`` takes; the CLI flags are these names with dashes."""

    model: str
    data: str
    output: str
    eval_data: str | None = None
    data_split: str = "train"
    dev_fraction: float = 0.1
    subset_field: str | None = None
    skip_invalid: bool = False
    max_pairs: int | None = None
    margin: str = "pr"
    beta: float = 1.0
    gamma: float | None = None
    length_norm: str = "mean"
    detach_margin: bool = True
    margin_clip: float | None = None
    sft_weight: float = 0.0
    center_rewards: float = 0.0
    max_length: int = 512
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    score_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    trainable_layers: int | None = None
    cache_trunk: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 42
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    liger: bool = True
    backend: str = "auto"
    progress: bool = True
    strategy: str = "ddp"
    packing: bool = False

    def validate(self) -> None:
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {self.margin!r}")
        if self.gamma is not None and self.margin not in NAMED_GAMMA:
            raise ValueError("gamma applies to margin 'pr' or 'ld'")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.cache_trunk and self.trainable_layers is None:
            raise ValueError("cache_trunk needs trainable_layers (there is no frozen trunk to cache otherwise)")
        if self.strategy not in dist_utils.STRATEGIES:
            raise ValueError(f"strategy must be one of {dist_utils.STRATEGIES}, got {self.strategy!r}")
        if self.packing and (self.cache_trunk or (self.needs_reference and self.trainable_layers is not None)):
            raise ValueError("packing does not combine with cache_trunk or a top-layers-only PR reference")

    @property
    def effective_gamma(self) -> float:
        if self.margin not in NAMED_GAMMA:
            return 0.0
        return NAMED_GAMMA[self.margin] if self.gamma is None else self.gamma

    @property
    def needs_reference(self) -> bool:
        return self.margin in NAMED_GAMMA and self.effective_gamma != 0

    @property
    def needs_logps(self) -> bool:
        return self.margin in NAMED_GAMMA or self.sft_weight != 0


def _log(message: str) -> None:
    if dist_utils.is_main_process():
        tqdm.write(message, file=sys.stderr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """``(parameter dtype, autocast dtype or None)``: ``auto`` is float32 weights with bf16 autocast on CUDA and plain
    float32 elsewhere; a named dtype is the parameter dtype with no autocast."""
    if dtype == "auto":
        return torch.float32, (torch.bfloat16 if device.type == "cuda" else None)
    return DTYPES[dtype], None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def head_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden, weight, bias)`` in one dtype for ``linear_logprobs``: the autocast dtype when training under
    autocast (as autocast would run the LM head; the casts are differentiable), else the weight's dtype."""
    dtype = compute_dtype or weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def apply_liger(lm) -> bool:
    """Liger-Kernel's RoPE/RMSNorm/SwiGLU patches on a CUDA model when installed (never its loss kernels)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    try:
        _apply_liger_kernel_to_instance(
            model=lm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except Exception as exc:  # an architecture Liger does not know: keep the plain model
        _log(f"Liger-Kernel patches not applied: {exc}")
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _distribution(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    q = torch.quantile(values, quantiles).tolist() if values.numel() else [float("nan")] * 5
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "p10": q[0],
        "p25": q[1],
        "median": q[2],
        "p75": q[3],
        "p90": q[4],
        "max": values.max().item(),
    }


@torch.no_grad()
def score_pairs(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``(chosen [n], rejected [n])`` float32 of encoded pairs, ``batch_size`` pairs per forward.

    Pairs are batched in order of length (a fixed order, so scores do not depend on anything but the data) to
    spend little compute on padding; rewards come back in the input order.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: (max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)), i))
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    try:
        for start in tqdm(
            range(0, len(pairs), batch_size), desc="scoring", disable=not progress, file=sys.stderr, leave=False
        ):
            indices = order[start : start + batch_size]
            batch = collate_pairs([pairs[i] for i in indices], pad_token_id)
            with _autocast(device, autocast_dtype):
                out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            rewards = out.rewards.float().cpu()
            chosen[indices] = rewards[: len(indices)]
            rejected[indices] = rewards[len(indices) :]
    finally:
        model.train(was_training)
    return chosen, rejected


def pairwise_report(
    reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, pairs: Sequence[EncodedPair]
) -> dict[str, Any]:
    """Strict accuracy, length baseline, reward-gap distribution, overall and per subset (counts kept so sections
    can be weighted by examples)."""
    gap = reward_chosen - reward_rejected
    correct = gap > 0
    longer = torch.tensor([p.chosen.response_tokens > p.rejected.response_tokens for p in pairs])
    report: dict[str, Any] = {
        "accuracy": correct.float().mean().item(),
        "length_baseline": longer.float().mean().item(),
        "num_pairs": len(pairs),
        "ties": int((gap == 0).sum()),
        "reward_gap": _distribution(gap),
        "rewards": {"chosen_mean": reward_chosen.mean().item(), "rejected_mean": reward_rejected.mean().item()},
    }
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        if pair.subset is not None:
            groups[pair.subset].append(i)
    if groups:
        report["subsets"] = {
            name: {
                "accuracy": correct[idx].float().mean().item(),
                "length_baseline": longer[idx].float().mean().item(),
                "num_pairs": len(idx),
                "reward_gap_mean": gap[idx].mean().item(),
            }
            for name, idx in sorted(groups.items())
        }
    return report


def evaluate_pairs(
    model: RewardModel,
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``pairs`` and return :func:`pairwise_report`."""
    if not pairs:
        raise ValueError("no pairs to evaluate")
    chosen, rejected = score_pairs(
        model,
        pairs,
        pad_token_id,
        batch_size=batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    return pairwise_report(chosen, rejected, pairs)


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"pairs {report['num_pairs']}  accuracy {report['accuracy']:.4f}  "
        f"(length baseline {report['length_baseline']:.4f}, ties {report['ties']})"
    ]
    gap = report["reward_gap"]
    lines.append(
        "reward gap r_c - r_r: mean {mean:.4f} std {std:.4f} | min {min:.3f} p10 {p10:.3f} p25 {p25:.3f} "
        "median {median:.3f} p75 {p75:.3f} p90 {p90:.3f} max {max:.3f}".format(**gap)
    )
    for name, sub in report.get("subsets", {}).items():
        lines.append(
            f"  {name:<24} pairs {sub['num_pairs']:>5}  accuracy {sub['accuracy']:.4f}  "
            f"(length baseline {sub['length_baseline']:.4f})"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (their trainer state written last) under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=_checkpoint_step)


def find_resume_checkpoint(resume: str | None, checkpoints: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` is the latest complete one under ``checkpoints`` (None, logged,
    when there is none), anything else a checkpoint folder, which must be complete (ValueError otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoints)
        if not found:
            _log(f"--resume auto: no checkpoint under {checkpoints}; starting fresh")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def save_checkpoint(
    root: Path, step: int, model: RewardModel, tokenizer, trainer_state: dict, metadata: dict, keep: int
) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically: into a temporary folder, then ``os.replace``; prune to ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_reward_model(model, tokenizer, tmp, metadata=metadata)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / "trainer_state.json").write_text(
        json.dumps({k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))}, indent=2) + "\n"
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: RewardModel, folder: Path) -> None:
    """Load a saved reward-model folder's weights into ``model`` in place (parameters keep their identity, so an
    optimizer built on them stays valid)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    prefix = next((k.split(".", 1)[0] for k in tensors if k != "score.weight"), None)
    backbone = {k.split(".", 1)[1]: v for k, v in tensors.items() if prefix and k.startswith(prefix + ".")}
    with torch.no_grad():
        model.backbone.load_state_dict(backbone, strict=True)
        model.score.weight.copy_(read_safetensors(folder, ["score.weight"])["score.weight"])
        if (folder / LM_HEAD_FILE).is_file():
            model.lm_head.load_state_dict(load_file(str(folder / LM_HEAD_FILE)))


# ----------------------------------------------------------------------------------------------------------------
# Training


class TrunkCache:
    """The frozen trunk's output for every training sequence, computed once (in fixed chunks of the data order, so
    a resumed run caches exactly the same values) and reused every epoch: later steps run only the top layers.

    With a ``reference`` the reference's response log-prob (sum and token count) of each sequence is cached too:
    it depends only on the frozen trunk and the frozen reference top, so training steps need no reference forward.
    Memory: ``2 · pairs · tokens · D`` values, so this is for small data sets such as the demo's.
    """

    def __init__(
        self,
        model: RewardModel,
        pairs: Sequence[EncodedPair],
        pad_token_id: int,
        *,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        progress: bool,
        reference: ReferenceModel | None = None,
        backend: str = "auto",
    ):
        count = len(pairs)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ref_sums: dict[int, tuple[float, float]] = {}
        self.ref_counts: dict[int, tuple[int, int]] = {}
        # Chunks of similar length pad little; the order is fixed, so every run caches the same values.
        order = sorted(range(count), key=lambda i: (max(len(pairs[i].chosen.ids), len(pairs[i].rejected.ids)), i))
        for start in tqdm(
            range(0, count, batch_size),
            desc="caching frozen trunk",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        ):
            chunk = order[start : start + batch_size]
            n = len(chunk)
            batch = collate_pairs([pairs[i] for i in chunk], pad_token_id)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            with _autocast(device, autocast_dtype):
                hidden = model.trunk_output(input_ids, attention_mask)
            for row, index in enumerate(chunk):
                chosen_len, rejected_len = len(pairs[index].chosen.ids), len(pairs[index].rejected.ids)
                self.rows[index] = (hidden[row, :chosen_len].clone(), hidden[n + row, :rejected_len].clone())
            if reference is not None:
                with torch.no_grad():
                    with _autocast(device, autocast_dtype):
                        out = model(input_ids, attention_mask, reference=reference, trunk_hidden=hidden)
                    ref_hidden, ref_weight, ref_bias = head_inputs(
                        out.ref_hidden[:, :-1], reference.lm_head_weight, reference.lm_head_bias, autocast_dtype
                    )
                    targets = batch["labels"][:, 1:].to(device)
                    token_logps = linear_logprobs(ref_hidden, ref_weight, targets, bias=ref_bias, backend=backend)
                sums = token_logps.sum(-1).cpu()
                counts = (targets != IGNORE_INDEX).sum(-1).cpu()
                for row, index in enumerate(chunk):
                    self.ref_sums[index] = (sums[row].item(), sums[n + row].item())
                    self.ref_counts[index] = (int(counts[row]), int(counts[n + row]))

    def batch(self, indices: Sequence[int], length: int) -> torch.Tensor:
        """``[2B, length, D]`` trunk outputs of pairs ``indices`` in ``[chosen; rejected]`` order, zero-padded."""
        sample = self.rows[indices[0]][0]
        out = sample.new_zeros(2 * len(indices), length, sample.shape[-1])
        for row, index in enumerate(indices):
            chosen, rejected = self.rows[index]
            out[row, : chosen.shape[0]] = chosen
            out[len(indices) + row, : rejected.shape[0]] = rejected
        return out

    def ref_logps(self, indices: Sequence[int], length_norm: str) -> torch.Tensor | None:
        """The reference's sequence log-probs ``[2B]`` (``"mean"`` or ``"sum"``) of pairs ``indices``, or None."""
        if not self.ref_sums:
            return None
        values = []
        for side in (0, 1):
            for index in indices:
                total, count = self.ref_sums[index][side], self.ref_counts[index][side]
                values.append(total / max(count, 1) if length_norm == "mean" else total)
        return torch.tensor(values, dtype=torch.float32)


class MetricsWriter:
    """``metrics.jsonl`` (one object per logged step) and TensorBoard scalars when TensorBoard is installed."""

    def __init__(self, output: Path, resume_step: int | None):
        self.path = output / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():  # drop what an interrupted run logged after its checkpoint
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output / "tensorboard"))
        except Exception:  # TensorBoard is optional
            self.tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _build_model(cfg: RMConfig, param_dtype: torch.dtype, device: torch.device):
    train_head = cfg.sft_weight != 0 or (cfg.margin in NAMED_GAMMA and not cfg.detach_margin)
    if is_reward_model_dir(cfg.model):
        model, tokenizer, _ = load_reward_model(
            cfg.model, dtype=param_dtype, trainable_layers=cfg.trainable_layers, train_lm_head=train_head
        )
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        lm = load_causal_lm(cfg.model, dtype=param_dtype)
        model = RewardModel(lm, trainable_layers=cfg.trainable_layers, train_lm_head=train_head)
    disable_dropout(model)
    return model.to(device), tokenizer


def _load_data(cfg: RMConfig):
    data = load_preferences(
        cfg.data,
        split=cfg.data_split,
        subset_field=cfg.subset_field,
        skip_invalid=cfg.skip_invalid,
        limit=cfg.max_pairs,
    )
    if data.skipped:
        _log(f"skipped {data.skipped} invalid records of {cfg.data}; first: {data.skip_reasons[0]}")
    if cfg.eval_data:
        dev = load_preferences(cfg.eval_data, subset_field=cfg.subset_field, skip_invalid=cfg.skip_invalid).pairs
        train = data.pairs
    elif cfg.dev_fraction > 0:
        train, dev = split_by_prompt(data.pairs, cfg.dev_fraction)
    else:
        train, dev = data.pairs, []
    if cfg.margin == "fixed":
        missing = [p.origin for p in train if p.margin is None]
        if missing:
            raise ValueError(f"margin='fixed' needs a 'margin' field in every pair; {missing[0]} has none")
    return train, dev


def micro_batch_indices(n_pairs: int, batch_size: int, seed: int, index: int) -> tuple[int, list[int]]:
    """``(epoch, pair indices)`` of global micro-batch ``index``: epoch ``e`` visits the pairs in the order of a
    permutation seeded by ``(seed, e)``, in full batches (the ragged tail of an epoch is dropped)."""
    per_epoch = n_pairs // batch_size
    epoch, position = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator)
    return epoch, order[position * batch_size : (position + 1) * batch_size].tolist()


def train_reward_model(cfg: RMConfig) -> dict[str, Any]:
    """Run the RM stage; returns the summary (also written to ``output/summary.json``)."""
    from transformers import get_cosine_schedule_with_warmup

    cfg.validate()
    started = time.time()
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    ctx = dist_utils.setup(cfg.strategy, resolve_device(cfg.device))
    device = ctx.device
    if cfg.cache_trunk and ctx.distributed and cfg.strategy == "fsdp2":
        raise ValueError("cache_trunk runs the trunk outside the FSDP2 root; use --strategy ddp with it")
    param_dtype, autocast_dtype = precision(cfg.dtype, device)
    seed_everything(cfg.seed)

    model, tokenizer = _build_model(cfg, param_dtype, device)
    if device.type == "cuda" and cfg.liger:
        apply_liger(model.lm)
    pad_token_id = choose_pad_token_id(tokenizer)
    reference = ReferenceModel(model) if cfg.needs_reference else None

    train_pairs, dev_pairs = _load_data(cfg)
    encoder = PairEncoder(tokenizer, cfg.max_length)
    train_encoded, stats = encoder.encode_all(train_pairs)
    dev_encoded, _ = encoder.encode_all(dev_pairs)
    _log(f"data: {len(train_encoded)} train / {len(dev_encoded)} dev pairs from {cfg.data}; {stats.describe()}")
    global_batch = cfg.batch_size * ctx.world  # pairs per micro-batch over all ranks
    if len(train_encoded) < global_batch:
        raise ValueError(f"{len(train_encoded)} training pairs is fewer than --batch-size x ranks {global_batch}")

    per_epoch = len(train_encoded) // global_batch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    warmup = int(round(cfg.warmup_ratio * total_steps))
    loss_fn = AAMLoss(
        margin=cfg.margin,
        beta=cfg.beta,
        gamma=cfg.gamma,
        length_norm=cfg.length_norm,
        detach_margin=cfg.detach_margin,
        margin_clip=cfg.margin_clip,
        sft_weight=cfg.sft_weight,
        center_rewards=cfg.center_rewards,
        backend=cfg.backend,
    )

    def micro_batch_loss(model: RewardModel, batch: dict[str, Any]):
        """``(AAMOutput, rewards [2B])`` of one micro-batch: the root module's forward under DDP/FSDP2."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with _autocast(device, autocast_dtype):
            if cfg.packing:
                from .packing import packed_reward_forward

                out = packed_reward_forward(model, batch, reference=step_reference)
            else:
                out = model(input_ids, attention_mask, reference=step_reference, trunk_hidden=batch["trunk"])
        hidden = weight = bias = ref_hidden = ref_weight = ref_bias = None
        if cfg.needs_logps:
            hidden, weight, bias = head_inputs(
                out.hidden[:, :-1], model.lm_head_weight, model.lm_head_bias, autocast_dtype
            )
        if out.ref_hidden is not None:
            ref_hidden, ref_weight, ref_bias = head_inputs(
                out.ref_hidden[:, :-1], reference.lm_head_weight, reference.lm_head_bias, autocast_dtype
            )
        result = loss_fn(
            hidden,
            weight,
            labels[:, 1:] if cfg.needs_logps else None,
            out.rewards,
            ref_logps=batch["ref_logps"],
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            data_margin=batch["margin"],
            bias=bias,
            ref_bias=ref_bias,
        )
        return result, out.rewards.detach().clone()  # a fresh tensor: FSDP2 warns on returned views

    checkpoints = output / "checkpoints"
    resume_from = find_resume_checkpoint(cfg.resume, checkpoints)
    single_process_state = None
    if resume_from is not None and not (resume_from / dist_utils.DCP_FOLDER).is_dir():
        # A single-process checkpoint: its weights go into the plain model, before FSDP2 shards it (any world size).
        single_process_state = torch.load(resume_from / TRAINER_STATE, weights_only=False)
        load_weights(model, resume_from)
    engine = ctx.wrap(model, micro_batch_loss, compute_dtype=autocast_dtype)  # FSDP2 shards `model` in place
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")]
    groups = [{"params": trainable, "lr": cfg.lr}, {"params": [model.score.weight], "lr": cfg.score_lr or cfg.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    metadata = {
        "base_model": cfg.model,
        "max_length": cfg.max_length,
        "training": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "resume")},
    }

    step = 0
    if resume_from is not None:
        if single_process_state is None:  # DCP: resharded onto this run's ranks (one process included)
            state, rng = ctx.load_checkpoint(resume_from, engine, optimizer, state_file=TRAINER_STATE)
        else:
            state = single_process_state
            ctx.load_optimizer_state(engine, optimizer, state["optimizer"])
            rng = state["rng"] if ctx.world == 1 else None
        # Written before global_batch was recorded: a single-process checkpoint, whose batch_size is its global one.
        saved_batch = state.get("global_batch", state["config"]["batch_size"])
        if saved_batch != global_batch:
            raise ValueError(
                f"{resume_from} was written with {saved_batch} pairs per micro-batch over all ranks; this run has "
                f"{global_batch} (--batch-size {cfg.batch_size} x {ctx.world} ranks): keep batch-size x ranks the same"
            )
        if rng is not None:  # per-rank RNG states carry over only to the same number of ranks
            _set_rng_state(rng)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if state["total_steps"] != total_steps:
            raise ValueError(
                f"{resume_from} was written by a run of {state['total_steps']} steps; this one has {total_steps}"
            )
        _log(f"resumed from {resume_from} at step {step}")
    writer = ctx.writer(lambda: MetricsWriter(output, step if resume_from is not None else None))
    _log(
        f"training {cfg.margin} reward model: {total_steps} steps x {cfg.grad_accum} x {cfg.batch_size} pairs, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, device {device}"
        + (f", {ctx.world} ranks ({cfg.strategy})" if ctx.distributed else "")
    )

    trunk_cache = None
    if cfg.cache_trunk:
        trunk_cache = TrunkCache(
            model,
            train_encoded,
            pad_token_id,
            batch_size=cfg.eval_batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            progress=cfg.progress,
            reference=reference,
            backend=cfg.backend,
        )
    step_reference = None if trunk_cache is not None else reference
    last_checkpoint = list_checkpoints(checkpoints)[-1] if list_checkpoints(checkpoints) else None
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"train-rm {cfg.margin}",
        disable=not cfg.progress or not ctx.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def run_eval(at_step: int) -> dict[str, Any] | None:
        if not dev_encoded:
            return None
        report = evaluate_pairs(
            dist_utils.ScoringView(engine, model) if ctx.distributed else model,
            dev_encoded,
            pad_token_id,
            batch_size=cfg.eval_batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        record = {
            "step": at_step,
            "eval/accuracy": report["accuracy"],
            "eval/length_baseline": report["length_baseline"],
            "eval/reward_gap_mean": report["reward_gap"]["mean"],
            "eval/num_pairs": report["num_pairs"],
        }
        writer.write(record)
        evals.append(record)
        _log(
            f"step {at_step}: eval accuracy {report['accuracy']:.4f} (length baseline "
            f"{report['length_baseline']:.4f}, {report['num_pairs']} pairs)"
        )
        return report

    try:
        while step < total_steps:
            sums: dict[str, float] = defaultdict(float)
            gaps, margins, chosen_r, rejected_r = [], [], [], []
            optimizer.zero_grad(set_to_none=True)
            for micro in range(cfg.grad_accum):
                index = step * cfg.grad_accum + micro
                _, ids = micro_batch_indices(len(train_encoded), global_batch, cfg.seed, index)
                ids = ctx.shard(ids)
                batch = collate_pairs([train_encoded[i] for i in ids], pad_token_id)
                if cfg.packing:
                    from .packing import add_packing

                    add_packing(batch)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch["trunk"] = batch["ref_logps"] = None
                if trunk_cache is not None:
                    batch["trunk"] = trunk_cache.batch(ids, batch["input_ids"].shape[1])
                    ref_logps = trunk_cache.ref_logps(ids, cfg.length_norm)
                    batch["ref_logps"] = None if ref_logps is None else ref_logps.to(device)
                with ctx.no_sync(engine, micro == cfg.grad_accum - 1):
                    result, rewards = engine(batch)
                if not torch.isfinite(result.loss):
                    raise TrainingDiverged(
                        f"non-finite loss ({result.loss.item()}) at step {step + 1} (micro-batch {micro + 1}); "
                        f"stopping. Last good checkpoint: {last_checkpoint or 'none'}"
                    )
                with ctx.no_sync(engine, micro == cfg.grad_accum - 1):
                    (result.loss / cfg.grad_accum).backward()
                sums["loss"] += result.loss.item() / cfg.grad_accum
                gaps.append(result.reward_gap)
                margins.append(result.margin)
                half = rewards.shape[0] // 2
                chosen_r.append(rewards[:half].detach())
                rejected_r.append(rewards[half:].detach())
            grad_norm = ctx.clip_grad_norm([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"non-finite gradient norm at step {step + 1}; stopping. "
                    f"Last good checkpoint: {last_checkpoint or 'none'}"
                )
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1

            # Metrics over every rank, reduced by counts (sums and example counts, never means of means).
            gap = torch.cat(gaps).float()
            margin_mean, margin_std = ctx.mean_std(torch.cat(margins).float())
            record = {
                "step": step,
                "epoch": step * cfg.grad_accum / per_epoch,
                "loss": ctx.weighted_mean(sums["loss"], gap.numel()),
                "accuracy": ctx.mean_std((gap > 0).float())[0],
                "margin/mean": margin_mean,
                "margin/std": margin_std,
                "reward_gap/mean": ctx.mean_std(gap)[0],
                "rewards/chosen": ctx.mean_std(torch.cat(chosen_r).float())[0],
                "rewards/rejected": ctx.mean_std(torch.cat(rejected_r).float())[0],
                "grad_norm": grad_norm.item(),
                "learning_rate": learning_rate,
            }
            writer.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")

            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval(step)
            if cfg.save_every and step % cfg.save_every == 0:
                trainer_state = {
                    "step": step,
                    "total_steps": total_steps,
                    "micro_batches": step * cfg.grad_accum,
                    "epoch": record["epoch"],
                    "loss": record["loss"],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "config": dataclasses.asdict(cfg),
                    "global_batch": global_batch,
                }
                if ctx.distributed:
                    rng = trainer_state.pop("rng")
                    del trainer_state["optimizer"]  # in the sharded DCP checkpoint
                    last_checkpoint = ctx.save_checkpoint(
                        checkpoints,
                        f"{CHECKPOINT_PREFIX}{step:08d}",
                        engine,
                        optimizer,
                        trainer_state,
                        rng,
                        state_file=TRAINER_STATE,
                        keep=cfg.keep_checkpoints,
                        list_checkpoints=list_checkpoints,
                    )
                else:
                    last_checkpoint = save_checkpoint(
                        checkpoints, step, model, tokenizer, trainer_state, metadata, cfg.keep_checkpoints
                    )
    finally:
        bar.close()
        writer.close()

    final_report = run_eval(step)
    metadata["final_eval"] = (
        None if final_report is None else {k: final_report[k] for k in ("accuracy", "length_baseline", "num_pairs")}
    )
    ctx.export_reward_model(engine, model, lambda m: save_reward_model(m, tokenizer, output, metadata=metadata))
    summary = {
        "output": str(output),
        "margin": cfg.margin,
        "steps": step,
        "train_pairs": len(train_encoded),
        "dev_pairs": len(dev_encoded),
        "seconds": round(time.time() - started, 1),
        "final_train": history[-1] if history else None,
        "eval": final_report,
        "truncation": dataclasses.asdict(stats),
    }
    if ctx.is_main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(_format_summary(summary))
    ctx.close()
    return summary


def _format_summary(summary: dict[str, Any]) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['seconds']} s; model saved to {summary['output']}"]
    train = summary.get("final_train")
    if train:
        lines.append(f"last step: loss {train['loss']:.4f} accuracy {train['accuracy']:.3f}")
    if summary.get("eval"):
        lines.append("dev: " + format_report(summary["eval"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "") else int(value)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-rm`` flags (also reused by the demo)."""
    defaults = RMConfig(model="", data="", output="")
    g = parser.add_argument_group("data")
    g.add_argument("--model", required=True, help="causal LM (folder or hub name) or a saved reward model folder")
    g.add_argument("--data", required=True, help="preference file (.json/.jsonl/.parquet[.gz]) or dataset name")
    g.add_argument("--eval-data", default=None, help="separate dev file (default: a prompt-hash split of --data)")
    g.add_argument("--data-split", default=defaults.data_split, help="split for a `datasets` source")
    g.add_argument(
        "--dev-fraction",
        type=float,
        default=defaults.dev_fraction,
        help="fraction of prompts held out for dev by a stable hash (0: none)",
    )
    g.add_argument("--subset-field", default=None, help="record field giving per-subset dev accuracy")
    g.add_argument("--skip-invalid", action="store_true", help="skip and count bad records instead of failing")
    g.add_argument("--max-pairs", type=int, default=None, help="read at most this many pairs")
    g.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="tokens per sequence; longer prompts are cut from the left",
    )
    g = parser.add_argument_group("loss")
    g.add_argument("--margin", choices=MARGINS, default=defaults.margin)
    g.add_argument("--beta", type=float, default=defaults.beta)
    g.add_argument("--gamma", type=float, default=None, help="overrides the named setting (pr: 1, ld: 0)")
    g.add_argument("--length-norm", choices=("mean", "sum"), default=defaults.length_norm)
    g.add_argument(
        "--no-detach-margin",
        dest="detach_margin",
        action="store_false",
        help="train through the margin (default: detached)",
    )
    g.add_argument("--margin-clip", type=float, default=None)
    g.add_argument("--sft-weight", type=float, default=defaults.sft_weight)
    g.add_argument("--center-rewards", type=float, default=defaults.center_rewards)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per micro-batch")
    g.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--score-lr", type=float, default=None, help="learning rate of the score head (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    g.add_argument("--epochs", type=float, default=defaults.epochs)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument(
        "--trainable-layers",
        type=_optional_int,
        default=None,
        help="train only the top K decoder layers (+ final norm, score head); the trunk is shared",
    )
    g.add_argument(
        "--cache-trunk",
        action="store_true",
        help="with --trainable-layers: compute the frozen trunk once per sequence and reuse it every epoch "
        "(memory: 2 x pairs x tokens x hidden size)",
    )
    g.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default=defaults.dtype,
        help="auto: float32 weights, bf16 autocast on CUDA; otherwise the parameter dtype",
    )
    g.add_argument("--device", default=defaults.device)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--no-liger", dest="liger", action="store_false", help="skip Liger-Kernel patches on CUDA")
    g.add_argument("--backend", default=defaults.backend, help="linear_logprobs backend")
    g.add_argument(
        "--strategy",
        choices=dist_utils.STRATEGIES,
        default=defaults.strategy,
        help="under torchrun (WORLD_SIZE>1): ddp replicates the model, fsdp2 shards it per decoder layer",
    )
    g.add_argument(
        "--packing",
        action="store_true",
        help="padding-free batches: sequences concatenated, position_ids restarting (flash-attn varlen or SDPA)",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--output", required=True, help="folder for the final model, metrics and checkpoints")
    g.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between dev evaluations")
    g.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    g.add_argument("--resume", default=None, help="'auto' (latest under OUTPUT/checkpoints) or a checkpoint")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args: argparse.Namespace) -> RMConfig:
    return RMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RMConfig) if hasattr(args, f.name)})


def _train_command(args: argparse.Namespace) -> int:
    try:
        train_reward_model(config_from_args(args))
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def evaluate_folder(
    model_dir: str,
    data: str,
    *,
    subset_field: str | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    dev_fraction: float | None = None,
    data_split: str = "train",
    skip_invalid: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """``eval-rm``: score every pair of ``data`` (or only its prompt-hash dev part) with a saved reward model."""
    device_ = resolve_device(device)
    param_dtype, autocast_dtype = precision(dtype, device_)
    model, tokenizer, metadata = load_reward_model(model_dir, dtype=param_dtype, device=device_)
    pad_token_id = choose_pad_token_id(tokenizer)
    loaded = load_preferences(data, split=data_split, subset_field=subset_field, skip_invalid=skip_invalid)
    pairs = loaded.pairs
    if dev_fraction:
        _, pairs = split_by_prompt(pairs, dev_fraction)
    encoder = PairEncoder(tokenizer, max_length or metadata.get("max_length"))
    encoded, stats = encoder.encode_all(pairs)
    report = evaluate_pairs(
        model,
        encoded,
        pad_token_id,
        batch_size=batch_size,
        device=device_,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    report.update(
        model=str(model_dir),
        data=str(data),
        max_length=encoder.max_length,
        skipped=loaded.skipped,
        truncation=dataclasses.asdict(stats),
    )
    return report


def _eval_command(args: argparse.Namespace) -> int:
    report = evaluate_folder(
        args.model,
        args.data,
        subset_field=args.subset_field,
        max_length=args.max_length,
        batch_size=args.batch_size,
        dev_fraction=args.dev_fraction,
        data_split=args.data_split,
        skip_invalid=args.skip_invalid,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def add_parser(subparsers) -> None:
    """Register ``train-rm`` and ``eval-rm``."""
    train = subparsers.add_parser(
        "train-rm",
        help="train an AAM reward model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_arguments(train)
    train.set_defaults(func=_train_command)

    evaluate = subparsers.add_parser(
        "eval-rm",
        help="pairwise accuracy of a saved reward model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("--model", required=True, help="saved reward model folder")
    evaluate.add_argument("--data", required=True, help="preference file or dataset name")
    evaluate.add_argument("--subset-field", default=None, help="record field for per-subset accuracy")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    evaluate.add_argument("--max-length", type=int, default=None, help="default: the training max length")
    evaluate.add_argument("--batch-size", type=int, default=8, help="pairs per forward (fixed)")
    evaluate.add_argument(
        "--dev-fraction", type=float, default=None, help="evaluate only the prompt-hash dev part that train-rm held out"
    )
    evaluate.add_argument("--data-split", default="train")
    evaluate.add_argument("--skip-invalid", action="store_true")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    evaluate.add_argument("--no-progress", dest="progress", action="store_false")
    evaluate.set_defaults(func=_eval_command)
