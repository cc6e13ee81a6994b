"""The AAM-PR reward model as a TRL user would write it without aam_fast: a `RewardTrainer` subclass whose loss
materialises the LM logits of the model and of a frozen copy of it (the ``trl-pr`` case of bench.e2e.reward_model).

Per batch of B pairs (``[chosen; rejected]``, 2B right-padded rows), with the defaults of ``train-rm --margin pr``
(β = 1, γ = 1, ``length_norm="mean"``, detached margin):

- rewards ``r`` from the sequence-classification model (TRL's forward), and its final hidden states ``h``
  (``output_hidden_states``; the last one is post-norm);
- ``L_θ(y) = mean over response tokens of log_softmax(h_t Wᵀ)[y_{t+1}]`` with ``W`` the causal LM's head weight
  (the input embedding when tied): the full ``[2B, T, V]`` float32 logits exist, forward only (the margin is
  detached);
- ``L_ref(y)`` the same from a frozen deep copy of the initial model (a second, gradient-free forward);
- ``m = β·[(L_θ(c) − L_θ(r)) − γ·(L_ref(c) − L_ref(r))]`` and ``loss = −log σ(r_c − r_r − m)``, mean over pairs,
  as ``aam_fast.AAMLoss``.

The response tokens are those after the prompt: the prompt (the messages the chosen and rejected conversations
share) rendered with the generation prompt, and the longest common token prefix of it with the whole conversation
(TRL's ``common_prefix_length``), as train-rm finds them. `response_spans` pre-tokenises a conversational preference
dataset that way (``chosen_ids``/``rejected_ids`` as RewardTrainer's own tokenisation, plus the prompt lengths).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import RewardTrainer
from trl.data_utils import common_prefix_length

SPAN_COLUMNS = ("chosen_prompt_len", "rejected_prompt_len")


def prompt_messages(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The messages both conversations start with (at most all but the last message of each)."""
    shared = 0
    for a, b in zip(chosen[:-1], rejected[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return chosen[:shared]


def tokenize_with_spans(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    """``chosen_ids``/``rejected_ids`` (the chat template, as RewardTrainer tokenises conversational records) and
    ``chosen_prompt_len``/``rejected_prompt_len``: the tokens they share with the prompt rendered with the generation
    prompt, leaving at least one response token."""
    if not isinstance(example.get("chosen"), list) or not isinstance(example.get("rejected"), list):
        raise ValueError("example must be a conversational record: 'chosen' and 'rejected' lists of messages")
    prompt = prompt_messages(example["chosen"], example["rejected"])
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    out = {}
    for key in ("chosen", "rejected"):
        ids = list(tokenizer.apply_chat_template(example[key], tokenize=True, return_dict=True)["input_ids"])
        out[f"{key}_ids"] = ids
        out[f"{key}_prompt_len"] = min(common_prefix_length(list(prompt_ids["input_ids"]), ids), len(ids) - 1)
    return out


def response_spans(dataset, tokenizer):
    """A conversational preference `datasets.Dataset` pre-tokenised by `tokenize_with_spans` (RewardTrainer skips
    its own tokenisation for it, and still filters by ``max_length``)."""
    return dataset.map(tokenize_with_spans, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names)


@dataclass
class ResponseSpanCollator:
    """TRL's preference collator plus ``response_mask [2B, T]``: True at the response tokens of each row."""

    base: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.base([{k: e[k] for k in ("chosen_ids", "rejected_ids")} for e in examples])
        spans = [(e["chosen_prompt_len"], len(e["chosen_ids"])) for e in examples]
        spans += [(e["rejected_prompt_len"], len(e["rejected_ids"])) for e in examples]
        starts, ends = torch.tensor(spans).unbind(-1)
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["response_mask"] = (positions >= starts[:, None]) & (positions < ends[:, None])
        return batch


def lm_head_weight(model) -> torch.Tensor:
    """The causal LM's output-embedding weight ``[V, D]`` of a sequence-classification model whose head is tied
    (a `*ForSequenceClassification` has no ``lm_head``; tied, it is the input embedding)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        raise ValueError("the trl-pr baseline needs a model with a tied LM head (tie_word_embeddings)")
    return model.get_input_embeddings().weight


def materialised_sequence_logps(
    hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Mean response-token log-prob ``[rows]`` from the full logits: ``log_softmax(h[:, :-1] Wᵀ)`` gathered at
    ``input_ids[:, 1:]`` where ``response_mask[:, 1:]``."""
    logits = hidden[:, :-1].float() @ weight.float().T  # [rows, T-1, V]
    token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = response_mask[:, 1:].to(token_logps.dtype)
    return (token_logps * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


class AAMPRRewardTrainer(RewardTrainer):
    """`RewardTrainer` with the AAM-PR loss from materialised logits (see the module docstring). The datasets must
    come from `response_spans`; ``beta`` and ``gamma`` as in ``aam_fast.AAMLoss``."""

    def __init__(self, *args, beta: float = 1.0, gamma: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.gamma = float(beta), float(gamma)
        self.data_collator = ResponseSpanCollator(self.data_collator)
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", *SPAN_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        response_mask = inputs.pop("response_mask")
        inputs["use_cache"] = False
        outputs = model(**inputs, output_hidden_states=True)
        rewards = outputs.logits.squeeze(-1)
        rewards_chosen, rewards_rejected = torch.chunk(rewards, chunks=2)
        ids = inputs["input_ids"]
        with torch.no_grad():  # the margin is detached: no graph through the logits
            policy = materialised_sequence_logps(outputs.hidden_states[-1], lm_head_weight(model), ids, response_mask)
            reference_hidden = self.ref_model(**inputs, output_hidden_states=True).hidden_states[-1]
            reference = materialised_sequence_logps(
                reference_hidden, lm_head_weight(self.ref_model), ids, response_mask
            )
            pairs = rewards_chosen.shape[0]
            margin = self.beta * (
                (policy[:pairs] - policy[pairs:]) - self.gamma * (reference[:pairs] - reference[pairs:])
            )
        loss = -F.logsigmoid(rewards_chosen.float() - rewards_rejected.float() - margin).mean()

        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            metrics["min_reward"].append(rewards.min().item())
            metrics["mean_reward"].append(rewards.mean().item())
            metrics["max_reward"].append(rewards.max().item())
            metrics["accuracy"].append((rewards_chosen > rewards_rejected).float().mean().item())
            metrics["margin"].append((rewards_chosen - rewards_rejected).mean().item())
            metrics["aam_margin/mean"].append(margin.mean().item())
        # Only the rewards go back (evaluation gathers every returned tensor; the hidden states would be kept too).
        return (loss, {"logits": outputs.logits}) if return_outputs else loss
