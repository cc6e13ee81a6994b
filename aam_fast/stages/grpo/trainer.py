"""The GRPO stage's trainer (``aam-fast train-grpo``) on the shared lifecycle
(:class:`aam_fast.training.lifecycle.Trainer`): a policy learns from the AAM reward model (and optional rule rewards)
with group-relative advantages.

One optimizer step uses ``batch_size × grad_accum`` prompts per rank, each sampled ``num_generations`` (G) times
(:mod:`.rollout`). The rollout is scored (:mod:`.rewards`), turned into advantages per group of G
(:func:`aam_fast.group_advantages`) and reused for ``num_iterations`` optimizer steps; when it is reused, the policy's
token log-probs at rollout time are kept as ``old_logps``. The reference policy (a frozen copy of the initial policy,
only when ``beta != 0``) and the old policy are scored forward-only through the fused op on the final hidden states.
The loss is :class:`aam_fast.GRPOLoss`, whose normaliser is counted over the whole optimizer step (every rank's
micro-batches) before the micro-batch loop, so gradient accumulation is exact. The step is the shared checked one
(:func:`aam_fast.training.optim.optimizer_step`): a non-finite loss or gradient norm stops the run with
:class:`~aam_fast.training.TrainingDiverged` before anything is applied. TRL's options live in the config: the
truncation mask and dynamic sampling's left-out groups reach the loss as ignored targets
(:meth:`.rollout.MicroBatch.loss_targets`), so the normaliser counts what is trained on; ``--sync-ref-model`` mixes
the reference toward the policy after the step (:func:`aam_fast.modeling.reference.mix_reference`).

Under ``torchrun --nproc_per_node N -m aam_fast train-grpo --strategy ddp|fsdp2`` each rank samples its slice of every
micro-batch's ``batch_size × N`` prompts, each completion from its own seed (:mod:`.sampling`), so N ranks sample
what one process with the combined batch samples; advantages and metrics cover every rank; FSDP2 gathers the policy
once per rollout for generation.

``--output DIR`` ends holding the final policy (a ``save_pretrained`` folder), ``metrics.jsonl`` (TRL's names;
``timing/*`` per phase: :mod:`.stats`), ``completions.jsonl`` and ``checkpoints/`` (the shared format of
:mod:`aam_fast.training.checkpoints` plus the data position and an unfinished rollout; exact resume, on another
number of ranks too when ``batch_size × ranks`` is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...data import IGNORE_INDEX, load_prompt_records, records_fingerprint
from ...losses import GRPOLoss, default_normalizer, multi_objective_advantages
from ...losses.grpo_options import constant_groups
from ...modeling import AdaptersOff, add_configured_lora, apply_liger, check_positions, make_reference
from ...modeling.heads import head_inputs, lm_head_of
from ...modeling.layers import backbone_of
from ...modeling.reference import mix_reference
from ...training.lifecycle import Trainer
from ...training.metrics import JsonlTable
from ...training.optim import check_loss, optimizer_step
from ...training.runtime import autocast, log
from ...training.trainer_state import START_AFRESH, STATE_FILE
from .config import GRPOConfig
from .dynamic import SlotGroup, merge_groups, sample_rounds
from .policy import (
    eos_token_ids,
    generation_config,
    load_policy,
    load_policy_weights,
    load_reference,
    tied_names,
    train_policy_top_layers,
    write_policy,
    write_reference,
)
from .rewards import RewardSources, completions_for_fns
from .rollout import MicroBatch, PromptStream, completion_hidden, generate_micro_batch, token_logprobs
from .sampling import completion_seed
from .stats import PhaseTimer, completion_rows, merge_stats, progress_postfix, rollout_metrics, step_metrics

# The settings that define the loss (GRPOLoss's keyword arguments).
LOSS_SETTINGS = (
    *("epsilon", "epsilon_high", "beta", "kl", "entropy_coef", "loss_type", "temperature", "backend"),
    *("importance_sampling_level", "delta", "top_entropy_quantile"),
)


class GRPOTrainer(Trainer):
    """The policy, its frozen reference, the rewards, the prompt stream and the rollout buffer of a train-grpo run;
    the shared lifecycle runs it (:meth:`run_to_end`)."""

    stage = "grpo"
    examples = "prompts"
    # train-grpo's settings a resumed run may change beside the shared ones: how long it runs, how often it logs
    # samples, the reward model's scoring batch, and the prompt source (their count is checked).
    resume_free = frozenset({"max_steps", "log_completions_every", "rm_batch_size", "prompts"})
    resume_numerics = frozenset({"generation"})  # shared-prefix or generate: the same draws but for rounding
    unrecorded = frozenset({"prompts", "reward_fns"})  # Python objects possibly: their content is the identity
    state_fields: ClassVar[dict[str, Any]] = {"data": dict, "mid_rollout": bool, "iteration": int}
    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, scorer: Callable | None = None):
        self.scorer = scorer
        super().__init__(cfg)

    @property
    def policy(self) -> torch.nn.Module:
        return self.model

    def inputs(self) -> dict[str, str | None]:
        cfg = self.cfg
        inputs = {"--policy": cfg.policy, "--reward-model": cfg.reward_model, "--scenes": cfg.scenes}
        if isinstance(cfg.prompts, str):
            inputs["--prompts"] = cfg.prompts
        files = [spec.split(":")[0] for spec in cfg.reward_fns if isinstance(spec, str) and ":" in spec]
        for index, path in enumerate(f for f in files if f.endswith(".py")):
            inputs["--reward-fn" + (f" #{index + 1}" if index else "")] = path
        return inputs

    def identity(self) -> dict[str, str]:
        """The prompt records and every reward source by content."""
        return {"--prompts": f"fingerprint {records_fingerprint(self.records)[:16]}"} | self.rewards.identity(
            self.cfg.reward_model
        )

    # -- setup ------------------------------------------------------------------------------------------------

    def build(self) -> None:
        """The prompts, the policy and its reference, the reward sources, the loss and the prompt stream."""
        cfg = self.cfg
        self.records = load_prompt_records(
            cfg.prompts,
            scenes=cfg.scenes,
            opening_turn=cfg.opening_turn,
            split=cfg.data_split,
            prompt_key=cfg.prompt_key,
            limit=cfg.max_prompts,
        )
        self._build_policy()
        scorer = self.scorer
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
            if cfg.rm_max_length is not None:
                check_positions(scorer.model.lm.config, cfg.rm_max_length, f"--rm-max-length {cfg.rm_max_length}")
        self.rewards = RewardSources(scorer, cfg.reward_fns, cfg.reward_weights)
        self.timer = PhaseTimer(self.device)  # this step's seconds per phase (stats.TIMING_PHASES)
        self.loss_fn = GRPOLoss(
            **{name: getattr(cfg, name) for name in LOSS_SETTINGS},
            max_completion_length=cfg.max_new_tokens,
        )
        self.total_steps = cfg.max_steps
        self.iteration = 0
        self.stream = PromptStream(self.records, cfg.seed)
        self.rollout: list[MicroBatch] | None = None
        self.rollout_metrics: dict[str, float | None] = {}

    def _build_policy(self) -> None:
        """The policy (Liger patches where they apply), the trainable layers, its frozen reference (the initial
        weights, when ``beta != 0``), the EOS ids and the sampling settings."""
        cfg = self.cfg
        self.model, self.tokenizer = load_policy(
            cfg.policy, self.device, load_kwargs=cfg.load_kwargs(), gradient_checkpointing=cfg.gradient_checkpointing
        )
        # each rollout checks its longest prompt too (rollout.generate_micro_batch)
        check_positions(self.model.config, cfg.max_new_tokens + 1, f"--max-new-tokens {cfg.max_new_tokens} + 1")
        self.liger = apply_liger(self.model, self.device, cfg.liger)
        log(f"Liger-Kernel: {self.liger}")
        self.tied = tied_names(self.model)
        if cfg.trainable_layers is not None:
            train_policy_top_layers(self.model, cfg.trainable_layers)
        add_configured_lora(cfg, self.model, backbone_of(self.model))
        reference = make_reference(self.model, cfg) if cfg.beta != 0 else None
        # With LoRA the reference is the policy with its adapters off (no copy), scored while sampling, under the
        # weights the rollout gathers; a copy is scored after the rollout.
        self.adapter_reference = reference if isinstance(reference, AdaptersOff) else None
        self.reference = None if self.adapter_reference else reference
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.generation_config = generation_config(cfg, self.tokenizer, self.eos_ids)

    def load_weights(self, model: torch.nn.Module, folder: Path) -> None:
        load_policy_weights(model, folder)

    def prepare(self, resume_step: int | None) -> None:
        self.completions_log = self.ctx.writer(lambda: JsonlTable(self.output / "completions.jsonl", resume_step))

    # -- loop -------------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step, on a new rollout every ``num_iterations`` steps; its metric row."""
        self.timer.reset()
        if self.rollout is None or self.iteration >= self.cfg.num_iterations:
            self._new_rollout()
        metrics = self.update(self.rollout)
        self.iteration += 1
        self.step += 1
        if self.cfg.sync_ref_model and self.step % self.cfg.ref_model_sync_steps == 0:
            mix_reference(self.reference, self.model, self.cfg.ref_model_mixup_alpha)
        row = {"step": self.step, "epoch": self.stream.epoch, **self.rollout_metrics, **metrics}
        row["num_tokens"] = self.num_tokens
        row.update(self.timer.metrics())
        return row

    def postfix(self, record: dict, seconds: float) -> dict[str, str]:
        return progress_postfix(record, seconds)

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
        contiguous slice, each completion from its own ``completion_seed(seed, step, position, g)``, so ranks
        together sample what one process with the combined batch samples; with ``--dynamic-sampling`` the slots of
        uninformative groups are refilled round by round (:mod:`.dynamic`). Under FSDP2 the weights are gathered
        once for the whole rollout. Advantages and metrics are taken over every rank's rewards (gathered), as one
        process would."""
        cfg, ctx = self.cfg, self.ctx
        slots, extra = ctx.run_unsharded(self.engine, self.model, self._sample_rounds)
        batches = [merge_groups(groups, cfg.num_generations, self.tokenizer.pad_token_id) for groups in slots]
        rewards, table = torch.cat([b.rewards for b in batches]), torch.cat([b.reward_table for b in batches])
        local = rewards.shape[0]
        every_rank, every_table = ctx.all_gather_rows(rewards), ctx.all_gather_rows(table)  # whole groups
        advantages = multi_objective_advantages(
            every_table,
            self.rewards.weights,
            cfg.num_generations,
            aggregation=cfg.multi_objective_aggregation,
            scale=cfg.scale_rewards,
        )
        advantages = advantages[ctx.rank * local : (ctx.rank + 1) * local]
        offset = 0
        for batch in batches:
            n = batch.targets.shape[0]
            batch.advantages = advantages[offset : offset + n]
            offset += n
            if self.reference is not None:
                with self.timer("logprobs"):
                    batch.ref_logps = self._token_logprobs(self.reference, batch)
        metrics = rollout_metrics(
            every_rank,
            every_table,
            ctx.all_gather_rows(torch.cat([b.mask.sum(dim=1) for b in batches]).float()),
            ctx.all_gather_rows(torch.cat([b.truncated for b in batches]).float()),
            ctx.all_reduce_sum(torch.tensor([float(extra.pop("cut"))])).item(),
            cfg.num_generations,
            self.rewards.names,
        )
        if extra.get("dynamic_sampling/groups_left_out"):
            log(
                f"step {self.step + 1}: {extra['dynamic_sampling/groups_left_out']} groups with all-equal rewards left "
                f"out of the loss after {extra['dynamic_sampling/rounds']} sampling rounds (--max-resample-rounds)"
            )
        return batches, {**metrics, **extra}

    def _sample_rounds(self, policy) -> tuple[list[list[SlotGroup]], dict]:
        """:func:`.dynamic.sample_rounds` of this step's plan, each part sampled and scored by :meth:`_sample_part`."""
        return sample_rounds(
            self._rollout_plan(),
            lambda pairs, round_: self._sample_part(policy, pairs, round_),
            self.ctx,
            self.stream,
            self.cfg.max_resample_rounds if self.cfg.dynamic_sampling else None,
        )

    def _rollout_plan(self) -> list[list[tuple[int, dict]]]:
        """Per micro-batch: this rank's ``(global position, prompt record)`` pairs, taken from the shared stream."""
        global_batch = self.cfg.batch_size * self.ctx.world
        plan = []
        for micro in range(self.cfg.grad_accum):
            records = self.stream.take(global_batch)
            positions = self.ctx.shard(range(micro * global_batch, (micro + 1) * global_batch))
            plan.append([(p, records[p - micro * global_batch]) for p in positions])
        return plan

    def _sample_part(self, policy, pairs: list[tuple[int, dict]], round_: int) -> tuple[MicroBatch, list[bool], int]:
        """Sample and score the groups of ``pairs`` (``(slot, record)``) in round ``round_``: ``(micro-batch part,
        whether each group's rewards are all equal, prompts cut)``. Old log-probs when the rollout is reused; with
        LoRA the reference's, the same full weights with the adapters off."""
        cfg = self.cfg
        offset = round_ * cfg.grad_accum * cfg.batch_size * self.ctx.world  # each round's seeds are new
        seeds = [
            completion_seed(cfg.seed, self.step, p + offset, g) for p, _ in pairs for g in range(cfg.num_generations)
        ]
        records = [record for _, record in pairs]
        with self.timer("generation"):
            batch, columns, cut = generate_micro_batch(
                policy, self.tokenizer, records, cfg, self.generation_config, self.eos_ids, self.amp_dtype, seeds
            )
        with self.timer("logprobs"):
            if cfg.num_iterations > 1:
                batch.old_logps = self._token_logprobs(policy, batch)
            if self.adapter_reference:
                with self.adapter_reference.running():
                    batch.ref_logps = self._token_logprobs(policy, batch)
        completion_ids = [t[t != IGNORE_INDEX].tolist() for t in batch.targets]
        completions = completions_for_fns(batch.prompts, batch.completions)
        with self.timer("scoring"):
            batch.rewards, batch.reward_table = self.rewards(
                batch.prompts, completions, {**columns, "completion_ids": completion_ids}
            )
        by_source = cfg.multi_objective_aggregation == "normalize_then_sum"
        spread = batch.reward_table if by_source else batch.rewards[:, None]
        return batch, constant_groups(spread, cfg.num_generations).tolist(), cut

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
        local = sum(default_normalizer(self._trained(b).float(), cfg.loss_type, cfg.max_new_tokens) for b in batches)
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
        gather = self.ctx.all_gather_values if self.ctx.distributed and self.cfg.top_entropy_quantile < 1 else None
        return self.loss_fn(
            hidden,
            weight,
            batch.loss_targets(self.cfg.mask_truncated_completions),
            batch.advantages.to(hidden.device),
            old_logps=batch.old_logps,
            ref_logps=batch.ref_logps,
            bias=bias,
            normalizer=inputs["normalizer"],
            entropy_gather=gather,
        )

    def _trained(self, batch: MicroBatch) -> torch.Tensor:
        """The completion tokens the loss trains on (``[n, C]`` bool)."""
        return batch.loss_targets(self.cfg.mask_truncated_completions) != IGNORE_INDEX

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
                self.trainable_parameters(),
                self.cfg.max_grad_norm,
                self.step + 1,
                self.last_checkpoint,
            )
        return step_metrics(loss, grad_norm, learning_rate, totals)

    # -- checkpoints and export -------------------------------------------------------------------------------

    def write_model(self, folder: Path) -> None:
        """The policy as a ``save_pretrained`` folder with its tokenizer and, with ``--sync-ref-model``, the
        reference it has moved to (a collective)."""
        write_policy(self.ctx, self.engine, self.model, self.tokenizer, folder, self.tied)
        if self.cfg.sync_ref_model:
            write_reference(self.ctx, self.reference, folder)

    def export(self, final_report: dict | None, folder: Path) -> None:
        """The final policy alone (no reference)."""
        write_policy(self.ctx, self.engine, self.model, self.tokenizer, folder, self.tied)

    def checkpoint_state(self, record: dict) -> tuple[dict, dict, dict | None]:
        """The data position and, mid-rollout, this rank's unfinished rollout slice (tensors, and prompts and texts
        as JSON)."""
        mid_rollout = self.rollout is not None and self.iteration < self.cfg.num_iterations
        rank_tensors, rank_json = {}, None
        if mid_rollout:
            parts = [batch.split_state() for batch in self.rollout]
            rank_tensors["rollout"] = [tensors for tensors, _ in parts]
            rank_json = {"rollout": [texts for _, texts in parts], "rollout_metrics": self.rollout_metrics}
        state = {
            "data": self.stream.position(),
            "mid_rollout": mid_rollout,
            "iteration": self.iteration,
        }
        return state, rank_tensors, rank_json

    def restore_state(self, folder: Path, state: dict, rank_tensors: dict | None, rank_json: dict | None) -> None:
        """The data position and, written by as many ranks, an unfinished rollout (ValueError on another number of
        ranks, or for another prompt count). On another number of ranks the RNG states stay at this run's seeded
        start (sampling does not use them: each completion has its own seed)."""
        if type(state["iteration"]) is not int or state["iteration"] < 0:
            iteration = state["iteration"]
            raise ValueError(f"{folder / STATE_FILE}: 'iteration' {iteration!r} is not a count; {START_AFRESH}")
        if state["mid_rollout"] and rank_tensors is None:
            saved = state["world_size"]
            writer = "one process" if saved == 1 else f"{saved} ranks"
            raise ValueError(f"{folder}: saved mid-rollout by {writer}; resume it on as many")
        self.stream = PromptStream.restored(self.records, self.cfg.seed, state["data"], folder / STATE_FILE)
        if self.cfg.sync_ref_model:
            load_reference(self.reference, folder)
        if state["mid_rollout"]:
            if rank_json is None or "rollout" not in rank_tensors:
                raise ValueError(f"{folder}: saved mid-rollout, but rank {self.ctx.rank}'s rollout files are missing")
            pairs = zip(rank_tensors["rollout"], rank_json["rollout"], strict=True)
            self.rollout = [MicroBatch.from_state(tensors, texts, self.device) for tensors, texts in pairs]
            self.rollout_metrics = rank_json["rollout_metrics"]
            self.iteration = state["iteration"]


def train_grpo(cfg: GRPOConfig, scorer: Callable | None = None) -> list[dict]:
    """Run the GRPO stage; returns the metric rows of this call (also in ``output/metrics.jsonl``). Under torchrun
    every rank runs it."""
    return GRPOTrainer(cfg, scorer=scorer).run_to_end()
