"""Loading and saving: causal LMs, and reward models as ``*ForSequenceClassification`` ``save_pretrained`` folders.

A saved reward model is a folder of the matching ``*ForSequenceClassification`` class (``num_labels=1``,
``pad_token_id`` set, head ``score``) with its tokenizer, so ``AutoModelForSequenceClassification.from_pretrained``
gives the same scores; ``aam_fast.json`` and, for an untied LM head, ``lm_head.safetensors`` hold what AAM training
needs beyond that.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import FALLBACK_CHAT_TEMPLATE, choose_pad_token_id
from .lora import ADAPTER_FILE, adapter_state, has_lora, lora_scaling, merge_lora_state
from .reward_model import RewardModel

METADATA_FILE = "aam_fast.json"
LM_HEAD_FILE = "lm_head.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def quiet_transformers():
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


def check_exportable(config, what: str) -> None:
    """ValueError naming ``what`` (the flag and folder) when a reward model on this causal LM could not be saved
    (transformers has no ``*ForSequenceClassification`` class for its model type, e.g. remote code): found at
    load time, before any training, not at the export."""
    try:
        _sequence_classification_class(config)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}, so the trained reward model could not be saved") from None


def read_safetensors(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Named tensors from a folder's ``model.safetensors`` (or its sharded index)."""
    from safetensors import SafetensorError, safe_open

    weight_map = check_weight_map(folder)
    if weight_map is not None:
        files = {name: folder / weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: folder / "model.safetensors" for name in names}
    tensors = {}
    for name, file in files.items():
        if file.is_file():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    if name in handle.keys():
                        tensors[name] = handle.get_tensor(name)
            except SafetensorError as exc:
                raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{folder}: tensors {missing} not found in its safetensors files")
    return tensors


def check_positions(config, tokens: int, what: str) -> None:
    """ValueError when ``tokens`` (``what``: the flag and its value, e.g. ``--max-length 4096``) exceed the model's
    positions (``max_position_embeddings`` of ``config``'s text config; a model without one passes)."""
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if positions is not None and tokens > positions:
        raise ValueError(f"{what} exceeds the model's {positions} positions")


def check_weight_map(folder: Path) -> dict[str, str] | None:
    """The ``weight_map`` of ``folder``'s ``model.safetensors.index.json`` (None without one), checked before any
    weight file is opened: ValueError naming the index unless it maps tensor names to files inside ``folder``."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: not a safetensors index (needs a JSON object with a 'weight_map' object)")
    root = folder.resolve()
    for name, file in weight_map.items():
        inside = isinstance(file, str) and not Path(file).is_absolute() and (root / file).resolve().is_relative_to(root)
        if not inside:
            raise ValueError(f"{index}: weight_map[{name!r}] = {file!r} is not a file inside the model folder")
    return weight_map


def check_model_source(name_or_path: str | Path, what: str = "model") -> None:
    """ValueError naming ``what`` when ``name_or_path`` is neither a model folder nor a possible hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{what} {name_or_path}: not a model folder (no config.json)")
        check_weight_map(path)
        return
    if path.exists():
        raise ValueError(f"{what} {name_or_path}: a file, not a model folder")
    text = str(name_or_path)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/")
    if looks_like_path:
        raise ValueError(f"{what} {name_or_path}: no such folder")


def from_pretrained(load, name_or_path: str | Path, what: str, **kwargs):
    """``load(name_or_path, **kwargs)`` (a transformers ``from_pretrained``), its failure as one ValueError line."""
    from safetensors import SafetensorError

    check_model_source(name_or_path, what)
    try:
        with quiet_transformers():
            return load(str(name_or_path), **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {name_or_path}: cannot be loaded ({first})") from None


def load_causal_lm(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, what: str = "model", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the given dtype (offline paths and hub names alike); a failure
    is one ValueError line naming ``what`` (the flag) and the path."""
    from transformers import AutoModelForCausalLM

    return from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, what, dtype=dtype, **kwargs)


def load_tokenizer(name_or_path: str | Path, what: str = "model", *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer.from_pretrained, name_or_path, what, trust_remote_code=trust_remote_code)


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
    **load_kwargs: Any,
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
    config = from_pretrained(AutoConfig.from_pretrained, path, "reward model")
    if not is_reward_model_dir(path) or getattr(config, "num_labels", 1) != 1:
        raise ValueError(
            f"{path}: not a reward model (a train-rm output or a *ForSequenceClassification folder with one label)"
        )
    causal_name = metadata.get("causal_lm_architecture") or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    known = isinstance(causal_name, str) and causal_name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not known or not hasattr(transformers, causal_name):
        raise ValueError(
            f"{path}: no causal-LM class known for model_type {config.model_type!r}"
            + (f" ({METADATA_FILE} names {causal_name!r})" if metadata.get("causal_lm_architecture") else "")
        )
    config.architectures = [causal_name]
    with quiet_transformers():
        lm = getattr(transformers, causal_name).from_pretrained(path, config=config, dtype=dtype, **load_kwargs)
    head_file = path / LM_HEAD_FILE
    if head_file.is_file():
        from safetensors.torch import load_file

        lm.get_output_embeddings().load_state_dict(load_file(str(head_file)))
    score = nn.Linear(config.get_text_config().hidden_size, 1, bias=False)
    score.weight.data.copy_(read_safetensors(path, ["score.weight"])["score.weight"])
    model = RewardModel(lm, score.to(dtype), trainable_layers=trainable_layers, train_lm_head=train_lm_head).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=load_kwargs.get("trust_remote_code", False))
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
    with torch.device("meta"), quiet_transformers():
        exported = seq_cls(config)
    if not isinstance(getattr(exported, "score", None), nn.Linear):
        raise ValueError(f"{seq_cls.__name__} has no 'score' head; cannot export")
    backbone_state = model.backbone.state_dict()
    adapters = adapter_state(backbone_state)
    scaling = lora_scaling(model.lm) if adapters else None
    if adapters:  # the exported weights are the merged ones; the adapters are also written alone
        backbone_state = merge_lora_state(backbone_state, scaling)
    state = {f"{exported.base_model_prefix}.{k}": v.detach() for k, v in backbone_state.items()}
    state["score.weight"] = model.score.weight.detach()
    exported.load_state_dict(state, strict=True, assign=True)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        exported.save_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    if not model.tied:
        head = {k: v.detach().contiguous() for k, v in model.lm_head.state_dict().items()}
        save_file(head, str(folder / LM_HEAD_FILE))
    if adapters:
        save_file(adapters, str(folder / ADAPTER_FILE))
    info = {
        "format": 1,
        "causal_lm_architecture": type(lm).__name__,
        "tie_word_embeddings": model.tied,
        "lm_head_file": None if model.tied else LM_HEAD_FILE,
        "lora": None if not adapters else {"file": ADAPTER_FILE, "scaling": scaling, "merged": True},
        **(metadata or {}),
    }
    (folder / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def load_reward_weights(model: RewardModel, folder: Path) -> None:
    """Load a :func:`save_reward_model` folder's weights into ``model`` in place (parameters keep their identity, so
    an optimizer built on them stays valid). A model with LoRA adapters keeps its base weights and takes the
    folder's adapters, score head and LM head."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if has_lora(model.lm):
        _load_adapters(model, folder)
        return
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    prefix = next((k.split(".", 1)[0] for k in tensors if k != "score.weight"), None)
    backbone = {k.split(".", 1)[1]: v for k, v in tensors.items() if prefix and k.startswith(prefix + ".")}
    with torch.no_grad():
        model.backbone.load_state_dict(backbone, strict=True)
        model.score.weight.copy_(read_safetensors(folder, ["score.weight"])["score.weight"])
        if (folder / LM_HEAD_FILE).is_file():
            model.lm_head.load_state_dict(load_file(str(folder / LM_HEAD_FILE)))


class _Tensors:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)


class RewardModelView:
    """What :func:`save_reward_model` reads of a RewardModel (``lm`` for its config, ``tied``, ``backbone``,
    ``score.weight``, ``lm_head``), holding the weights of a full state dict of the model (keys as
    ``model.state_dict()``'s, optionally under a ``prefix`` such as a root module's ``model.``): how rank 0 exports a
    model whose weights are sharded or replicated over ranks."""

    def __init__(self, model: RewardModel, full: dict[str, torch.Tensor], prefix: str = ""):
        full = {k.removeprefix(prefix): v for k, v in full.items()}
        self.lm, self.tied = model.lm, model.tied
        backbone = f"lm.{model.lm.base_model_prefix}."
        head = next(f"lm.{n}." for n, m in model.lm.named_modules() if m is model.lm_head)
        self.backbone = _Tensors({k[len(backbone) :]: v for k, v in full.items() if k.startswith(backbone)})
        self.lm_head = _Tensors({k[len(head) :]: v for k, v in full.items() if k.startswith(head)})
        self.score = types.SimpleNamespace(weight=full["score.weight"])


def _load_adapters(model: RewardModel, folder: Path) -> None:
    from safetensors.torch import load_file

    if not (folder / ADAPTER_FILE).is_file():
        raise ValueError(f"{folder}: no {ADAPTER_FILE}; it was not written by a LoRA run")
    adapters = load_file(str(folder / ADAPTER_FILE))
    expected = set(adapter_state(model.backbone.state_dict()))
    if set(adapters) != expected:
        raise ValueError(f"{folder}: its adapters do not match this model's (--lora-r, --lora-target-modules, layers)")
    with torch.no_grad():
        model.backbone.load_state_dict(adapters, strict=False)
        model.score.weight.copy_(read_safetensors(folder, ["score.weight"])["score.weight"])
        if (folder / LM_HEAD_FILE).is_file():
            model.lm_head.load_state_dict(load_file(str(folder / LM_HEAD_FILE)))
