"""The GRPO stage's trainer (``aam-fast train-grpo``): a policy learns from the AAM reward model (and optional rule
rewards) with group-relative advantages.

One optimizer step uses ``batch_size × grad_accum`` prompts per rank, each sampled ``num_generations`` (G) times
(:mod:`.rollout`). The rollout is scored (:mod:`.rewards`), turned into advantages per group of G
(:func:`aam_fast.group_advantages`) and reused for ``num_iterations`` optimizer steps; when it is reused, the policy's
token log-probs at rollout time are kept as ``old_logps``. The reference policy (a frozen copy of the initial policy,
only when ``beta != 0``) and the old policy are scored forward-only through the fused op on the final hidden states.
The loss is :class:`aam_fast.GRPOLoss`, whose normaliser is counted over the whole optimizer step (every rank's
micro-batches) before the micro-batch loop, so gradient accumulation is exact. The step is the shared checked one
(:func:`aam_fast.training.optim.optimizer_step`): a non-finite loss or gradient norm stops the run with
:class:`~aam_fast.training.TrainingDiverged` before anything is applied.

Under ``torchrun --nproc_per_node N -m aam_fast train-grpo --strategy ddp|fsdp2`` each rank samples its slice of every
micro-batch's ``batch_size × N`` prompts, each completion from its own seed (:mod:`.sampling`), so N ranks sample
what one process with the combined batch samples; advantages and metrics cover every rank; FSDP2 gathers the policy
once per rollout for generation.

``--output DIR`` ends holding the final policy as a ``save_pretrained`` folder (tokenizer included),
``metrics.jsonl`` (TRL's metric names, and each step's wall seconds per phase as ``timing/*``: :mod:`.stats`),
``completions.jsonl`` (sampled completions with their rewards and advantages every ``log_completions_every`` steps)
and ``checkpoints/checkpoint-<step>/`` (the shared format of
:mod:`aam_fast.training.checkpoints`: the policy, optimizer, scheduler, RNG states, data position and an unfinished
rollout; exact resume, on another number of ranks too when ``batch_size × ranks`` is unchanged).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...data import IGNORE_INDEX, load_prompts
from ...losses import GRPOLoss, default_normalizer, group_advantages
from ...modeling.heads import head_inputs, lm_head_of
from ...modeling.layers import backbone_of
from ...modeling.lora import adapters_disabled
from ...modeling.reference import frozen_copy
from ...training import checkpoints
from ...training.launch import build_engine, launch
from ...training.metrics import JsonlTable, MetricsWriter
from ...training.optim import check_loss, optimizer_step
from ...training.runtime import (
    TrainingDiverged,
    add_configured_lora,
    apply_liger,
    autocast,
    capture_rng,
    log,
)
from .config import GRPOConfig
from .policy import (
    eos_token_ids,
    generation_config,
    load_policy,
    load_policy_weights,
    tied_names,
    train_policy_top_layers,
    write_policy,
)
from .rewards import RewardSources, completions_for_fns
from .rollout import MicroBatch, PromptStream, completion_hidden, generate_micro_batch, token_logprobs
from .sampling import completion_seed
from .stats import PhaseTimer, completion_rows, merge_stats, rollout_metrics, step_metrics

# train-grpo's settings a resumed run may change beside the shared ones (training.checkpoints.RESUME_FREE): how long
# it runs, how often it logs samples, the reward model's scoring batch, and the prompt source (their count is checked).
RESUME_FREE = frozenset({"max_steps", "log_completions_every", "rm_batch_size", "prompts"})
STAGE = "grpo"
# The settings that define the loss (GRPOLoss's keyword arguments).
LOSS_SETTINGS = ("epsilon", "epsilon_high", "beta", "kl", "entropy_coef", "loss_type", "temperature", "backend")


class GRPOTrainer:
    """Holds the policy, its frozen reference, the optimizer and the rollout buffer; :meth:`train` runs the loop."""

    def __init__(self, cfg: GRPOConfig, scorer: Callable | None = None):
        self.cfg = cfg
        inputs = {"--policy": cfg.policy, "--reward-model": cfg.reward_model, "--scenes": cfg.scenes}
        if isinstance(cfg.prompts, str):
            inputs["--prompts"] = cfg.prompts
        run = launch(cfg, inputs)
        self.ctx, self.device, self.amp_dtype, self.output = run.ctx, run.device, run.amp_dtype, run.output
        self.records = self._load_records()
        self._build_policy()
        if scorer is None and cfg.reward_model is not None:
            from ...modeling.scorer import RewardScorer

            scorer = RewardScorer(
                cfg.reward_model,
                device=self.device,
                dtype=self.amp_dtype,
                max_length=cfg.rm_max_length,
                batch_size=cfg.rm_batch_size,
                packing=cfg.packing,
                **cfg.load_kwargs(),
            )
        self.rewards = RewardSources(scorer, cfg.reward_fns, cfg.reward_weights)
        self.timer = PhaseTimer(self.device)  # this step's seconds per phase (stats.TIMING_PHASES)
        self.loss_fn = GRPOLoss(
            **{name: getattr(cfg, name) for name in LOSS_SETTINGS},
            max_completion_length=cfg.max_new_tokens,
        )
        built = build_engine(
            run, cfg, self.policy, self._micro_batch_loss, load_policy_weights, self._trainable, cfg.max_steps
        )
        self.engine, self.optimizer, self.scheduler = built.engine, built.optimizer, built.scheduler
        checkpoint = built.checkpoint
        self.step, self.iteration, self.num_tokens = 0, 0, 0  # num_tokens: prompt + completion tokens, every rank
        self.stream = PromptStream(self.records, cfg.seed)
        self.rollout: list[MicroBatch] | None = None
        self.rollout_metrics: dict[str, float | None] = {}
        self.last_checkpoint = checkpoint
        if checkpoint is not None:
            self._resume(checkpoint)
        resumed = self.step if checkpoint is not None else None
        self.metrics_log = self.ctx.writer(lambda: MetricsWriter(self.output, cfg.report_to, resumed))
        self.completions_log = self.ctx.writer(lambda: JsonlTable(self.output / "completions.jsonl", resumed))

    # -- setup ------------------------------------------------------------------------------------------------

    def _load_records(self) -> list[dict]:
        cfg = self.cfg
        if isinstance(cfg.prompts, str):
            records = load_prompts(
                cfg.prompts,
                scenes=cfg.scenes,
                opening_turn=cfg.opening_turn,
                split=cfg.data_split,
                prompt_key=cfg.prompt_key,
            )
        else:
            records = list(cfg.prompts)
        if not records:
            raise ValueError("--prompts: no prompt records")
        return records[: cfg.max_prompts] if cfg.max_prompts else records

    def _build_policy(self) -> None:
        """The policy (Liger patches where they apply), its frozen reference (the initial weights, when
        ``beta != 0``), the trainable layers, the EOS ids and the sampling settings."""
        cfg = self.cfg
        self.policy, self.tokenizer = load_policy(
            cfg.policy, self.device, load_kwargs=cfg.load_kwargs(), gradient_checkpointing=cfg.gradient_checkpointing
        )
        self.liger = apply_liger(self.policy, self.device, cfg.liger)
        log(f"Liger-Kernel: {self.liger}")
        self.tied = tied_names(self.policy)
        # With LoRA the reference is the policy with its adapters disabled (no copy), scored while sampling.
        self.adapter_reference = cfg.beta != 0 and cfg.lora_r > 0
        self.reference = frozen_copy(self.policy) if cfg.beta != 0 and not cfg.lora_r else None
        if cfg.trainable_layers is not None:
            train_policy_top_layers(self.policy, cfg.trainable_layers)
        add_configured_lora(cfg, self.policy, backbone_of(self.policy))
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer)
        self.generation_config = generation_config(cfg, self.tokenizer, self.eos_ids)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # -- loop -------------------------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Run to ``max_steps``; returns this call's metric rows. Ends by saving the final policy to ``output``."""
        cfg = self.cfg
        rows = []
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc="grpo",
            disable=not cfg.progress or not self.ctx.is_main,
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                self.timer.reset()
                if self.rollout is None or self.iteration >= cfg.num_iterations:
                    self._new_rollout()
                metrics = self.update(self.rollout)
                self.iteration += 1
                self.step += 1
                row = {"step": self.step, "epoch": self.stream.epoch, **self.rollout_metrics, **metrics}
                row["num_tokens"] = self.num_tokens
                row.update(self.timer.metrics())
                rows.append(row)
                self.metrics_log.write(row)
                bar.update(1)
                bar.set_postfix(progress_postfix(row, time.perf_counter() - started))
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.max_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
            self.metrics_log.close()
        self.save_final()
        return rows

    def _new_rollout(self) -> None:
        self.rollout, self.rollout_metrics = self.make_rollout()
        self.iteration = 0
        local = sum(float(batch.attention_mask.sum()) for batch in self.rollout)
        self.num_tokens += int(self.ctx.all_reduce_sum(torch.tensor([local])).item())
        every = self.cfg.log_completions_every
        if every and self.step % every == 0:
            rows = []
            for batch in self.rollout:  # micro-batch by micro-batch, ranks in order: one process's order
                rows += self.ctx.gather_objects(completion_rows(batch, self.step + 1, self.rewards.names))
            self.completions_log.write(rows)

    # -- rollout ----------------------------------------------------------------------------------------------

    def make_rollout(self) -> tuple[list[MicroBatch], dict[str, float | None]]:
        """Generate, score and take advantages for one optimizer step's worth of prompts.

        Each micro-batch takes ``batch_size × ranks`` prompts from the shared stream and this rank samples its
        contiguous slice in one ``generate`` call, each completion from its own ``completion_seed(seed, step,
        position, g)``, so ranks together sample what one process with the combined batch samples. Under FSDP2 the
        weights are gathered once for the whole rollout. Advantages and metrics are taken over every rank's rewards
        (gathered), as one process would."""
        cfg, ctx = self.cfg, self.ctx
        plan = self._rollout_plan()
        sampled = ctx.run_unsharded(self.engine, self.policy, lambda policy: self._sample(policy, plan))
        batches = [batch for batch, _, _ in sampled]
        totals, tables = [], []
        for batch, columns, _ in sampled:
            completion_ids = [t[t != IGNORE_INDEX].tolist() for t in batch.targets]
            completions = completions_for_fns(batch.prompts, batch.completions)
            with self.timer("scoring"):
                total, table = self.rewards(batch.prompts, completions, {**columns, "completion_ids": completion_ids})
            totals.append(total)
            tables.append(table)
        rewards = torch.cat(totals)
        local = rewards.shape[0]
        every_rank = ctx.all_gather_rows(rewards)  # whole groups, rank after rank
        advantages = group_advantages(every_rank, cfg.num_generations, scale=cfg.scale_rewards)
        advantages = advantages[ctx.rank * local : (ctx.rank + 1) * local]
        offset = 0
        for batch, table in zip(batches, tables, strict=True):
            n = batch.targets.shape[0]
            batch.rewards, batch.advantages = rewards[offset : offset + n], advantages[offset : offset + n]
            batch.reward_table = table
            offset += n
            if self.reference is not None:
                with self.timer("logprobs"):
                    batch.ref_logps = self._token_logprobs(self.reference, batch)
        metrics = rollout_metrics(
            every_rank,
            ctx.all_gather_rows(torch.cat(tables)),
            ctx.all_gather_rows(torch.cat([b.mask.sum(dim=1) for b in batches]).float()),
            ctx.all_gather_rows(torch.cat([b.truncated for b in batches]).float()),
            ctx.all_reduce_sum(torch.tensor([float(sum(cut for _, _, cut in sampled))])).item(),
            cfg.num_generations,
            self.rewards.names,
        )
        return batches, metrics

    def _rollout_plan(self) -> list[list[tuple[int, dict]]]:
        """Per micro-batch: this rank's ``(global position, prompt record)`` pairs, taken from the shared stream."""
        global_batch = self.cfg.batch_size * self.ctx.world
        plan = []
        for micro in range(self.cfg.grad_accum):
            records = self.stream.take(global_batch)
            positions = self.ctx.shard(range(micro * global_batch, (micro + 1) * global_batch))
            plan.append([(p, records[p - micro * global_batch]) for p in positions])
        return plan

    def _sample(self, policy, plan: list[list[tuple[int, dict]]]) -> list[tuple[MicroBatch, dict, int]]:
        """``(MicroBatch, columns, prompts cut)`` per micro-batch of ``plan`` (old log-probs when reused; with LoRA
        the reference's, the same full weights with the adapters off)."""
        cfg = self.cfg
        out = []
        for pairs in plan:
            seeds = [completion_seed(cfg.seed, self.step, p, g) for p, _ in pairs for g in range(cfg.num_generations)]
            records = [record for _, record in pairs]
            with self.timer("generation"):
                batch, columns, cut = generate_micro_batch(
                    policy, self.tokenizer, records, cfg, self.generation_config, self.eos_ids, self.amp_dtype, seeds
                )
            with self.timer("logprobs"):
                if cfg.num_iterations > 1:
                    batch.old_logps = self._token_logprobs(policy, batch)
                if self.adapter_reference:
                    with adapters_disabled(policy):
                        batch.ref_logps = self._token_logprobs(policy, batch)
            out.append((batch, columns, cut))
        return out

    def _token_logprobs(self, model, batch: MicroBatch) -> torch.Tensor:
        cfg = self.cfg
        copies = cfg.num_generations if cfg.generation == "shared-prefix" else None  # each prompt run once
        return token_logprobs(model, batch, cfg.temperature, self.amp_dtype, cfg.backend, cfg.packing, copies)

    # -- optimisation -----------------------------------------------------------------------------------------

    def accumulate_gradients(self, batches: list[MicroBatch]) -> tuple[float, dict[str, float]]:
        """Backward over every micro-batch of one step; ``(loss, stats)`` (:func:`.stats.merge_stats`).

        The normaliser (tokens, sequences, or sequences × max_new_tokens) is counted over all micro-batches of
        every rank before the loop, so the accumulated gradient equals the gradient of the whole step's batch in
        one piece. Under torchrun each rank's loss is its share of that one loss; DDP/FSDP2 average gradients over
        ranks, so the backward runs on ``ranks × loss`` (the sum of the shares). Loss and stats are reduced over
        ranks (sums added, ``*_min``/``*_max`` extremes by min/max)."""
        cfg, ctx = self.cfg, self.ctx
        local = sum(float(default_normalizer(b.mask.float(), cfg.loss_type, cfg.max_new_tokens)) for b in batches)
        # at least 1, as the loss's own count: a step whose every completion is empty contributes no gradient
        normalizer = max(ctx.all_reduce_sum(torch.tensor([local])).item(), 1.0)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            with ctx.no_sync(self.engine, i == len(batches) - 1):
                out = self.engine({"micro_batch": batch, "normalizer": normalizer})
                (out.loss * ctx.world).backward()
            loss_sum += float(out.loss.detach())
            merge_stats(totals, out.stats)
        if ctx.distributed:
            keys = sorted(k for k in totals if not k.endswith(("_min", "_max")))
            summed = ctx.all_reduce_sum(torch.tensor([loss_sum] + [totals[k] for k in keys])).tolist()
            loss_sum = summed[0]
            extremes = {k: v for k, v in totals.items() if k.endswith(("_min", "_max"))}
            totals = dict(zip(keys, summed[1:], strict=True))
            for key, value in sorted(extremes.items()):  # the same order on every rank: these are collectives
                low, high = ctx.min_max(torch.tensor([value]))
                totals[key] = low if key.endswith("_min") else high
        return loss_sum, totals

    def _micro_batch_loss(self, policy, inputs: dict):
        """The GRPO loss of one micro-batch (``GRPOLoss`` output): the root module's forward under DDP/FSDP2, so
        the fused op sees the full LM-head weight."""
        batch = inputs["micro_batch"]
        with autocast(self.device, self.amp_dtype):
            hidden = completion_hidden(
                policy, batch.input_ids, batch.attention_mask, batch.prompt_len, self.cfg.packing
            )
        hidden, weight, bias = head_inputs(hidden, *lm_head_of(policy), self.amp_dtype)
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

    def update(self, batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step (gradient accumulation, the checked clipped AdamW step, schedule); its metrics. A
        non-finite loss or gradient norm raises TrainingDiverged before the weights or the optimizer change."""
        with self.timer("update"):
            self.optimizer.zero_grad(set_to_none=True)
            loss, totals = self.accumulate_gradients(batches)
            check_loss(loss, self.step + 1, self.last_checkpoint)
            grad_norm, learning_rate = optimizer_step(
                self.ctx,
                self.optimizer,
                self.scheduler,
                self._trainable(),
                self.cfg.max_grad_norm,
                self.step + 1,
                self.last_checkpoint,
            )
        return step_metrics(loss, grad_norm, learning_rate, totals)

    # -- checkpoints and export -------------------------------------------------------------------------------

    def _config_record(self) -> dict:
        """The run's settings as JSON values (the prompts and reward functions, which may be Python objects, left
        out: the prompt count is checked on resume; a path given as a ``Path`` as its text)."""
        plain = (str, int, float, bool, list, type(None))
        record = {}
        for field in dataclasses.fields(self.cfg):
            value = getattr(self.cfg, field.name)
            if field.name not in ("prompts", "reward_fns"):
                record[field.name] = value if isinstance(value, plain) else str(value)
        return record

    def _check_finite_weights(self) -> None:
        """TrainingDiverged when a trainable weight is not finite (a collective): no such checkpoint is written."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self._trainable()]
        bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in local)
        total = int(self.ctx.all_reduce_sum(torch.tensor([float(bad)])).item())
        if total:
            raise TrainingDiverged(
                f"{total} non-finite trainable weights after step {self.step}; not saved. Last finite checkpoint: "
                f"{self.last_checkpoint or 'none'}"
            )

    def save_checkpoint(self) -> Path:
        """``checkpoints/checkpoint-<step>/``: the policy (``save_pretrained``), the optimizer, the scheduler, the
        data position and the config; each rank's RNG states and, mid-rollout, its unfinished rollout slice (tensors
        in ``rank<r>.pt``, prompts and texts in ``rank<r>.json``). A collective under torchrun."""
        cfg = self.cfg
        self._check_finite_weights()
        mid_rollout = self.rollout is not None and self.iteration < cfg.num_iterations
        rank_tensors, rank_json = {"rng": capture_rng()}, None
        if mid_rollout:
            parts = [batch.split_state() for batch in self.rollout]
            rank_tensors["rollout"] = [tensors for tensors, _ in parts]
            rank_json = {"rollout": [texts for _, texts in parts], "rollout_metrics": self.rollout_metrics}
        state = {
            "stage": STAGE,
            "scheduler": self.scheduler.state_dict(),
            "data": {"epoch": self.stream.epoch, "index": self.stream.index, "prompts": len(self.records)},
            "config": self._config_record(),
            "mid_rollout": mid_rollout,
            "iteration": self.iteration,
            "global_batch": cfg.batch_size * self.ctx.world,
            "num_tokens": self.num_tokens,
        }
        self.last_checkpoint = checkpoints.save_checkpoint(
            self.ctx,
            self.output / "checkpoints",
            self.step,
            write_model=lambda folder: write_policy(
                self.ctx, self.engine, self.policy, self.tokenizer, folder, self.tied
            ),
            engine=self.engine,
            optimizer=self.optimizer,
            state=state,
            rank_tensors=rank_tensors,
            rank_json=rank_json,
            keep=cfg.keep_checkpoints,
        )
        return self.last_checkpoint

    def _check_resumable(self, folder: Path, state: dict, same_ranks: bool) -> None:
        """ValueError when ``folder`` cannot continue this run: an unfinished rollout of another number of ranks,
        another ``batch_size × ranks``, another prompt count, or a changed setting that makes it another run; a
        warning for settings that change only the numerics."""
        if state["mid_rollout"] and not same_ranks:
            saved = state["world_size"]
            writer = "one process" if saved == 1 else f"{saved} ranks"
            raise ValueError(f"{folder}: saved mid-rollout by {writer}; resume it on as many")
        global_batch = self.cfg.batch_size * self.ctx.world
        if state["global_batch"] != global_batch:
            raise ValueError(
                f"{folder}: written with {state['global_batch']} prompts per micro-batch over all ranks; this run "
                f"has {global_batch} (--batch-size {self.cfg.batch_size} x {self.ctx.world} ranks): keep "
                "batch-size x ranks the same"
            )
        if state["data"]["prompts"] != len(self.records):
            raise ValueError(
                f"{folder}: saved with {state['data']['prompts']} prompts, this run has {len(self.records)}; "
                "resume with the same prompts"
            )
        changed = checkpoints.check_resume_settings(
            state["config"],
            self._config_record(),
            free=checkpoints.RESUME_FREE | RESUME_FREE,
            numerics=checkpoints.RESUME_NUMERICS | {"generation"},  # the same draws but for rounding
        )
        if changed:
            warnings.warn(f"resuming {folder} with changed settings: {', '.join(changed)}", stacklevel=4)

    def _resume(self, folder: Path) -> None:
        """Continue from ``folder`` (its weights are already in the policy): optimizer, schedule, step, data
        position and, written by as many ranks, the RNG states and an unfinished rollout. On another number of
        ranks the RNG states stay at this run's seeded start (sampling does not use them: each completion has its
        own seed)."""
        state, rank_tensors, rank_json = checkpoints.restore(
            self.ctx, folder, self.engine, self.optimizer, self.scheduler, STAGE
        )
        self._check_resumable(folder, state, same_ranks=rank_tensors is not None)
        self.step, self.num_tokens = state["step"], state.get("num_tokens", 0)
        self.stream = PromptStream(self.records, self.cfg.seed, state["data"]["epoch"], state["data"]["index"])
        if state["mid_rollout"]:
            if rank_json is None or "rollout" not in rank_tensors:
                raise ValueError(f"{folder}: saved mid-rollout, but rank {self.ctx.rank}'s rollout files are missing")
            pairs = zip(rank_tensors["rollout"], rank_json["rollout"], strict=True)
            self.rollout = [MicroBatch.from_state(tensors, texts, self.device) for tensors, texts in pairs]
            self.rollout_metrics = rank_json["rollout_metrics"]
            self.iteration = state["iteration"]
        log(f"resumed from {folder} at step {self.step}")

    def save_final(self) -> None:
        """The policy as a ``save_pretrained`` folder with its tokenizer in ``output`` (a collective)."""
        self._check_finite_weights()
        write_policy(self.ctx, self.engine, self.policy, self.tokenizer, self.output, self.tied)


def progress_postfix(row: dict, seconds: float) -> dict[str, str]:
    postfix = {"reward": f"{row['reward']:.3f}", "len": f"{row['completions/mean_length']:.1f}"}
    if "kl" in row:
        postfix["kl"] = f"{row['kl']:.4f}"
    postfix["s/step"] = f"{seconds:.1f}"
    return postfix


def train_grpo(cfg: GRPOConfig, scorer: Callable | None = None) -> list[dict]:
    """Run the GRPO stage; returns the metric rows of this call (also in ``output/metrics.jsonl``). Under torchrun
    every rank runs it; the process group is closed at the end."""
    trainer = GRPOTrainer(cfg, scorer=scorer)
    rows = trainer.train()
    trainer.ctx.close()  # not on an error: a rank that fails alone must not wait in a barrier for the others
    return rows
