"""The losses: the AAM pairwise reward-model loss (:mod:`.aam`) and the GRPO token loss (:mod:`.grpo`), each
functional and as a module with the same argument order, and the choices the training stages offer, declared once
here (``IGNORE_INDEX`` and ``LENGTH_NORMS`` come from the ops)."""

from ..ops import IGNORE_INDEX, LENGTH_NORMS
from .aam import MARGINS, NAMED_GAMMA, AAMLoss, AAMOutput, MarginNeeds, aam_loss, margin_needs
from .grpo import (
    KL_KINDS,
    LOSS_TYPE_ALIASES,
    LOSS_TYPES,
    SCALE_REWARDS,
    GRPOLoss,
    GRPOOutput,
    default_normalizer,
    group_advantages,
    grpo_loss,
    kl_penalty,
    multi_objective_advantages,
    resolve_loss_type,
)
from .grpo_options import AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, RATIO_BOUND_MAX

__all__ = [
    "AGGREGATIONS",
    "RATIO_BOUND_MAX",
    "IGNORE_INDEX",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_KINDS",
    "LENGTH_NORMS",
    "LOSS_TYPES",
    "LOSS_TYPE_ALIASES",
    "MARGINS",
    "NAMED_GAMMA",
    "SCALE_REWARDS",
    "AAMLoss",
    "AAMOutput",
    "MarginNeeds",
    "GRPOLoss",
    "GRPOOutput",
    "aam_loss",
    "default_normalizer",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "margin_needs",
    "multi_objective_advantages",
    "resolve_loss_type",
]
