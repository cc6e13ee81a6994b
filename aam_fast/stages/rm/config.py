"""``train-rm``'s settings: the shared :class:`~aam_fast.training.TrainingConfig` plus data, loss and evaluation."""

from __future__ import annotations

import dataclasses

from ...losses import LENGTH_NORMS, MARGINS, NAMED_GAMMA, MarginNeeds, margin_needs
from ...training.config import LR_MAX, STEPS_HELP, STEPS_MAX, TrainingConfig, option


@dataclasses.dataclass(kw_only=True)
class RMConfig(TrainingConfig):
    """Every setting of a ``train-rm`` run; the CLI flags are these names with dashes."""

    model: str = option(help="causal LM folder (or hub name) or a saved reward model folder", group="data")
    data: str = option(help="preference file (.json/.jsonl/.parquet[.gz]) or a datasets name", group="data")
    eval_data: str | None = option(
        None, help="separate dev file (default: a prompt-hash split of --data)", group="data"
    )
    dev_fraction: float = option(
        0.1,
        help="fraction of prompts held out for dev by a stable hash (0: none)",
        minimum=0.0,
        below=1.0,
        group="data",
    )
    subset_field: str | None = option(None, help="record field giving per-subset dev accuracy", group="data")
    skip_invalid: bool = option(False, help="skip and count bad records instead of failing", group="data")
    max_pairs: int | None = option(None, help="read at most this many pairs", minimum=1, group="data")
    chosen_key: str = option("chosen", help="record field holding the chosen response", group="data")
    rejected_key: str = option("rejected", help="record field holding the rejected response", group="data")
    margin_key: str = option("margin", help="record field holding a pair's margin (--margin fixed)", group="data")
    num_proc: int | None = option(
        None, help="processes that tokenise (datasets.map; default: this one)", minimum=1, group="data"
    )
    tokenize_cache: bool = option(
        True, help="cache the tokenised pairs by fingerprint (a later run or eval-rm reuses them)", group="data"
    )
    max_length: int = option(
        512, help="tokens per sequence; longer prompts are cut from the left", minimum=2, group="data"
    )

    margin: str = option("pr", help="bt, fixed (the data's margin), pr or ld (AAM)", choices=MARGINS, group="loss")
    beta: float = option(1.0, help="scale of the AAM margin", minimum=0.0, group="loss")
    gamma: float | None = option(
        None, help="reference weight; overrides the named setting (pr: 1, ld: 0)", group="loss"
    )
    length_norm: str = option(
        "mean", help="response log-prob: mean per token or sum", choices=LENGTH_NORMS, group="loss"
    )
    detach_margin: bool = option(True, help="the margin calibrates and is not trained through", group="loss")
    margin_clip: float | None = option(None, help="clamp the margin to [-c, c]", above=0.0, group="loss")
    sft_weight: float = option(0.0, help="weight of the chosen response's SFT loss", minimum=0.0, group="loss")
    center_rewards: float = option(0.0, help="weight of (r_c + r_r)^2", minimum=0.0, group="loss")

    batch_size: int = option(4, help="pairs per micro-batch on each rank", minimum=1, group="optimisation")
    eval_batch_size: int = option(8, help="pairs per forward when evaluating", minimum=1, group="optimisation")
    warmup_ratio: float = option(
        0.03,
        help="fraction of the steps spent warming up linearly from 0",
        minimum=0.0,
        below=1.0,
        group="optimisation",
    )
    score_lr: float | None = option(
        None,
        help="learning rate of the score head (default: --lr; at most 1, as --lr)",
        above=0.0,
        maximum=LR_MAX,
        group="optimisation",
    )
    epochs: float = option(
        1.0,
        help="passes over the training pairs (--max-steps overrides; the steps they give are bounded as --max-steps)",
        above=0.0,
        maximum=STEPS_MAX,
        group="optimisation",
    )
    max_steps: int | None = option(
        None, help=STEPS_HELP + " (default: from --epochs)", minimum=1, maximum=STEPS_MAX, group="optimisation"
    )
    cache_trunk: bool = option(
        False,
        help="with --trainable-layers: compute the frozen trunk once per sequence and reuse it every epoch "
        "(memory: 2 x pairs x tokens x hidden size)",
        group="model",
    )
    precompute_ref_logps: bool = option(
        True,
        help="PR: compute the frozen reference's response log-probs once, in one no-grad pass over the pairs the run "
        "visits, and free the reference (off: a reference forward in every step)",
        group="model",
    )
    eval_every: int = option(0, help="steps between dev evaluations (0: only at the end)", minimum=0, group="output")

    def column_keys(self) -> dict[str, str]:
        """The record fields of a pair, as ``load_preferences`` takes them."""
        return {
            "prompt_key": self.prompt_key,
            "chosen_key": self.chosen_key,
            "rejected_key": self.rejected_key,
            "margin_key": self.margin_key,
        }

    def validate(self) -> None:
        super().validate()
        if self.gamma is not None and self.margin not in NAMED_GAMMA:
            raise ValueError("--gamma applies to --margin pr or ld")
        if self.cache_trunk and self.trainable_layers is None:
            raise ValueError("--cache-trunk needs --trainable-layers (there is no frozen trunk to cache otherwise)")
        top_only_reference = self.needs_reference and self.trainable_layers is not None
        top_only_reference = top_only_reference and not self.precompute_ref_logps
        if self.packing and (self.cache_trunk or top_only_reference):
            raise ValueError(
                "--packing does not combine with --cache-trunk or, under --no-precompute-ref-logps, a top-layers-only "
                "PR reference"
            )

    @property
    def margin_needs(self) -> MarginNeeds:
        """What this loss setting reads: the rule of :func:`aam_fast.losses.margin_needs`."""
        return margin_needs(self.margin, gamma=self.gamma, sft_weight=self.sft_weight, detach_margin=self.detach_margin)

    @property
    def needs_reference(self) -> bool:
        return self.margin_needs.reference

    @property
    def needs_logps(self) -> bool:
        return self.margin_needs.policy_logps

    @property
    def trains_lm_head(self) -> bool:
        return self.margin_needs.trained_through
