"""The training runtime every command shares: the one training lifecycle (:mod:`.lifecycle`), how a command starts
and closes (:mod:`.launch`), config dataclasses that generate the CLI (:mod:`.config`), device, precision, seeding,
RNG state and the log (:mod:`.runtime`), torchrun scale-out (:mod:`.distributed`), one checkpoint format
(:mod:`.checkpoints`), metric sinks (:mod:`.metrics`) and the checked optimizer step (:mod:`.optim`)."""

from .config import TrainingConfig, add_config_arguments, check_ranges, config_from_args, option
from .runtime import TrainingDiverged

__all__ = ["TrainingConfig", "TrainingDiverged", "add_config_arguments", "check_ranges", "config_from_args", "option"]
