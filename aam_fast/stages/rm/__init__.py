"""The reward-model stage: settings (:mod:`.config`), what a run is built from (:mod:`.setup`), the trainer on the
shared lifecycle (:mod:`.trainer`), RewardBench-style evaluation and ``eval-rm`` (:mod:`.evaluate`), the
precomputed reference log-probs and the cached trunk, the side-by-side comparison (:mod:`.compare`), the CLI and
the demo."""

from .config import RMConfig
from .evaluate import EvalConfig, evaluate_folder
from .trainer import RMTrainer, train_reward_model

__all__ = ["EvalConfig", "RMConfig", "RMTrainer", "evaluate_folder", "train_reward_model"]
