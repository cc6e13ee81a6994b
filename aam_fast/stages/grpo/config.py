"""``train-grpo``'s settings: the shared :class:`~aam_fast.training.TrainingConfig` (with GRPO's own defaults) plus
the policy, prompts, rewards, sampling and the GRPO loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...data import DEFAULT_OPENING_TURN
from ...losses import (
    AGGREGATIONS,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_KINDS,
    LOSS_TYPE_ALIASES,
    LOSS_TYPES,
    RATIO_BOUND_MAX,
    SCALE_REWARDS,
)
from ...training.config import (
    LR_HELP,
    LR_MAX,
    LR_SCHEDULES,
    SEED_MAX,
    STEPS_HELP,
    STEPS_MAX,
    TrainingConfig,
    option,
)
from .rollout import GENERATION_METHODS

RewardFn = Callable[..., list]


@dataclasses.dataclass(kw_only=True)
class GRPOConfig(TrainingConfig):
    """Every setting of a ``train-grpo`` run; the CLI flags are these names with dashes (``--reward-fn`` for
    ``reward_fns``). ``prompts`` and ``reward_fns`` also take Python objects: a list of prompt records, callables."""

    policy: str = option(help="policy model folder (a save_pretrained layout)", group="data")
    prompts: str | list[dict] = option(
        help="RPBench character cards, the demo's role-play profiles, or a json/jsonl/parquet file with a 'prompt' "
        "column (from Python: a list of records {'prompt': ..., **columns})",
        group="data",
    )
    scenes: str | None = option(None, help="RPBench scene file: adds each card's scene (matched by id)", group="data")
    opening_turn: str = option(DEFAULT_OPENING_TURN, help="the user's opening line for RPBench cards", group="data")
    max_prompts: int | None = option(None, help="use only the first N prompts", minimum=1, group="data")
    max_prompt_length: int | None = option(
        1024, help="prompts are left-truncated to this many tokens (none: never)", minimum=1, group="data"
    )

    reward_model: str | None = option(None, help="AAM reward model folder written by train-rm", group="rewards")
    reward_fns: list[str | RewardFn] = option(
        help="rule reward 'module:function' or 'file.py:function' with TRL's signature (repeatable)",
        factory=list,
        repeat=True,
        dest_flag="reward-fn",
        group="rewards",
    )
    reward_weights: list[float] | None = option(
        None, help="one weight per reward source, the reward model first (default: all 1)", group="rewards"
    )
    rm_max_length: int | None = option(
        None, help="reward model truncation (default: its training length)", minimum=1, group="rewards"
    )
    rm_batch_size: int = option(8, help="sequences per reward-model forward", minimum=1, group="rewards")
    multi_objective_aggregation: str = option(
        "sum_then_normalize",
        help="how several reward sources become advantages: sum_then_normalize takes the weighted sum, then "
        "normalises it within each group (--scale-rewards); normalize_then_sum normalises each source within its "
        "group first, then normalises the weighted sum over the step's batch (TRL's meaning)",
        choices=AGGREGATIONS,
        group="rewards",
    )

    num_generations: int = option(
        4,
        help="completions sampled per prompt (G); advantages compare within a group (at most 1024: every prompt's G "
        "completions are sampled and held at once, so a mistyped count exhausts memory before the first step)",
        minimum=2,
        maximum=1024,
        group="sampling",
    )
    max_new_tokens: int = option(
        64, help="completion length limit (a completion without EOS is truncated)", minimum=1, group="sampling"
    )
    temperature: float = option(
        1.0, help="sampling temperature (also divides the trained logits)", above=0.0, group="sampling"
    )
    top_p: float = option(1.0, help="nucleus sampling mass", above=0.0, maximum=1.0, group="sampling")
    top_k: int = option(0, help="top-k sampling (0: off)", minimum=0, group="sampling")
    generation: str = option(
        "shared-prefix",
        help="how completions are sampled and scored: shared-prefix runs each prompt once and shares its KV cache "
        "over its G completions, when sampling and in the forward-only reference and old-policy log-prob passes (the "
        "update still runs whole rows); generate calls transformers' generate on G copies of every prompt and scores "
        "whole rows (the same completions for the same seeds on the CPU in float32, log-probs equal up to rounding; "
        "slower)",
        choices=GENERATION_METHODS,
        group="sampling",
    )

    beta: float = option(
        0.04, help="KL coefficient to the initial policy (0: no reference model)", minimum=0.0, group="loss"
    )
    kl: str = option("k3", help="KL estimator", choices=KL_KINDS, group="loss")
    epsilon: float = option(
        0.2,
        help="lower clip range of the importance ratio (at most 1e6, as --epsilon-high and --delta: far beyond any "
        "clip in use, and 1 +- epsilon stays a float32 value)",
        minimum=0.0,
        maximum=RATIO_BOUND_MAX,
        group="loss",
    )
    epsilon_high: float | None = option(
        None, help="upper clip range (default: --epsilon)", minimum=0.0, maximum=RATIO_BOUND_MAX, group="loss"
    )
    loss_type: str = option(
        "token-mean",
        help="how token losses are aggregated (TRL's names grpo, bnpo, dapo, dr_grpo are aliases)",
        choices=(*LOSS_TYPES, *LOSS_TYPE_ALIASES),
        group="loss",
    )
    scale_rewards: str = option(
        "group",
        help="advantage scaling: per-group std, batch std, or none (Dr. GRPO)",
        choices=SCALE_REWARDS,
        group="loss",
    )
    num_iterations: int = option(1, help="optimizer steps per rollout batch", minimum=1, group="loss")
    entropy_coef: float = option(0.0, help="weight of the entropy bonus", minimum=0.0, group="loss")

    mask_truncated_completions: bool = option(
        False,
        help="completions that hit --max-new-tokens without EOS contribute no loss (they still count in the reward "
        "statistics and their group's advantages); the normaliser counts only what is trained on",
        group="loss",
    )
    importance_sampling_level: str = option(
        "token",
        help="importance ratio per token, or per sequence (GSPO: exp of the mean token log-ratio of the completion, "
        "one clip per sequence)",
        choices=IMPORTANCE_SAMPLING_LEVELS,
        group="loss",
    )
    delta: float | None = option(
        None,
        help="two-sided clipping: the unclipped branch's ratio is capped at delta, bounding the ratio of "
        "negative-advantage tokens; must exceed 1 + --epsilon-high (none: off)",
        above=1.0,
        maximum=RATIO_BOUND_MAX,
        group="loss",
    )
    top_entropy_quantile: float = option(
        1.0,
        help="only completion tokens whose entropy is in this top fraction of the micro-batch (every rank's) get the "
        "policy-gradient term; the KL term is unchanged (1: every token)",
        above=0.0,
        maximum=1.0,
        group="loss",
    )
    sync_ref_model: bool = option(
        False,
        help="every --ref-model-sync-steps steps the reference becomes alpha x policy + (1 - alpha) x reference "
        "(needs --beta != 0; not with LoRA, whose reference is the policy with its adapters off)",
        group="loss",
    )
    ref_model_mixup_alpha: float = option(0.6, help="alpha of --sync-ref-model", minimum=0.0, maximum=1.0, group="loss")
    ref_model_sync_steps: int = option(
        512, help="optimizer steps between --sync-ref-model updates", minimum=1, group="loss"
    )

    dynamic_sampling: bool = option(
        False,
        help="DAPO: a group whose rewards are all equal is dropped and its slot refilled with the next prompt of the "
        "stream, round after round, until every slot of the step holds an informative group or "
        "--max-resample-rounds is reached (the remaining uninformative groups are then left out of the loss)",
        group="sampling",
    )
    max_resample_rounds: int = option(
        4,
        help="extra sampling rounds of --dynamic-sampling per step (0: drop only; at most 100: a step waits for all "
        "of its rounds, and with rewards that never differ it would wait for ever)",
        minimum=0,
        maximum=100,
        group="sampling",
    )

    log_completions_every: int = option(
        10,
        help="write the sampled completions every N steps to completions.jsonl (0: never)",
        minimum=0,
        group="output",
    )

    # Shared settings with GRPO's defaults.
    output: str = option("runs/grpo", help="folder for the final policy, metrics and checkpoints", group="output")
    batch_size: int = option(
        2, help="prompts per micro-batch on each rank (each sampled G times)", minimum=1, group="optimisation"
    )
    lr: float = option(1e-6, help=LR_HELP, above=0.0, maximum=LR_MAX, group="optimisation")
    lr_schedule: str = option(
        "constant",
        help="decay after warmup (transformers' schedules)",
        choices=LR_SCHEDULES,
        group="optimisation",
    )
    max_steps: int = option(100, help=STEPS_HELP, minimum=1, maximum=STEPS_MAX, group="optimisation")
    seed: int = option(
        0,
        help="seed of the prompt order, initialisation and every completion's sampling",
        minimum=0,
        maximum=SEED_MAX,
        group="optimisation",
    )

    def validate(self) -> None:
        """Ranges and choices of every flag, then the settings that only fail together (ValueError)."""
        super().validate()
        if isinstance(self.prompts, str) and not self.prompts:
            raise ValueError("--prompts: give a prompt file (or, from Python, a list of prompt records)")
        if not isinstance(self.prompts, str) and not isinstance(self.prompts, list):
            raise ValueError(f"--prompts must be a path or a list of records, got {type(self.prompts).__name__}")
        if self.reward_model is None and not self.reward_fns:
            raise ValueError("no reward: give --reward-model and/or --reward-fn")
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.delta is not None and not self.delta > 1.0 + eps_high:
            raise ValueError(f"--delta {self.delta} must exceed 1 + --epsilon-high ({1.0 + eps_high})")
        if self.sync_ref_model and self.beta == 0:
            raise ValueError("--sync-ref-model needs a reference model: set --beta above 0")
        if self.sync_ref_model and self.lora_r:
            raise ValueError(
                "--sync-ref-model cannot run with --lora-r: the reference is the policy with its adapters off, "
                "which cannot be mixed toward the policy"
            )
        sources = (self.reward_model is not None) + len(self.reward_fns)
        if self.reward_weights is not None and len(self.reward_weights) != sources:
            raise ValueError(
                f"--reward-weights has {len(self.reward_weights)} values for {sources} reward sources "
                "(the reward model first, then each reward function in order)"
            )
