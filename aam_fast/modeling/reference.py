"""The frozen reference a PR margin (or GRPO's KL) compares against: the initial model, either a frozen copy or, under
LoRA, the model itself with its adapters disabled. :func:`make_reference` decides which, once, for both stages."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .lora import adapters_disabled, has_lora
from .reward_model import RewardModel


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

    def running(self):
        """The context its forward runs in (nothing to switch: it holds its own weights)."""
        return contextlib.nullcontext()


class ModelReference:
    """The model itself as the reference, no weight copied, valid while its weights are the initial ones: for one
    pass before any step (the reference log-probs computed once, as ``aam-fast compare`` does). It has
    :class:`ReferenceModel`'s interface (``top_only``, ``layers``, ``norm``, ``backbone``, the LM head) over the
    model's own modules; :meth:`running` is the context its forward runs in."""

    def __init__(self, model: RewardModel):
        self.model = model
        self.num_layers = model.trainable_layers
        self.top_only = self.num_layers is not None
        if self.top_only:
            layers = model.decoder_layers
            self.layers, self.norm = list(layers[len(layers) - self.num_layers :]), model.final_norm
        self.backbone = model.backbone

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head_weight.detach()

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        bias = self.model.lm_head_bias
        return None if bias is None else bias.detach()

    def running(self):
        return contextlib.nullcontext()


class AdapterReference(ModelReference):
    """The reference of a LoRA reward model: the model itself with its adapters disabled, so no copy of any weight
    is kept, at any step (the adapters are all that trains; the LM head is the model's, frozen under LoRA).
    :meth:`running` switches the adapters off for the reference's forward."""

    def __init__(self, model: RewardModel):
        if not has_lora(model.lm):
            raise ValueError("AdapterReference needs a model with LoRA adapters")
        super().__init__(model)

    def running(self):
        return adapters_disabled(self.model.lm)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``model``: the GRPO policy's reference (its initial weights)."""
    return copy.deepcopy(model).requires_grad_(False).eval()


class AdaptersOff:
    """The reference of a LoRA policy: the policy itself, run with its adapters disabled (:meth:`running`), so no
    weight is copied. Its forward must run where the policy's own does (under FSDP2, with its weights gathered)."""

    def __init__(self, model: nn.Module):
        if not has_lora(model):
            raise ValueError("AdaptersOff needs a model with LoRA adapters")
        self.model = model

    def running(self):
        return adapters_disabled(self.model)


@torch.no_grad()
def mix_reference(reference: nn.Module, model: nn.Module, alpha: float) -> None:
    """``reference ← alpha·model + (1 − alpha)·reference`` parameter by parameter, in place, computed in float32
    (TRL's reference sync). ``model`` may be sharded (FSDP2): each parameter is gathered whole (a collective, in
    the same order on every rank). ValueError when the parameter names differ."""
    ours = dict(reference.named_parameters())
    theirs = list(model.named_parameters())
    if sorted(ours) != sorted(name for name, _ in theirs):
        raise ValueError("the reference's parameters do not match the model's: it is not a copy of it")
    for name, parameter in theirs:
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        target = ours[name]
        mixed = torch.lerp(target.float(), full.detach().float().to(target.device), alpha)
        target.copy_(mixed.to(target.dtype))


def make_reference(model: nn.Module, cfg) -> ReferenceModel | AdapterReference | AdaptersOff | nn.Module:
    """The frozen initial model, decided once from ``cfg.lora_r``: with LoRA the model itself with its adapters
    disabled (:class:`AdapterReference` of a reward model, :class:`AdaptersOff` of a policy: no copy); without, a
    copy (:class:`ReferenceModel` of a reward model, only its top layers under ``trainable_layers``; a
    :func:`frozen_copy` of a policy). Call it after the adapters are injected."""
    if isinstance(model, RewardModel):
        return AdapterReference(model) if cfg.lora_r else ReferenceModel(model)
    return AdaptersOff(model) if cfg.lora_r else frozen_copy(model)


def initial_reference(model: RewardModel, cfg) -> ModelReference:
    """The reference for a pass before any step, without a copy: the model with its adapters disabled under LoRA
    (as :func:`make_reference`), else the model itself (its weights are still the initial ones)."""
    return AdapterReference(model) if cfg.lora_r else ModelReference(model)
