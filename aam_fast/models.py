"""Reward model around any causal LM: backbone, its LM head and a bias-free ``score`` head; reference; save/load.

``r(x, y) = w_sᵀ h_last``: the ``score`` head ``Linear(D, 1, bias=False)`` reads the final (post-norm) hidden state
at the last position whose attention mask is 1. The forward returns the rewards and those final hidden states; the
response log-probs come from ``aam_fast.linear_logprobs(hidden, lm_head_weight, targets)`` and never through the
model's own ``lm_head`` call, so no ``[tokens, vocab]`` logits exist.

With ``trainable_layers=K`` only the top K decoder layers, the final norm and the score head train. The frozen trunk
below them runs once per batch: a pre-hook on the first trainable layer captures its input and call arguments, and
the :class:`ReferenceModel` (the frozen initial model that PR margins compare against) then needs only its own copy of
the top K layers, the final norm and the LM head, which it runs on that captured input. The trunk's output can also
be computed once (:meth:`RewardModel.trunk_output`) and fed back later (``trunk_hidden=``) to skip the trunk.

A saved model is a ``save_pretrained`` folder of the matching ``*ForSequenceClassification`` class (``num_labels=1``,
``pad_token_id`` set, head ``score``) with its tokenizer, so ``AutoModelForSequenceClassification.from_pretrained``
gives the same scores; ``aam_fast.json`` and, for an untied LM head, ``lm_head.safetensors`` hold what AAM training
needs beyond that.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import FALLBACK_CHAT_TEMPLATE, PairEncoder, Text, choose_pad_token_id, pad_sequences

METADATA_FILE = "aam_fast.json"
LM_HEAD_FILE = "lm_head.safetensors"

_LAYER_LISTS = ("layers", "h", "blocks")
_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


@dataclass
class RewardOutput:
    """``rewards [B]`` float32, ``hidden [B, T, D]`` final hidden states, ``ref_hidden`` the reference's (or None)."""

    rewards: torch.Tensor
    hidden: torch.Tensor
    ref_hidden: torch.Tensor | None = None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1 in each row (left or right padding, pad == eos alike)."""
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("attention_mask has a row without any attended token")
    length = attention_mask.shape[-1]
    return length - 1 - attention_mask.flip(-1).to(torch.long).argmax(-1)


def _find_child(module: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return child
    raise ValueError(
        f"{type(module).__name__} has no {what} (looked for {', '.join(names)}); "
        "trainable_layers is not supported for this architecture"
    )


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


class _LayerInputCapture:
    """Forward pre-hook that records the (hidden, args, kwargs) a decoder layer was called with (and, with
    ``stop=True``, ends the forward there)."""

    def __init__(self, stop: bool = False):
        self.stop = stop
        self.hidden: torch.Tensor | None = None
        self.args: tuple = ()
        self.kwargs: dict = {}

    def __call__(self, module, args, kwargs):
        if args:
            self.hidden, self.args = args[0], tuple(args[1:])
            self.kwargs = dict(kwargs)
        else:
            self.kwargs = dict(kwargs)
            self.hidden = self.kwargs.pop("hidden_states")
            self.args = ()
        self.hidden = self.hidden.detach()
        if self.stop:
            raise _StopForward
        return None

    def run(self, layers: Sequence[nn.Module], norm: nn.Module) -> torch.Tensor:
        hidden = self.hidden
        for layer in layers:
            hidden = _layer_output(layer(hidden, *self.args, **self.kwargs))
        return norm(hidden)


class RewardModel(nn.Module):
    """A causal LM's backbone + LM head with a bias-free ``score`` head; see the module docstring."""

    def __init__(
        self,
        lm: nn.Module,
        score: nn.Linear | None = None,
        *,
        trainable_layers: int | None = None,
        train_lm_head: bool = False,
    ):
        super().__init__()
        self.lm = lm
        hidden_size = lm.config.get_text_config().hidden_size
        if score is None:
            score = nn.Linear(hidden_size, 1, bias=False)
            std = getattr(lm.config, "initializer_range", 0.02)
            nn.init.normal_(score.weight, std=std)
            param = next(lm.parameters())
            score = score.to(device=param.device, dtype=param.dtype)
        if score.bias is not None or tuple(score.weight.shape) != (1, hidden_size):
            raise ValueError(f"score must be Linear({hidden_size}, 1, bias=False)")
        self.score = score
        self.trainable_layers = trainable_layers
        self._set_trainable(trainable_layers, train_lm_head)

    # -- structure --------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return getattr(self.lm, self.lm.base_model_prefix)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return _find_child(self.backbone, _LAYER_LISTS, "decoder layer list")

    @property
    def first_trainable_layer(self) -> nn.Module:
        if self.trainable_layers is None:
            raise ValueError("the model has no frozen trunk (trainable_layers is None)")
        return self.decoder_layers[len(self.decoder_layers) - self.trainable_layers]

    @property
    def final_norm(self) -> nn.Module:
        return _find_child(self.backbone, _FINAL_NORMS, "final norm")

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.lm.get_input_embeddings().weight

    def _set_trainable(self, trainable_layers: int | None, train_lm_head: bool) -> None:
        self.lm.requires_grad_(trainable_layers is None)
        if trainable_layers is not None:
            layers = self.decoder_layers
            if not 1 <= trainable_layers <= len(layers):
                raise ValueError(f"trainable_layers must be in [1, {len(layers)}], got {trainable_layers}")
            for layer in layers[len(layers) - trainable_layers :]:
                layer.requires_grad_(True)
            self.final_norm.requires_grad_(True)
        # The LM head trains only when a loss sends it gradient (SFT term or a trained-through margin). A tied head
        # is the input embedding: it trains with the backbone, and stays frozen under trainable_layers.
        if not self.tied:
            self.lm_head.requires_grad_(train_lm_head)
        elif trainable_layers is None:
            self.lm_head.requires_grad_(True)
        self.score.requires_grad_(True)

    # -- forward ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def trunk_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's output ``[B, T, D]`` (the input of the first trainable layer), the top not run."""
        capture = _LayerInputCapture(stop=True)
        handle = self.first_trainable_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return capture.hidden

    @contextlib.contextmanager
    def _top_layers_fed(self, trunk_hidden: torch.Tensor):
        """Run the backbone with only its top layers, the first of them fed ``trunk_hidden`` (embedding, masks and
        position embeddings are still computed by the backbone's own forward for this batch)."""
        backbone = self.backbone
        name = next(n for n in _LAYER_LISTS if getattr(backbone, n, None) is not None)
        full = getattr(backbone, name)
        top = nn.ModuleList(list(full)[len(full) - self.trainable_layers :])

        def feed(module, args, kwargs):
            if args:
                return (trunk_hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": trunk_hidden}

        handle = top[0].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
        setattr(backbone, name, top)
        try:
            yield
        finally:
            setattr(backbone, name, full)
            handle.remove()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        reference: ReferenceModel | None = None,
        trunk_hidden: torch.Tensor | None = None,
    ) -> RewardOutput:
        """Rewards ``[B]`` and final hidden states; with ``reference``, also the reference's final hidden states
        (computed without gradient; under ``trainable_layers`` from the shared frozen trunk). ``trunk_hidden``
        (from :meth:`trunk_output`, e.g. cached across epochs) skips the frozen trunk."""
        if trunk_hidden is not None and self.trainable_layers is None:
            raise ValueError("trunk_hidden needs a model built with trainable_layers")
        capture = handle = None
        if reference is not None and reference.top_only:
            capture = _LayerInputCapture()
            handle = self.first_trainable_layer.register_forward_pre_hook(capture, with_kwargs=True)
        feeding = contextlib.nullcontext() if trunk_hidden is None else self._top_layers_fed(trunk_hidden)
        try:
            with feeding:
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        hidden = hidden.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        rewards = self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()
        ref_hidden = None
        if reference is not None:
            with torch.no_grad():
                if capture is not None:
                    ref_hidden = capture.run(reference.layers, reference.norm)
                else:
                    ref_hidden = reference.backbone(
                        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                    ).last_hidden_state
        return RewardOutput(rewards, hidden, ref_hidden)


class ReferenceModel(nn.Module):
    """The frozen initial model for PR margins: a full copy of the backbone, or under ``trainable_layers=K`` a copy
    of only the top K layers and the final norm (the trunk below is shared with the trained model). The LM head is
    shared when it cannot train, copied otherwise."""

    def __init__(self, model: RewardModel):
        super().__init__()
        self.num_layers = model.trainable_layers
        self.top_only = self.num_layers is not None
        if self.top_only:
            layers = model.decoder_layers
            self.layers = copy.deepcopy(layers[len(layers) - self.num_layers :])
            self.norm = copy.deepcopy(model.final_norm)
        else:
            self.backbone = copy.deepcopy(model.backbone)
        head_trains = model.lm_head_weight.requires_grad
        if head_trains or not self.top_only:
            self.register_buffer("weight", model.lm_head_weight.detach().clone(), persistent=False)
            bias = model.lm_head_bias
            self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        else:
            self._shared_head = (model.lm_head_weight, model.lm_head_bias)
        self.requires_grad_(False)
        self.eval()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.weight if "weight" in self._buffers else self._shared_head[0].detach()

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        if "weight" in self._buffers:
            return self.bias
        bias = self._shared_head[1]
        return None if bias is None else bias.detach()

    def train(self, mode: bool = True) -> ReferenceModel:
        return super().train(False)  # always in eval mode


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's reward trainer does by default)."""
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
    config = getattr(module, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports (e.g. the ignored ``score.weight`` when loading the causal LM)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = logging.getLogger("transformers")
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
        root.setLevel(level)


def _sequence_classification_class(config):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"transformers has no *ForSequenceClassification class for model_type {config.model_type!r}")
    return getattr(transformers, name)


def read_safetensors(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Named tensors from a folder's ``model.safetensors`` (or its sharded index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: folder / "model.safetensors" for name in names}
    tensors = {}
    for name, file in files.items():
        if file.is_file():
            with safe_open(str(file), framework="pt") as handle:
                if name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{folder}: tensors {missing} not found in its safetensors files")
    return tensors


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the given dtype (offline paths and hub names alike)."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)


def is_reward_model_dir(path: str | Path) -> bool:
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_reward_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trainable_layers: int | None = None,
    train_lm_head: bool = False,
) -> tuple[RewardModel, Any, dict]:
    """Load a folder written by :func:`save_reward_model` (or any single-score ``*ForSequenceClassification``
    folder with a ``score`` head) as ``(RewardModel, tokenizer, metadata)``.

    The backbone comes through the causal-LM class of the same ``model_type``; a tied LM head is the embedding, an
    untied one comes from ``lm_head.safetensors`` (without it the head stays freshly initialised: scores are exact,
    AAM margins are not).
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    metadata = json.loads((path / METADATA_FILE).read_text()) if (path / METADATA_FILE).is_file() else {}
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "num_labels", 1) != 1:
        raise ValueError(f"{path}: a reward model needs num_labels=1, found {config.num_labels}")
    causal_name = metadata.get("causal_lm_architecture") or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal_name is None or not hasattr(transformers, causal_name):
        raise ValueError(f"{path}: no causal-LM class known for model_type {config.model_type!r}")
    config.architectures = [causal_name]
    with _quiet_transformers():
        lm = getattr(transformers, causal_name).from_pretrained(path, config=config, dtype=dtype)
    head_file = path / LM_HEAD_FILE
    if head_file.is_file():
        from safetensors.torch import load_file

        lm.get_output_embeddings().load_state_dict(load_file(str(head_file)))
    score = nn.Linear(config.get_text_config().hidden_size, 1, bias=False)
    score.weight.data.copy_(read_safetensors(path, ["score.weight"])["score.weight"])
    model = RewardModel(lm, score.to(dtype), trainable_layers=trainable_layers, train_lm_head=train_lm_head).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, metadata


def save_reward_model(model: RewardModel, tokenizer, folder: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``folder`` as a ``*ForSequenceClassification`` ``save_pretrained`` folder with the tokenizer, plus
    ``aam_fast.json`` and (untied head only) ``lm_head.safetensors``. Tokenizers without a chat template get
    :data:`FALLBACK_CHAT_TEMPLATE`, the one training used."""
    from safetensors.torch import save_file

    folder = Path(folder)
    lm = model.lm
    pad_token_id = choose_pad_token_id(tokenizer)
    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    seq_cls = _sequence_classification_class(config)
    config.architectures = [seq_cls.__name__]
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    if config.get_text_config() is not config:
        config.get_text_config().pad_token_id = pad_token_id
    with torch.device("meta"), _quiet_transformers():
        exported = seq_cls(config)
    if not isinstance(getattr(exported, "score", None), nn.Linear):
        raise ValueError(f"{seq_cls.__name__} has no 'score' head; cannot export")
    state = {f"{exported.base_model_prefix}.{k}": v.detach() for k, v in model.backbone.state_dict().items()}
    state["score.weight"] = model.score.weight.detach()
    exported.load_state_dict(state, strict=True, assign=True)
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        exported.save_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    if not model.tied:
        head = {k: v.detach().contiguous() for k, v in model.lm_head.state_dict().items()}
        save_file(head, str(folder / LM_HEAD_FILE))
    info = {
        "format": 1,
        "causal_lm_architecture": type(lm).__name__,
        "tie_word_embeddings": model.tied,
        "lm_head_file": None if model.tied else LM_HEAD_FILE,
        **(metadata or {}),
    }
    (folder / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Scoring


class RewardScorer:
    """Score ``(prompt, completion)`` pairs with a saved reward model, exactly as ``eval-rm`` does.

    ``prompts[i]`` is a string (standard: ``prompt + completion + eos``) or a message list (conversational: the
    completion becomes an assistant message, rendered by the saved chat template). Sequences are truncated as in
    training (``max_length`` defaults to the one the model was trained with) and scored in batches of
    ``batch_size``, right-padded (``packing``: each batch as one padding-free row, :mod:`aam_fast.packing`).
    Returns float32 rewards ``[n]`` on CPU.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        batch_size: int = 8,
        packing: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.packing = packing
        self.model, self.tokenizer, self.metadata = load_reward_model(model_dir, dtype=dtype, device=device)
        self.model.eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pad_token_id = choose_pad_token_id(self.tokenizer)
        self.encoder = PairEncoder(self.tokenizer, max_length or self.metadata.get("max_length"))

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[tuple[list[int], int]]) -> torch.Tensor:
        """Rewards of already tokenised ``(ids, prompt_len)`` sequences, in order (batched by length, as
        ``eval-rm`` batches pairs, to spend little compute on padding)."""
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
        rewards = torch.zeros(len(sequences))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = pad_sequences([sequences[i] for i in indices], self.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.packing:
                from .packing import add_packing, packed_reward_forward

                out = packed_reward_forward(self.model, add_packing(batch))
            else:
                out = self.model(batch["input_ids"], batch["attention_mask"])
            rewards[indices] = out.rewards.float().cpu()
        return rewards

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
        encoded = [self.encoder.encode_sequence(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_sequences([(e.ids, e.prompt_len) for e in encoded])
