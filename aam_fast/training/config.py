"""Config dataclasses are the single source of every CLI flag: each field declared with :func:`option` becomes
``--field-name`` with its help, its default, its choices and its allowed range, and :func:`check_ranges` refuses a
value outside that range with one line naming the flag. The settings both stages share live once, in
:class:`TrainingConfig`; a stage's config subclasses it, so a flag that exists in both stages is one field with one
meaning."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from ..ops.backends import BACKENDS
from ..ops.validation import FLOAT_DTYPES

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    group: str = "training",
    repeat: bool = False,
    dest_flag: str | None = None,
    factory: Any = _MISSING,
) -> Any:
    """A config field with its CLI metadata. ``minimum``/``maximum`` are inclusive bounds, ``above``/``below``
    exclusive ones; ``repeat`` makes a list flag that may be given several times (``append``); ``dest_flag`` names
    the flag when it differs from the field's name."""
    metadata = {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "below": below,
        "group": group,
        "repeat": repeat,
        "flag": dest_flag,
    }
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except for required flags and help texts that already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_config_command(subparsers, name: str, config_class: type, run, *, help: str, description: str):
    """Register subcommand ``name`` whose flags are ``config_class``'s fields and whose action is ``run(args)``."""
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    add_config_arguments(parser, config_class)
    parser.set_defaults(func=run)
    return parser


def flag_name(field: dataclasses.Field) -> str:
    return "--" + (field.metadata.get("flag") or field.name.replace("_", "-"))


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X``, ``X | None`` or ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else str), optional
    return annotation, False


def _parser_for(kind: Any, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", ""):
            return None
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its error message
    return parse


def range_text(field: dataclasses.Field) -> str | None:
    """The allowed range of a numeric field in words, or None when it has none."""
    meta = field.metadata
    parts = []
    if meta.get("minimum") is not None:
        parts.append(f">= {meta['minimum']}")
    if meta.get("above") is not None:
        parts.append(f"> {meta['above']}")
    if meta.get("maximum") is not None:
        parts.append(f"<= {meta['maximum']}")
    if meta.get("below") is not None:
        parts.append(f"< {meta['below']}")
    return " and ".join(parts) or None


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of ``config_class`` that carries :func:`option` metadata, in argument groups."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(config_class):
        if "help" not in field.metadata or field.name in skip:
            continue
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, optional = _unwrap(hints[field.name])
        required = field.default is _MISSING and field.default_factory is _MISSING
        help_text = meta["help"]
        limits = range_text(field)
        if limits:
            help_text += f" [{limits}]"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default if field.default is not _MISSING else field.default_factory()
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            item, _ = _unwrap(item)
            kwargs["type"] = item if item in (int, float) else str
            if meta["repeat"]:
                kwargs["action"] = "append"
                if not required:
                    kwargs["default"] = None  # argparse appends to a default list in place
            else:
                kwargs["nargs"] = "+"
        else:
            kwargs["type"] = _parser_for(kind if kind in (int, float) else str, optional)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        group.add_argument(flag_name(field), **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any):
    """``config_class`` from parsed flags (fields absent from ``args`` keep their defaults)."""
    values = {}
    for field in dataclasses.fields(config_class):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            if value is None and field.metadata.get("repeat") and field.default_factory is not _MISSING:
                value = field.default_factory()
            values[field.name] = value
    values.update(overrides)
    return config_class(**values)


def check_ranges(config: Any) -> None:
    """ValueError naming the flag and its allowed range or choices for the first field outside them."""
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        if "help" not in meta or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if meta.get("choices") and item not in meta["choices"]:
                raise ValueError(
                    f"{flag_name(field)} must be one of {', '.join(map(str, meta['choices']))}, got {item!r}"
                )
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            bad = not math.isfinite(item) and range_text(field) is not None
            bad |= meta.get("minimum") is not None and item < meta["minimum"]
            bad |= meta.get("maximum") is not None and item > meta["maximum"]
            bad |= meta.get("above") is not None and not item > meta["above"]
            bad |= meta.get("below") is not None and not item < meta["below"]
            if bad:
                raise ValueError(f"{flag_name(field)} must be {range_text(field)}, got {item}")


# The compute dtypes by name (the ops' floating dtypes, declared once there); --dtype is one of them or auto.
COMPUTE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
DTYPES = ("auto", *COMPUTE_DTYPES)
LR_SCHEDULES = ("constant", "linear", "cosine")
STRATEGIES = ("ddp", "fsdp2")
REPORTERS = ("jsonl", "tensorboard")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")


@dataclasses.dataclass(kw_only=True)
class TrainingConfig:
    """The settings every training stage shares, with one meaning in all of them."""

    output: str = option(help="folder for the final model, metrics and checkpoints", group="output")
    overwrite: bool = option(
        False, help="start afresh in an output folder that holds another run's checkpoints", group="output"
    )
    resume: str | None = option(
        None, help="'auto' (latest under OUTPUT/checkpoints, or start fresh) or a checkpoint folder", group="output"
    )
    save_every: int = option(0, help="optimizer steps between checkpoints (0: none)", minimum=0, group="output")
    keep_checkpoints: int = option(2, help="checkpoints kept, newest first (0: all)", minimum=0, group="output")
    report_to: list[str] = option(
        help="metric sinks: jsonl (OUTPUT/metrics.jsonl) and/or tensorboard (OUTPUT/tensorboard)",
        choices=REPORTERS,
        factory=lambda: ["jsonl"],
        group="output",
    )
    progress: bool = option(True, help="show progress bars", group="output")

    data_split: str = option("train", help="split of a datasets source or a save_to_disk DatasetDict", group="data")
    prompt_key: str = option("prompt", help="record field holding the prompt", group="data")

    batch_size: int = option(4, help="examples per micro-batch on each rank", minimum=1, group="optimisation")
    grad_accum: int = option(1, help="micro-batches per optimizer step", minimum=1, group="optimisation")
    lr: float = option(1e-5, help="peak learning rate (AdamW)", above=0.0, group="optimisation")
    lr_schedule: str = option(
        "cosine", help="decay after warmup (transformers' schedules)", choices=LR_SCHEDULES, group="optimisation"
    )
    warmup_ratio: float = option(
        0.0, help="fraction of the steps spent warming up linearly from 0", minimum=0.0, below=1.0, group="optimisation"
    )
    warmup_steps: int = option(
        0, help="warmup steps (overrides --warmup-ratio when > 0)", minimum=0, group="optimisation"
    )
    weight_decay: float = option(0.0, help="AdamW weight decay", minimum=0.0, group="optimisation")
    max_grad_norm: float = option(
        1.0, help="clip the global gradient norm to this (0: no clipping)", minimum=0.0, group="optimisation"
    )
    max_steps: int | None = option(None, help="optimizer steps", minimum=1, group="optimisation")
    seed: int = option(42, help="seed of the data order, initialisation and sampling", minimum=0, group="optimisation")

    trainable_layers: int | None = option(
        None, help="train only the top K decoder layers and the final norm (default: all)", minimum=1, group="model"
    )
    dtype: str = option(
        "auto",
        help="compute dtype: float32 master weights under autocast to this dtype (auto: bfloat16 on CUDA, float32 "
        "elsewhere)",
        choices=DTYPES,
        group="model",
    )
    device: str = option("auto", help="cpu, cuda, cuda:N or auto (cuda when available)", group="model")
    threads: int | None = option(None, help="torch CPU threads (default: torch's choice)", minimum=1, group="model")
    backend: str = option("auto", help="linear_logprobs backend", choices=BACKENDS, group="model")
    strategy: str = option(
        "ddp",
        help="under torchrun (WORLD_SIZE>1): ddp replicates the model, fsdp2 shards it per decoder layer",
        choices=STRATEGIES,
        group="model",
    )
    packing: bool = option(
        False,
        help="padding-free batches: sequences concatenated, positions restarting (flash-attn varlen or SDPA)",
        group="model",
    )
    liger: bool = option(True, help="Liger-Kernel's RMSNorm/RoPE/SwiGLU patches on CUDA where installed", group="model")
    gradient_checkpointing: bool = option(
        False,
        help="recompute each decoder layer's activations in the backward (non-reentrant): far less activation "
        "memory for about one more forward",
        group="model",
    )
    lora_r: int = option(
        0,
        help="LoRA rank (0: no adapters, the chosen weights train in full); with LoRA the frozen reference is the "
        "model with its adapters disabled, no second copy",
        minimum=0,
        group="model",
    )
    lora_alpha: float = option(
        16.0, help="LoRA scale numerator: updates are scaled by alpha / r", above=0.0, group="model"
    )
    lora_dropout: float = option(0.0, help="dropout on the LoRA branch's input", minimum=0.0, below=1.0, group="model")
    lora_target_modules: list[str] | None = option(
        None,
        help="names of the linear layers that get adapters, e.g. q_proj v_proj (default: every linear layer of the "
        "decoder layers, attention and MLP; with --trainable-layers K only the top K layers)",
        group="model",
    )
    attn_implementation: str | None = option(
        None,
        help="attention kernel of the model (default: transformers' choice, SDPA where available)",
        choices=ATTENTIONS,
        group="model",
    )
    trust_remote_code: bool = option(
        False, help="allow model folders that ship their own modelling code (runs that code)", group="model"
    )

    def load_kwargs(self) -> dict[str, Any]:
        """What ``from_pretrained`` takes of these settings."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def validate(self) -> None:
        """Ranges and choices of every flag; stages add their cross-field checks."""
        check_ranges(self)
        if not self.report_to:
            raise ValueError("--report-to needs at least one of jsonl, tensorboard")
