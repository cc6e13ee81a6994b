"""Models: the reward model around any causal LM, the frozen reference (a copy, or the adapters off: decided once in
:func:`make_reference`), the scorer GRPO uses, packing, loading and saving, and the model surgery both stages share
(layers, LoRA, Liger-Kernel's patches, checkpointing)."""

from .heads import head_inputs, lm_head_of
from .io import (
    LM_HEAD_FILE,
    METADATA_FILE,
    RewardModelView,
    check_exportable,
    check_positions,
    is_reward_model_dir,
    load_causal_lm,
    load_reward_model,
    load_reward_weights,
    load_tokenizer,
    quiet_transformers,
    read_safetensors,
    save_reward_model,
)
from .layers import backbone_of, decoder_layers, disable_dropout, enable_checkpointing, final_norm, train_top_layers
from .liger import apply_liger
from .lora import ADAPTER_FILE, adapters_disabled, add_configured_lora, add_lora, has_lora, merge_lora_state
from .packing import add_packing, packed_hidden, packed_reward_forward, padded_columns, unpack
from .reference import (
    AdapterReference,
    AdaptersOff,
    ModelReference,
    ReferenceModel,
    frozen_copy,
    initial_reference,
    make_reference,
)
from .reward_model import RewardModel, RewardOutput, last_token_index
from .scorer import RewardScorer

__all__ = [
    "ADAPTER_FILE",
    "AdapterReference",
    "ModelReference",
    "AdaptersOff",
    "adapters_disabled",
    "add_configured_lora",
    "add_lora",
    "apply_liger",
    "has_lora",
    "merge_lora_state",
    "LM_HEAD_FILE",
    "METADATA_FILE",
    "ReferenceModel",
    "RewardModel",
    "RewardOutput",
    "RewardModelView",
    "RewardScorer",
    "add_packing",
    "backbone_of",
    "check_exportable",
    "check_positions",
    "decoder_layers",
    "disable_dropout",
    "enable_checkpointing",
    "final_norm",
    "frozen_copy",
    "head_inputs",
    "is_reward_model_dir",
    "last_token_index",
    "lm_head_of",
    "initial_reference",
    "make_reference",
    "load_causal_lm",
    "load_reward_model",
    "load_reward_weights",
    "load_tokenizer",
    "packed_hidden",
    "packed_reward_forward",
    "padded_columns",
    "quiet_transformers",
    "read_safetensors",
    "save_reward_model",
    "train_top_layers",
    "unpack",
]
