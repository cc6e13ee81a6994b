"""The training runtime both stages share: config dataclasses that generate the CLI (:mod:`.config`), device,
precision, seeding and RNG state (:mod:`.runtime`), torchrun scale-out (:mod:`.distributed`), one checkpoint format
(:mod:`.checkpoints`), metric sinks (:mod:`.metrics`) and the checked optimizer step (:mod:`.optim`)."""

from .config import TrainingConfig, add_config_arguments, check_ranges, config_from_args, option
from .runtime import TrainingDiverged

__all__ = ["TrainingConfig", "TrainingDiverged", "add_config_arguments", "check_ranges", "config_from_args", "option"]
