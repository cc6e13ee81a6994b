"""LoRA adapters through peft, injected in place into a model's decoder layers, and the reference they give for free.

``W x`` becomes ``W x + (α / r) · B A x`` for the chosen linear layers (``A`` r × in, ``B`` out × r, ``B`` starting at
zero), the base weights frozen. The frozen initial model that a PR margin (or GRPO's KL) compares against is then the
same model with its adapters disabled: no second copy of the weights is kept. With ``trainable_layers = K`` the
adapters go into the top K decoder layers only, so the frozen trunk below them is shared by the model and its
reference.

Exports merge the adapters into the base weights (:func:`merge_lora_state`, on a state dict, so it works as well on
the full state dict gathered from sharded ranks); :func:`adapter_state` is the adapters alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from .layers import decoder_layers

ADAPTER = "default"
ADAPTER_FILE = "adapter_model.safetensors"
logger = logging.getLogger(__name__)


def _require_peft():
    try:
        import peft
    except ImportError as exc:  # an optional dependency until a user asks for LoRA
        raise ValueError(f"LoRA needs the peft package (pip install peft): {exc}") from None
    return peft


def lora_targets(
    model: nn.Module, backbone: nn.Module, layers: Sequence[int] | None, names: Sequence[str] | None
) -> list[str]:
    """Full names (in ``model``) of the ``nn.Linear`` modules of the chosen decoder layers (all by default) whose last
    name component is in ``names`` (default: every linear layer of a decoder layer, attention and MLP)."""
    prefix = next(name for name, module in model.named_modules() if module is backbone)
    listing = decoder_layers(backbone)
    layer_prefix = next(name for name, module in backbone.named_modules() if module is listing)
    chosen = range(len(listing)) if layers is None else layers
    targets = []
    for index in chosen:
        for name, module in listing[index].named_modules():
            if isinstance(module, nn.Linear) and (names is None or name.rsplit(".", 1)[-1] in names):
                targets.append(".".join(p for p in (prefix, layer_prefix, str(index), name) if p))
    if not targets:
        raise ValueError(f"--lora-target-modules {list(names or [])} matches no linear layer of the decoder layers")
    return targets


def add_lora(
    model: nn.Module,
    backbone: nn.Module,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None,
    trainable_layers: int | None,
) -> int:
    """Inject LoRA adapters into ``model`` in place (its base weights frozen); returns the adapter parameter count.
    ValueError when ``r`` exceeds the rank every targeted layer can have."""
    peft = _require_peft()
    count = len(decoder_layers(backbone))
    layers = None if trainable_layers is None else list(range(count - trainable_layers, count))
    targets = lora_targets(model, backbone, layers, target_modules)
    modules = dict(model.named_modules())
    full_rank = max(min(modules[name].in_features, modules[name].out_features) for name in targets)
    if r > full_rank:  # a mistyped rank allocated r x width per layer before the first step
        raise ValueError(
            f"--lora-r {r} exceeds the rank of every targeted layer (at most {full_rank} here): a larger rank adds "
            "parameters and no capacity"
        )
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    for parameter in adapters:
        parameter.requires_grad_(True)
    return sum(p.numel() for p in adapters)


def add_configured_lora(cfg, model: nn.Module, backbone: nn.Module) -> int:
    """LoRA adapters as a training config asks (``cfg.lora_r`` > 0, else nothing; ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``, ``trainable_layers``): injected into ``model``, logged; returns the adapter parameter
    count (0 without LoRA)."""
    if not cfg.lora_r:
        return 0
    count = add_lora(
        model,
        backbone,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        trainable_layers=cfg.trainable_layers,
    )
    logger.info(
        f"LoRA: {count:,} adapter parameters (r={cfg.lora_r}, alpha={cfg.lora_alpha}); the base and LM head are frozen"
    )
    return count


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base, adapters off. Only the layers' switch is flipped (peft's ``_disable_adapters``,
    which its ``enable_adapters`` sets too): unlike ``enable_adapters`` this leaves every ``requires_grad`` flag
    alone, so it is safe between a forward that trains the adapters and its backward, and under FSDP2."""
    layers = tuner_layers(model)
    if not layers or not all(hasattr(layer, "_disable_adapters") for layer in layers):
        raise ValueError("adapters_disabled: the model has no peft LoRA layers with an adapter switch")
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer._disable_adapters = flag


def lora_scaling(model: nn.Module) -> float:
    """The ``α / r`` of the model's adapters (one value: they are injected with one config)."""
    values = {float(layer.scaling[ADAPTER]) for layer in tuner_layers(model)}
    if len(values) != 1:
        raise ValueError(f"expected one LoRA scaling, found {sorted(values)}")
    return values.pop()


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict with every LoRA layer merged into its base weight, under the plain module's keys:
    ``X.base_layer.weight + scaling · X.lora_B.W @ X.lora_A.W`` becomes ``X.weight`` (float32 arithmetic), the
    ``X.base_layer.bias`` becomes ``X.bias`` and the adapter tensors are dropped. A state without LoRA is returned
    unchanged."""
    suffix_a = f".lora_A.{ADAPTER}.weight"
    merged = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, _, leaf = key.partition(".base_layer.")
            if leaf == "weight" and f"{prefix}{suffix_a}" in state:
                a = state[f"{prefix}{suffix_a}"].float()
                b = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
                value = (value.float() + scaling * (b @ a)).to(value.dtype)
            merged[f"{prefix}.{leaf}"] = value
        else:
            merged[key] = value
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a state dict (``*.lora_A/B.*``), contiguous, for a safetensors file."""
    return {k: v.detach().contiguous() for k, v in state.items() if "lora_" in k}
