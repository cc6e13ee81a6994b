"""DAPO's dynamic sampling as prompt slots: an optimizer step has ``grad_accum`` micro-batches of ``batch_size ×
ranks`` slots, slot ``p`` (global, ``micro × batch_size × ranks + j``) sampled by the rank that owns it in every
round. After each round the groups whose rewards are all equal are known on every rank (gathered); their slots take
the next prompts of the shared stream, in slot order, sampled from seeds of ``(step, round's position)``, so the rounds
draw the same completions however the step is split over ranks. A micro-batch is then its slots' last groups, merged
(:func:`merge_groups`); a slot still uninformative after the last round is ``left_out`` of the loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ...data import IGNORE_INDEX
from .rollout import MicroBatch


@dataclasses.dataclass
class SlotGroup:
    """The group a slot holds: a sampled micro-batch part and the group's index in it."""

    part: MicroBatch
    index: int
    constant: bool  # every reward of the group equal


Plan = list[list[tuple[int, dict]]]  # per micro-batch: this rank's (slot, prompt record) pairs


def sample_rounds(
    plan: Plan,
    sample: Callable[[list[tuple[int, dict]], int], tuple[MicroBatch, list[bool], int]],
    ctx,
    stream,
    max_rounds: int | None,
) -> tuple[list[list[SlotGroup]], dict]:
    """Per micro-batch of ``plan`` this rank's slots' final groups, and ``{"cut": prompts cut on this rank}`` plus,
    with dynamic sampling, its metrics (over every rank: groups dropped, rounds run, groups left out).

    ``sample(pairs, round)`` samples and scores one micro-batch's part: ``(part, constant per group, prompts cut)``.
    ``max_rounds`` None: one round, nothing dropped. Otherwise after each round the constant groups of every rank
    are gathered (``ctx.gather_objects``), their slots take the next prompts of ``stream`` in slot order and are
    sampled again by their owners, for at most ``max_rounds`` more rounds."""
    micro_of = {p: m for m, pairs in enumerate(plan) for p, _ in pairs}
    owned, slots, cut, dropped, empty = plan, {}, 0, 0, []
    rounds = 1 if max_rounds is None else 1 + max_rounds
    for round_ in range(rounds):
        for pairs in plan:
            if pairs:
                part, constant, part_cut = sample(pairs, round_)
                cut += part_cut
                for i, (p, _) in enumerate(pairs):
                    slots[p] = SlotGroup(part, i, constant[i] and max_rounds is not None)
        if max_rounds is None:
            break
        flags = ctx.gather_objects([(p, slots[p].constant) for pairs in plan for p, _ in pairs])
        empty = sorted(p for p, constant in flags if constant)
        dropped += len(empty)
        if not empty or round_ == rounds - 1:
            break
        plan = [[] for _ in plan]
        for p, record in zip(empty, stream.take(len(empty)), strict=True):
            if p in micro_of:
                plan[micro_of[p]].append((p, record))
    extra = {"cut": cut}
    if max_rounds is not None:
        extra["dynamic_sampling/groups_dropped"] = dropped
        extra["dynamic_sampling/rounds"] = round_ + 1
        extra["dynamic_sampling/groups_left_out"] = len(empty)
    return [[slots[p] for p, _ in pairs] for pairs in owned], extra


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    extra = width - tensor.shape[1]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], extra), value)], dim=1)


def _pad_left(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    extra = width - tensor.shape[1]
    if extra == 0:
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], extra), value), tensor], dim=1)


def merge_groups(groups: list[SlotGroup], num_generations: int, pad_id: int) -> MicroBatch:
    """One micro-batch of the slots' groups in order, prompts left-padded and completions right-padded to the
    widest; the slots whose group is ``constant`` are ``left_out``. The part itself when the groups are all of one
    part, in order (no resampling happened)."""
    parts = {id(g.part) for g in groups}
    G = num_generations
    left_out = torch.tensor([g.constant for g in groups for _ in range(G)])
    first = groups[0].part
    if len(parts) == 1 and [g.index for g in groups] == list(range(first.targets.shape[0] // G)):
        return dataclasses.replace(first, left_out=left_out.to(first.targets.device))
    prompt_len = max(g.part.prompt_len for g in groups)
    width = max(g.part.targets.shape[1] for g in groups)

    def rows(g: SlotGroup, name: str):
        value = getattr(g.part, name)
        return None if value is None else value[g.index * G : (g.index + 1) * G]

    def joined(name: str, pad_value=None, columns: str = "row"):
        """``columns``: "row" (one value or a reward row per sample), "completion" ([rows, C], right-padded) or
        "sequence" ([rows, P + C]: prompt columns left-padded, completion columns right-padded)."""
        pieces = []
        for g in groups:
            value = rows(g, name)
            if value is None:
                return None
            if columns == "sequence":
                prompt, completion = value[:, : g.part.prompt_len], value[:, g.part.prompt_len :]
                value = torch.cat(
                    [_pad_left(prompt, prompt_len, pad_value), _pad_right(completion, width, pad_value)], 1
                )
            elif columns == "completion":
                value = _pad_right(value, width, pad_value)
            pieces.append(value)
        return torch.cat(pieces)

    return MicroBatch(
        input_ids=joined("input_ids", pad_id, "sequence"),
        attention_mask=joined("attention_mask", 0, "sequence"),
        prompt_len=prompt_len,
        targets=joined("targets", IGNORE_INDEX, "completion"),
        truncated=joined("truncated"),
        prompts=[p for g in groups for p in g.part.prompts[g.index * G : (g.index + 1) * G]],
        completions=[c for g in groups for c in g.part.completions[g.index * G : (g.index + 1) * G]],
        rewards=joined("rewards"),
        reward_table=joined("reward_table"),
        old_logps=joined("old_logps", 0.0, "completion"),
        ref_logps=joined("ref_logps", 0.0, "completion"),
        left_out=left_out.to(first.targets.device),
    )
