"""The reward-model stage's trainer (``aam-fast train-rm``).

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs on each rank, each one concatenated
``[chosen; rejected]`` forward through the :class:`~aam_fast.modeling.RewardModel` (and the frozen reference for
PR), the loss from :class:`aam_fast.AAMLoss` on the final hidden states and the LM-head weight, then the shared
checked optimizer step (AdamW, warmup and decay, clipping). The data order is a function of ``(seed, epoch)``, so the
position in the data is the number of micro-batches consumed; a checkpoint (the shared format of
:mod:`aam_fast.training.checkpoints`) holds the model, optimizer, scheduler, RNG states and that count, and resuming
from it continues the identical loss curve, on the same or another number of ranks when ``batch_size x ranks`` is
unchanged.

``--output DIR`` ends holding the final model (a ``save_pretrained`` folder that
``AutoModelForSequenceClassification`` loads), ``metrics.jsonl`` (TRL's metric names), ``summary.json`` and
``checkpoints/checkpoint-<step>/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...data import (
    PairEncoder,
    choose_pad_token_id,
    collate_pairs,
    encode_pairs,
    load_train_dev,
)
from ...losses import AAMLoss
from ...modeling import (
    RewardModel,
    RewardModelView,
    add_configured_lora,
    add_packing,
    apply_liger,
    disable_dropout,
    enable_checkpointing,
    head_inputs,
    is_reward_model_dir,
    load_causal_lm,
    load_reward_model,
    load_reward_weights,
    load_tokenizer,
    make_reference,
    packed_reward_forward,
    save_reward_model,
)
from ...training import checkpoints
from ...training.distributed import ScoringView
from ...training.launch import build_engine, launch
from ...training.metrics import MetricsWriter
from ...training.optim import check_loss, optimizer_step
from ...training.runtime import autocast, capture_rng, log
from .config import RMConfig
from .evaluate import evaluate_pairs, format_report
from .reference_logps import ReferenceLogps, precompute_reference_logps
from .trunk_cache import TrunkCache

# train-rm's settings a resumed run may change beside the shared ones (training.checkpoints.RESUME_FREE), and those
# that change only how the same numbers are computed (allowed with a warning).
RESUME_FREE = frozenset({"eval_every", "eval_batch_size", "skip_invalid"})
RESUME_NUMERICS = frozenset({"cache_trunk", "precompute_ref_logps"})
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


def micro_batch_indices(n_pairs: int, batch_size: int, seed: int, index: int) -> tuple[int, list[int]]:
    """``(epoch, pair indices)`` of global micro-batch ``index``: epoch ``e`` visits the pairs in the order of a
    permutation seeded by ``(seed, e)``, in full batches (the ragged tail of an epoch is dropped)."""
    per_epoch = n_pairs // batch_size
    epoch, position = divmod(index, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator)
    return epoch, order[position * batch_size : (position + 1) * batch_size].tolist()


def pairs_visited(n_pairs: int, batch_size: int, seed: int, micro_batches: int) -> list[int]:
    """The indices of the pairs that global micro-batches ``0 .. micro_batches - 1`` visit, ascending."""
    per_epoch = n_pairs // batch_size
    if micro_batches >= per_epoch:  # a whole epoch: every pair but the epoch's dropped tail, so take them all
        return list(range(n_pairs))
    generator = torch.Generator().manual_seed(seed * 1_000_003)
    return sorted(torch.randperm(n_pairs, generator=generator)[: micro_batches * batch_size].tolist())


def build_model(cfg: RMConfig, device: torch.device) -> tuple[RewardModel, Any]:
    """The reward model (float32 master weights, dropout off) and its tokenizer, from a causal LM or a saved RM."""
    if is_reward_model_dir(cfg.model):
        model, tokenizer, _ = load_reward_model(
            cfg.model, trainable_layers=cfg.trainable_layers, train_lm_head=cfg.trains_lm_head, **cfg.load_kwargs()
        )
    else:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        lm = load_causal_lm(cfg.model, **cfg.load_kwargs())
        model = RewardModel(lm, trainable_layers=cfg.trainable_layers, train_lm_head=cfg.trains_lm_head)
    disable_dropout(model)
    add_configured_lora(cfg, model.lm, model.backbone)  # after disable_dropout: --lora-dropout applies
    if cfg.gradient_checkpointing:
        enable_checkpointing(model.lm)
    positions = getattr(model.lm.config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model's {positions} positions")
    return model.to(device), tokenizer


def load_pairs(cfg: RMConfig) -> tuple[list, list]:
    """``(train, dev)`` preference pairs of ``cfg`` (:func:`aam_fast.data.load_train_dev`)."""
    return load_train_dev(
        cfg.data,
        eval_source=cfg.eval_data,
        dev_fraction=cfg.dev_fraction,
        margin=cfg.margin,
        split=cfg.data_split,
        subset_field=cfg.subset_field,
        skip_invalid=cfg.skip_invalid,
        limit=cfg.max_pairs,
        **cfg.column_keys(),
    )


class RMTrainer:
    """Holds the reward model, its reference, the encoded pairs, the optimizer and the run's position;
    :meth:`train` runs the loop."""

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg
        self.started = time.time()
        run = launch(cfg, inputs={"--model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data})
        self.ctx, self.device, self.amp_dtype, self.output = run.ctx, run.device, run.amp_dtype, run.output
        if cfg.cache_trunk and self.ctx.distributed and cfg.strategy == "fsdp2":
            raise ValueError("--cache-trunk runs the trunk outside the FSDP2 root; use --strategy ddp with it")
        self.model, self.tokenizer = build_model(cfg, self.device)
        self.liger = apply_liger(self.model.lm, self.device, cfg.liger)
        log(f"Liger-Kernel: {self.liger}")
        self.pad_token_id = choose_pad_token_id(self.tokenizer)
        self.reference = make_reference(self.model, cfg) if cfg.needs_reference else None
        self._encode_data()
        self.reference_logps: ReferenceLogps | None = None
        if self.reference is not None and cfg.precompute_ref_logps and not cfg.cache_trunk:
            self.reference_logps = self._precompute_reference_logps()
            self.reference = None  # the steps read the precomputed values; a reference copy is freed here
        self.loss_fn = AAMLoss(**{name: getattr(cfg, name) for name in LOSS_SETTINGS})
        built = build_engine(
            run, cfg, self.model, self._micro_batch_loss, load_reward_weights, self._param_groups, self.total_steps
        )
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        checkpoint = built.checkpoint
        self.step, self.num_tokens = 0, 0  # num_tokens: attended tokens trained on so far, every rank (TRL's)
        self.last_checkpoint = checkpoint
        if checkpoint is not None:
            self._resume(checkpoint)
        resume_step = self.step if checkpoint is not None else None
        self.writer = self.ctx.writer(lambda: MetricsWriter(self.output, cfg.report_to, resume_step))
        self.trunk_cache = self._cache_trunk() if cfg.cache_trunk else None
        if self.trunk_cache is not None:
            self.reference_logps = self.trunk_cache.reference_logps
        self.evals: list[dict[str, Any]] = []

    # -- setup ------------------------------------------------------------------------------------------------

    def _encode_data(self) -> None:
        cfg = self.cfg
        train_pairs, dev_pairs = load_pairs(cfg)
        encoder = PairEncoder(self.tokenizer, cfg.max_length)
        options = {"num_proc": cfg.num_proc, "cache": cfg.tokenize_cache, "progress": cfg.progress and self.ctx.is_main}
        self.train_encoded, self.stats = encode_pairs(train_pairs, encoder, **options)
        self.dev_encoded, _ = encode_pairs(dev_pairs, encoder, **options)
        log(f"data: {len(self.train_encoded)} train / {len(self.dev_encoded)} dev pairs; {self.stats.describe()}")
        self.global_batch = cfg.batch_size * self.ctx.world  # pairs per micro-batch over all ranks
        if len(self.train_encoded) < self.global_batch:
            raise ValueError(
                f"{len(self.train_encoded)} training pairs is fewer than --batch-size x ranks {self.global_batch}"
            )
        self.per_epoch = len(self.train_encoded) // self.global_batch
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.per_epoch / cfg.grad_accum))

    def _param_groups(self) -> list[dict]:
        """The trained parameters, the score head in its own group (``--score-lr``)."""
        cfg, model = self.cfg, self.model
        trainable = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")]
        groups = [{"params": trainable, "lr": cfg.lr}, {"params": [model.score.weight], "lr": cfg.score_lr or cfg.lr}]
        return [g for g in groups if g["params"]]

    def _precompute_reference_logps(self) -> ReferenceLogps:
        """The reference's response log-probs of every pair this run visits (from step 0, so a resumed run
        computes the same values), before the engine wraps the model."""
        cfg = self.cfg
        visited = pairs_visited(len(self.train_encoded), self.global_batch, cfg.seed, self.total_steps * cfg.grad_accum)
        store = precompute_reference_logps(
            self.model,
            self.reference,
            self.train_encoded,
            visited,
            self.pad_token_id,
            ctx=self.ctx,
            batch_size=cfg.eval_batch_size,
            device=self.device,
            autocast_dtype=self.amp_dtype,
            backend=cfg.backend,
            progress=cfg.progress and self.ctx.is_main,
        )
        log(f"reference log-probs of {len(visited)} pairs precomputed in {store.seconds:.1f} s; the reference is freed")
        return store

    def _cache_trunk(self) -> TrunkCache:
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

    def train(self) -> dict[str, Any]:
        """Run to the last step; returns the summary (also written to ``output/summary.json``)."""
        cfg = self.cfg
        log(
            f"training {cfg.margin} reward model: {self.total_steps} steps x {cfg.grad_accum} x {cfg.batch_size} "
            f"pairs, {sum(p.numel() for p in self.model.parameters() if p.requires_grad):,} trainable parameters, "
            f"device {self.device}" + (f", {self.ctx.world} ranks ({cfg.strategy})" if self.ctx.distributed else "")
        )
        history: list[dict[str, Any]] = []
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train-rm {cfg.margin}",
            disable=not cfg.progress or not self.ctx.is_main,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                self.writer.write(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint(record)
        finally:
            bar.close()
            self.writer.close()
        final_report = self.evaluate()
        self.export(final_report)
        return self._summary(history, final_report)

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
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm, learning_rate = optimizer_step(
            ctx, self.optimizer, self.scheduler, params, cfg.max_grad_norm, self.step + 1, self.last_checkpoint
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

    def save_checkpoint(self, record: dict[str, Any]) -> Path:
        state = {
            "stage": "rm",
            "total_steps": self.total_steps,
            "micro_batches": self.step * self.cfg.grad_accum,
            "epoch": record["epoch"],
            "loss": record["loss"],
            "global_batch": self.global_batch,
            "num_tokens": self.num_tokens,
            "scheduler": self.scheduler.state_dict(),
            "config": dataclasses.asdict(self.cfg),
        }
        self.last_checkpoint = checkpoints.save_checkpoint(
            self.ctx,
            self.output / "checkpoints",
            self.step,
            write_model=lambda folder: self._write_model(folder, self._metadata()),
            engine=self.engine,
            optimizer=self.optimizer,
            state=state,
            rank_tensors={"rng": capture_rng()},
            keep=self.cfg.keep_checkpoints,
        )
        return self.last_checkpoint

    def _resume(self, folder: Path) -> None:
        """Continue from ``folder`` (its weights are already in the model): optimizer, schedule, step, RNG."""
        state, _, _ = checkpoints.restore(self.ctx, folder, self.engine, self.optimizer, self.scheduler, "rm")
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{folder} was written with {state['global_batch']} pairs per micro-batch over all ranks; this run "
                f"has {self.global_batch} (--batch-size {self.cfg.batch_size} x {self.ctx.world} ranks): keep "
                "batch-size x ranks the same"
            )
        changed = checkpoints.check_resume_settings(
            state["config"],
            dataclasses.asdict(self.cfg),
            free=checkpoints.RESUME_FREE | RESUME_FREE,
            numerics=checkpoints.RESUME_NUMERICS | RESUME_NUMERICS,
        )
        if changed:
            log(f"resuming {folder} with changed settings: {', '.join(changed)} (the same run, other rounding)")
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"{folder} was written by a run of {state['total_steps']} steps; this one has {self.total_steps}"
            )
        self.step, self.num_tokens = state["step"], state.get("num_tokens", 0)
        log(f"resumed from {folder} at step {self.step}")

    def export(self, final_report: dict[str, Any] | None) -> None:
        metadata = self._metadata()
        metadata["final_eval"] = (
            None if final_report is None else {k: final_report[k] for k in ("accuracy", "length_baseline", "num_pairs")}
        )
        self._write_model(self.output, metadata)

    def _summary(self, history: list[dict[str, Any]], final_report: dict[str, Any] | None) -> dict[str, Any]:
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
            (self.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    """Run the RM stage; returns the summary. Under torchrun every rank runs it; the process group is closed at
    the end."""
    trainer = RMTrainer(cfg)
    try:
        return trainer.train()
    finally:
        trainer.ctx.close()
