"""The reward-model stage's trainer (``aam-fast train-rm``) on the shared lifecycle
(:class:`aam_fast.training.lifecycle.Trainer`), keeping only what is its own.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs on each rank, each one concatenated
``[chosen; rejected]`` forward through the :class:`~aam_fast.modeling.RewardModel` (and the frozen reference for
PR), the loss from :class:`aam_fast.AAMLoss` on the final hidden states and the LM-head weight, then the shared
checked optimizer step (AdamW, warmup and decay, clipping). The data order is a function of ``(seed, epoch)``
(:mod:`.setup`), so the position in the data is the number of micro-batches consumed; a checkpoint (the shared
format of :mod:`aam_fast.training.checkpoints`) holds the model, optimizer, scheduler, RNG states and that count,
and resuming from it continues the identical loss curve, on the same or another number of ranks when
``batch_size x ranks`` is unchanged.

``--output DIR`` ends holding the final model (a ``save_pretrained`` folder that
``AutoModelForSequenceClassification`` loads), ``metrics.jsonl`` (TRL's metric names), ``summary.json`` and
``checkpoints/checkpoint-<step>/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...data import choose_pad_token_id, collate_pairs
from ...losses import AAMLoss
from ...modeling import (
    RewardModel,
    RewardModelView,
    add_packing,
    apply_liger,
    head_inputs,
    load_reward_weights,
    make_reference,
    packed_reward_forward,
    save_reward_model,
)
from ...training.distributed import ScoringView
from ...training.lifecycle import Trainer
from ...training.optim import check_loss, optimizer_step
from ...training.run_folder import write_text_atomic
from ...training.runtime import autocast, log
from .config import RMConfig
from .evaluate import evaluate_pairs, format_report
from .reference_logps import ReferenceLogps, reference_logps_of_run
from .setup import EncodedData, build_model, count_steps, encode_data, micro_batch_indices
from .trunk_cache import TrunkCache

# The settings that define the loss (AAMLoss's keyword arguments).
LOSS_SETTINGS = (
    "margin",
    "beta",
    "gamma",
    "length_norm",
    "detach_margin",
    "margin_clip",
    "sft_weight",
    "center_rewards",
    "backend",
)


class RMTrainer(Trainer):
    """The reward model, its reference, the encoded pairs and the loss of a train-rm run; the shared lifecycle runs
    it (:meth:`run_to_end`)."""

    stage = "rm"
    examples = "pairs"
    # train-rm's settings a resumed run may change beside the shared ones, and those that change only how the same
    # numbers are computed (allowed with a log line).
    # The data's paths are free: their content is the run's identity (a fingerprint, checked on resume).
    resume_free = frozenset({"eval_every", "eval_batch_size", "skip_invalid", "data", "eval_data"})
    resume_numerics = frozenset({"cache_trunk", "precompute_ref_logps"})
    state_fields: ClassVar[dict[str, Any]] = {
        "total_steps": int,
        "micro_batches": int,
        "epoch": (int, float),
        "loss": (int, float),
    }
    cfg: RMConfig

    @property
    def eval_every(self) -> int:
        return self.cfg.eval_every

    def inputs(self) -> dict[str, str | None]:
        return {"--model": self.cfg.model, "--data": self.cfg.data, "--eval-data": self.cfg.eval_data}

    def identity(self) -> dict[str, str]:
        """The training and dev pairs by content (fingerprints of texts, order, margins and tokenisation)."""
        dev = "--eval-data" if self.cfg.eval_data else "--data (dev split)"
        return {"--data": f"fingerprint {self.train_fingerprint[:16]}", dev: f"fingerprint {self.dev_fingerprint[:16]}"}

    # -- setup ------------------------------------------------------------------------------------------------

    def build(self) -> None:
        """The model (Liger patches where they apply), its reference (the initial model, for PR), the encoded
        pairs, the step count, the precomputed reference log-probs and the loss."""
        cfg = self.cfg
        if cfg.cache_trunk and self.ctx.distributed and cfg.strategy == "fsdp2":
            raise ValueError("--cache-trunk runs the trunk outside the FSDP2 root; use --strategy ddp with it")
        self.model, self.tokenizer = self.load_model()
        self.liger = apply_liger(self.model.lm, self.device, cfg.liger)
        log(f"Liger-Kernel: {self.liger}")
        self.pad_token_id = choose_pad_token_id(self.tokenizer)
        data = self.load_data()
        self.train_encoded, self.dev_encoded, self.stats = data.train, data.dev, data.stats
        self.train_fingerprint, self.dev_fingerprint = data.train_fingerprint, data.dev_fingerprint
        self.per_epoch, self.total_steps = count_steps(cfg, len(self.train_encoded), self.global_batch)
        self.build_reference()
        self.loss_fn = AAMLoss(**{name: getattr(cfg, name) for name in LOSS_SETTINGS})

    def load_model(self) -> tuple[RewardModel, Any]:
        """The reward model and its tokenizer (:func:`.setup.build_model`)."""
        return build_model(self.cfg, self.device)

    def build_reference(self) -> None:
        """``self.reference`` (the initial model, for PR) and ``self.reference_logps``: under
        ``--precompute-ref-logps`` without the cached trunk, its response log-probs computed once and the reference
        freed (the cached trunk computes them in :meth:`prepare`)."""
        cfg = self.cfg
        self.reference = make_reference(self.model, cfg) if cfg.needs_reference else None
        self.reference_logps: ReferenceLogps | None = None
        if self.reference is not None and cfg.precompute_ref_logps and not cfg.cache_trunk:
            self.reference_logps = self._precompute_reference_logps()
            self.reference = None  # the steps read the precomputed values; a reference copy is freed here

    def load_data(self) -> EncodedData:
        return encode_data(self.cfg, self.tokenizer, progress=self.cfg.progress and self.ctx.is_main)

    def load_weights(self, model: RewardModel, folder: Path) -> None:
        load_reward_weights(model, folder)

    def param_groups(self) -> list[dict]:
        """The trained parameters, the score head in its own group (``--score-lr``)."""
        cfg, model = self.cfg, self.model
        trainable = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")]
        groups = [{"params": trainable, "lr": cfg.lr}, {"params": [model.score.weight], "lr": cfg.score_lr or cfg.lr}]
        return [g for g in groups if g["params"]]

    def _precompute_reference_logps(self) -> ReferenceLogps:
        """The reference's response log-probs of every pair this run visits (from step 0, so a resumed run
        computes the same values), before the engine wraps the model."""
        return reference_logps_of_run(
            self.cfg,
            self.model,
            self.reference,
            self.train_encoded,
            self.pad_token_id,
            ctx=self.ctx,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            global_batch=self.global_batch,
            total_steps=self.total_steps,
            progress=self.cfg.progress and self.ctx.is_main,
            note="precomputed; the reference is freed",
        )

    def prepare(self, resume_step: int | None) -> None:
        """The cached trunk (``--cache-trunk``), whose reference log-probs the steps then read."""
        self.trunk_cache = self.cache_trunk() if self.cfg.cache_trunk else None
        if self.trunk_cache is not None:
            self.reference_logps = self.trunk_cache.reference_logps
        self.evals: list[dict[str, Any]] = []

    def cache_trunk(self) -> TrunkCache:
        return TrunkCache(
            self.model,
            self.train_encoded,
            self.pad_token_id,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            progress=self.cfg.progress,
            reference=self.reference,
            backend=self.cfg.backend,
        )

    # -- loop -------------------------------------------------------------------------------------------------

    def on_train_begin(self) -> None:
        cfg = self.cfg
        log(
            f"training {cfg.margin} reward model: {self.total_steps} steps x {cfg.grad_accum} x {cfg.batch_size} "
            f"pairs, {sum(p.numel() for p in self.trainable_parameters()):,} trainable parameters, "
            f"device {self.device}" + (f", {self.ctx.world} ranks ({cfg.strategy})" if self.ctx.distributed else "")
        )
        self.model.train()

    def progress_desc(self) -> str:
        return f"train-rm {self.cfg.margin}"

    def postfix(self, record: dict[str, Any], seconds: float) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "acc": f"{record['accuracy']:.2f}"}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics, reduced over every rank."""
        cfg, ctx = self.cfg, self.ctx
        loss_sum, gaps, margins, chosen, rejected, tokens = 0.0, [], [], [], [], 0
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = self._micro_batch(self.step * cfg.grad_accum + micro)
            tokens += int(batch["attention_mask"].sum())
            with ctx.no_sync(self.engine, micro == cfg.grad_accum - 1):
                result, rewards = self.engine(batch)
                check_loss(result.loss.item(), self.step + 1, self.last_checkpoint)
                (result.loss / cfg.grad_accum).backward()
            loss_sum += result.loss.item() / cfg.grad_accum
            gaps.append(result.reward_gap)
            margins.append(result.margin)
            half = rewards.shape[0] // 2
            chosen.append(rewards[:half])
            rejected.append(rewards[half:])
        grad_norm, learning_rate = optimizer_step(
            ctx,
            self.optimizer,
            self.scheduler,
            self.trainable_parameters(),
            cfg.max_grad_norm,
            self.step + 1,
            self.last_checkpoint,
        )
        self.step += 1
        self.num_tokens += int(ctx.all_reduce_sum(torch.tensor([float(tokens)])).item())
        # Metrics over every rank, reduced by counts (sums and example counts, never means of means).
        gap = torch.cat(gaps).float()
        rewards_all = torch.cat(chosen + rejected).float()
        margin_mean, margin_std = ctx.mean_std(torch.cat(margins).float())
        reward_min, reward_max = ctx.min_max(rewards_all)
        return {
            "step": self.step,
            "epoch": self.step * cfg.grad_accum / self.per_epoch,
            "loss": ctx.weighted_mean(loss_sum, gap.numel()),
            "accuracy": ctx.mean_std((gap > 0).float())[0],
            "margin": ctx.mean_std(gap)[0],  # TRL's RewardTrainer name for the reward gap r_c - r_r
            "rewards/margins": ctx.mean_std(gap)[0],  # the same gap under TRL's preference trainers' name
            "aam_margin/mean": margin_mean,
            "aam_margin/std": margin_std,
            "rewards/chosen": ctx.mean_std(torch.cat(chosen).float())[0],
            "rewards/rejected": ctx.mean_std(torch.cat(rejected).float())[0],
            "min_reward": reward_min,
            "mean_reward": ctx.mean_std(rewards_all)[0],
            "max_reward": reward_max,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "num_tokens": self.num_tokens,
        }

    def _micro_batch(self, index: int) -> dict[str, Any]:
        """This rank's slice of global micro-batch ``index``, collated on the device (trunk and reference
        log-probs from the cache when there is one)."""
        _, ids = micro_batch_indices(len(self.train_encoded), self.global_batch, self.cfg.seed, index)
        ids = self.ctx.shard(ids)
        batch = collate_pairs([self.train_encoded[i] for i in ids], self.pad_token_id)
        if self.cfg.packing:
            add_packing(batch)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["trunk"] = batch["ref_logps"] = None
        if self.trunk_cache is not None:
            batch["trunk"] = self.trunk_cache.batch(ids, batch["input_ids"].shape[1])
        if self.reference_logps is not None:
            batch["ref_logps"] = self.reference_logps.batch(ids, self.cfg.length_norm).to(self.device)
        return batch

    def _micro_batch_loss(self, model: RewardModel, batch: dict[str, Any]):
        """``(AAMOutput, rewards [2B])`` of one micro-batch: the root module's forward under DDP/FSDP2, so the fused
        op sees the full LM-head weight."""
        cfg, reference = self.cfg, self.reference
        step_reference = None if self.reference_logps is not None else reference
        with autocast(self.device, self.amp_dtype):
            if cfg.packing:
                out = packed_reward_forward(model, batch, reference=step_reference)
            else:
                out = model(
                    batch["input_ids"], batch["attention_mask"], reference=step_reference, trunk_hidden=batch["trunk"]
                )
        hidden = weight = bias = ref_hidden = ref_weight = ref_bias = None
        if cfg.needs_logps:
            hidden, weight, bias = head_inputs(
                out.hidden[:, :-1], model.lm_head_weight, model.lm_head_bias, self.amp_dtype
            )
        if out.ref_hidden is not None:
            ref_hidden, ref_weight, ref_bias = head_inputs(
                out.ref_hidden[:, :-1], reference.lm_head_weight, reference.lm_head_bias, self.amp_dtype
            )
        result = self.loss_fn(
            hidden,
            weight,
            batch["labels"][:, 1:] if cfg.needs_logps else None,
            out.rewards,
            ref_logps=batch["ref_logps"],
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            data_margin=batch["margin"],
            bias=bias,
            ref_bias=ref_bias,
        )
        return result, out.rewards.detach().clone()  # a fresh tensor: FSDP2 warns on returned views

    # -- evaluation, checkpoints, export -------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any] | None:
        """Dev accuracy at the current step (logged), or None without dev pairs."""
        if not self.dev_encoded:
            return None
        report = evaluate_pairs(
            ScoringView(self.engine, self.model) if self.ctx.distributed else self.model,
            self.dev_encoded,
            self.pad_token_id,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
        )
        record = {
            "step": self.step,
            "eval_loss": report["bt_loss"],
            "eval_accuracy": report["accuracy"],
            "eval_length_baseline": report["length_baseline"],
            "eval_margin": report["reward_gap"]["mean"],
            "eval_num_pairs": report["num_pairs"],
        }
        self.writer.write(record)
        self.evals.append(record)
        log(
            f"step {self.step}: eval accuracy {report['accuracy']:.4f} (length baseline "
            f"{report['length_baseline']:.4f}, {report['num_pairs']} pairs)"
        )
        return report

    def _metadata(self) -> dict[str, Any]:
        training = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("progress", "resume")}
        return {"base_model": self.cfg.model, "max_length": self.cfg.max_length, "training": training}

    def _write_model(self, folder: Path, metadata: dict[str, Any]) -> None:
        """``save_reward_model`` into ``folder`` on rank 0 from the full weights (a collective under torchrun)."""
        if not self.ctx.distributed:
            save_reward_model(self.model, self.tokenizer, folder, metadata=metadata)
            return
        full = self.ctx.full_state_dict(self.engine)
        if self.ctx.is_main:
            save_reward_model(RewardModelView(self.model, full, "model."), self.tokenizer, folder, metadata=metadata)
        self.ctx.barrier()

    def write_model(self, folder: Path) -> None:
        self._write_model(folder, self._metadata())

    def checkpoint_state(self, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], None]:
        """The step count and the data position (micro-batches consumed), with the step's epoch and loss."""
        state = {
            "total_steps": self.total_steps,
            "micro_batches": self.step * self.cfg.grad_accum,
            "epoch": record["epoch"],
            "loss": record["loss"],
        }
        return state, {}, None

    def restore_state(self, folder: Path, state: dict, rank_tensors: dict | None, rank_json: dict | None) -> None:
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"{folder} was written by a run of {state['total_steps']} steps; this one has {self.total_steps}"
            )

    def export(self, final_report: dict[str, Any] | None, folder: Path) -> None:
        metadata = self._metadata()
        metadata["final_eval"] = (
            None if final_report is None else {k: final_report[k] for k in ("accuracy", "length_baseline", "num_pairs")}
        )
        self._write_model(folder, metadata)

    def finish(self, history: list[dict[str, Any]], final_report: dict[str, Any] | None) -> dict[str, Any]:
        """The run's summary (also written to ``output/summary.json``)."""
        summary = {
            "output": str(self.output),
            "margin": self.cfg.margin,
            "steps": self.step,
            "train_pairs": len(self.train_encoded),
            "dev_pairs": len(self.dev_encoded),
            "seconds": round(time.time() - self.started, 1),
            "liger": self.liger,
            "final_train": history[-1] if history else None,
            "eval": final_report,
            "truncation": dataclasses.asdict(self.stats),
        }
        if self.ctx.is_main:
            write_text_atomic(self.output / "summary.json", json.dumps(summary, indent=2) + "\n")
        log(format_summary(summary))
        return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['seconds']} s; model saved to {summary['output']}"]
    train = summary.get("final_train")
    if train:
        lines.append(f"last step: loss {train['loss']:.4f} accuracy {train['accuracy']:.3f}")
    if summary.get("eval"):
        lines.append("dev: " + format_report(summary["eval"]))
    return "\n".join(lines)


def train_reward_model(cfg: RMConfig) -> dict[str, Any]:
    """Run the RM stage; returns the summary. Under torchrun every rank runs it."""
    return RMTrainer(cfg).run_to_end()
