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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import (
    LayerInputCapture,
    StopForward,
    decoder_layers,
    final_norm,
    layer_list_name,
    train_top_layers,
)

if TYPE_CHECKING:
    from .reference import ReferenceModel


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
        return decoder_layers(self.backbone)

    @property
    def first_trainable_layer(self) -> nn.Module:
        if self.trainable_layers is None:
            raise ValueError("the model has no frozen trunk (trainable_layers is None)")
        return self.decoder_layers[len(self.decoder_layers) - self.trainable_layers]

    @property
    def final_norm(self) -> nn.Module:
        return final_norm(self.backbone)

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
            train_top_layers(self.backbone, trainable_layers)
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
        return self._run_trunk(input_ids, attention_mask).hidden

    def _run_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LayerInputCapture:
        """The frozen trunk alone: what the first trainable layer would be called with."""
        capture = LayerInputCapture(stop=True)
        handle = self.first_trainable_layer.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        return capture

    @torch.no_grad()
    def reference_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reference: ReferenceModel
    ) -> torch.Tensor:
        """The reference's final hidden states ``[B, T, D]`` alone (no reward; under ``trainable_layers`` the shared
        frozen trunk, then the reference's own top layers)."""
        with reference.running():
            if reference.top_only:
                return self._run_trunk(input_ids, attention_mask).run(reference.layers, reference.norm)
            out = reference.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state

    @contextlib.contextmanager
    def _top_layers_fed(self, trunk_hidden: torch.Tensor):
        """Run the backbone with only its top layers, the first of them fed ``trunk_hidden`` (embedding, masks and
        position embeddings are still computed by the backbone's own forward for this batch)."""
        backbone = self.backbone
        name = layer_list_name(backbone)
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
            capture = LayerInputCapture()
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
            with torch.no_grad(), reference.running():
                if capture is not None:
                    ref_hidden = capture.run(reference.layers, reference.norm)
                else:
                    ref_hidden = reference.backbone(
                        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                    ).last_hidden_state
        return RewardOutput(rewards, hidden, ref_hidden)
