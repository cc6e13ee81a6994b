"""Layer surgery shared by both stages and by FSDP2 wrapping: find a backbone's decoder layers and final norm, train
only the top K of them, switch dropout off, and capture the input of a decoder layer.

One finder serves every architecture the project supports: the decoder layers are the backbone's first attribute
named in :data:`LAYER_LISTS` (Llama/Qwen/Mistral/Gemma ``layers``, GPT-2 ``h``, ``blocks``), the final norm the first
in :data:`FINAL_NORMS`. The backbone of a causal LM is ``lm.base_model``; of a reward model, its ``backbone``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

LAYER_LISTS = ("layers", "h", "blocks")
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def _find_child(module: nn.Module, names: Sequence[str], what: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(module, name, None)
        if child is not None:
            return name, child
    raise ValueError(
        f"{type(module).__name__} has no {what} (looked for {', '.join(names)}); "
        "trainable_layers and FSDP2 are not supported for this architecture"
    )


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body: a reward model's ``backbone``, else a transformers model's ``base_model``."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module):
        raise ValueError(f"{type(model).__name__} has neither a backbone nor a base_model")
    return base


def layer_list_name(backbone: nn.Module) -> str:
    """The attribute of ``backbone`` that holds its decoder layers."""
    return _find_child(backbone, LAYER_LISTS, "decoder layer list")[0]


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    layers = _find_child(backbone, LAYER_LISTS, "decoder layer list")[1]
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(backbone).__name__}.{layer_list_name(backbone)} is not a ModuleList")
    return layers


def final_norm(backbone: nn.Module) -> nn.Module:
    return _find_child(backbone, FINAL_NORMS, "final norm")[1]


def train_top_layers(backbone: nn.Module, count: int) -> None:
    """Freeze ``backbone`` except its top ``count`` decoder layers and its final norm (ValueError when ``count`` is
    not in ``[1, number of layers]``)."""
    layers = decoder_layers(backbone)
    if not 1 <= count <= len(layers):
        raise ValueError(f"trainable_layers must be in [1, {len(layers)}] for this model, got {count}")
    backbone.requires_grad_(False)
    for layer in layers[len(layers) - count :]:
        layer.requires_grad_(True)
    final_norm(backbone).requires_grad_(True)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model (it applies in
    training mode): each layer's activations are recomputed in the backward instead of kept."""
    non_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL's trainers do by default)."""
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
    config = getattr(module, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is captured."""


class LayerInputCapture:
    """Forward pre-hook that records the ``(hidden, args, kwargs)`` a decoder layer was called with (and, with
    ``stop=True``, ends the forward there by raising :class:`StopForward`)."""

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
            raise StopForward
        return None

    def run(self, layers: Sequence[nn.Module], norm: nn.Module) -> torch.Tensor:
        """``norm(layers(captured input))`` with the captured call arguments."""
        hidden = self.hidden
        for layer in layers:
            hidden = layer_output(layer(hidden, *self.args, **self.kwargs))
        return norm(hidden)
