"""Config dataclasses are the single source of every CLI flag: each field declared with :func:`option` becomes
``--field-name`` with its help, its default, its choices and its allowed range, and :func:`check_ranges` refuses a
value outside that range with one line naming the flag. Every generated command also takes ``--config FILE`` (the
same settings as YAML or JSON, :mod:`.config_file`); flags given on the command line override the file. The settings
both stages share live once, in :class:`TrainingConfig`; a stage's config subclasses it, so a flag that exists in both
stages is one field with one meaning."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from ..ops.backends import BACKENDS
from ..ops.validation import FLOAT_DTYPES
from .config_file import read_config_file
from .metrics import check_wandb_installed
from .options import (
    check_ranges,
    default_value,
    flag_name,
    is_required,
    option,
    option_fields,
    option_kinds,
    range_text,
    text_parser,
)

NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
GIVEN = "flags_given"  # the namespace attribute listing the fields set by a flag on the command line
CONFIG_HELP = (
    "YAML (.yaml/.yml) or JSON (.json) file of settings, keyed by the flags' names (lr, max_grad_norm or "
    "max-grad-norm); flags given on the command line override it. A training run saves its resolved settings as "
    "OUTPUT/config.yaml, which --config takes back"
)


class Parser(argparse.ArgumentParser):
    """argparse's parser, reading a negative number as a value (``--lr -1e-3``, ``--gamma -inf``), not as an unknown
    flag, so that the range check names the flag; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except for required flags and help texts that already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required or "(default" in help_text or "(required" in help_text:
            return help_text
        return super()._get_help_string(action)


def _record_given(namespace: argparse.Namespace, dest: str) -> None:
    if not hasattr(namespace, GIVEN):
        setattr(namespace, GIVEN, set())
    getattr(namespace, GIVEN).add(dest)


class _Store(argparse.Action):
    """argparse's ``store``, remembering that the flag was given (so that it overrides ``--config``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _record_given(namespace, self.dest)


class _Append(argparse.Action):
    """argparse's ``append`` (onto a copy of the default), remembering that the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        _record_given(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``, remembering that it was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _record_given(namespace, self.dest)


def add_config_command(subparsers, name: str, config_class: type, run, *, help: str, description: str):
    """Register subcommand ``name`` whose flags are ``config_class``'s fields and whose action is ``run(args)``."""
    parser = subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
    add_config_arguments(parser, config_class)
    parser.set_defaults(func=run)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, *, skip: tuple[str, ...] = ()) -> None:
    """``--config FILE`` and one flag per field of ``config_class`` that carries :func:`option` metadata, in
    argument groups. A field without a default is still required, as a flag or a key of the file
    (:func:`config_from_args` says which are missing)."""
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=None, help=CONFIG_HELP)
    kinds = option_kinds(config_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in option_fields(config_class):
        if field.name in skip:
            continue
        meta, kind = field.metadata, kinds[field.name]
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = meta["help"]
        limits = range_text(field)
        if limits:
            help_text += f" [{limits}]"
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "action": _Store}
        if is_required(field):
            kwargs["default"] = None
            kwargs["help"] += " (required: a flag or a key of --config FILE)"
        else:
            kwargs["default"] = default_value(field)
        if kind.scalar is bool:
            kwargs["action"] = _Switch
        elif kind.is_list:
            kwargs["type"] = kind.scalar
            if meta["repeat"]:
                kwargs["action"] = _Append
                kwargs["default"] = None  # the field's default list, filled in by config_from_args
            else:
                kwargs["nargs"] = "+"
        else:
            kwargs["type"] = text_parser(kind.scalar, kind.optional)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        group.add_argument(flag_name(field), **kwargs)


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any):
    """``config_class`` from parsed flags. Each field takes, first found: ``overrides``, a flag given on the command
    line, the ``--config`` file's value, the flag's default in ``args``, the field's default. ValueError naming the
    file and key for a bad file value, or listing the required flags that neither the flags nor the file give."""
    config_file = getattr(args, "config_file", None)
    from_file = read_config_file(config_class, config_file) if config_file else {}
    given = getattr(args, GIVEN, set())
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name in from_file and field.name not in given:
            values[field.name] = from_file[field.name]
        elif hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
            if values[field.name] is None and field.metadata.get("repeat") and not is_required(field):
                values[field.name] = default_value(field)  # an append flag not given
    values.update(overrides)
    missing = [flag_name(f) for f in option_fields(config_class) if is_required(f) and values.get(f.name) is None]
    if missing:
        raise ValueError(
            f"the following arguments are required: {', '.join(missing)} (as flags or keys of "
            f"{config_file or '--config FILE'})"
        )
    return config_class(**values)


# The compute dtypes by name (the ops' floating dtypes, declared once there); --dtype is one of them or auto.
COMPUTE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in FLOAT_DTYPES}
DTYPES = ("auto", *COMPUTE_DTYPES)
LR_SCHEDULES = ("constant", "linear", "cosine")
STRATEGIES = ("ddp", "fsdp2")
REPORTERS = ("jsonl", "tensorboard", "wandb")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")
# numpy's seed range; the data order seeds torch with seed * 1_000_003 + epoch, which stays within 64 bits
SEED_MAX = 2**32 - 1
# more torch threads than 4 per core only contend, and a huge count exhausts the thread pool
THREADS_MAX = 4 * (os.cpu_count() or 1)
# Count flags that would run for ever, or hang before the first step, when mistyped: bounds no real run reaches.
STEPS_MAX = 10**9  # at a millisecond a step, eleven days
GRAD_ACCUM_MAX = 4096  # every micro-batch of a step runs before its update: raise --batch-size or the ranks instead
LR_MAX = 1.0  # AdamW moves each weight by about lr per step: a larger one wrecks the model in one step
STEPS_HELP = "optimizer steps (at most 10^9, a bound that catches a mistyped count before it runs for ever)"
LR_HELP = "peak learning rate (AdamW; at most 1: AdamW moves each weight by about lr per step)"


@dataclasses.dataclass(kw_only=True)
class TrainingConfig:
    """The settings every training stage shares, with one meaning in all of them."""

    output: str = option(help="folder for the final model, metrics and checkpoints", group="output")
    overwrite: bool = option(
        False,
        help="start afresh in an output folder that holds an earlier run, removing only the files a run writes",
        group="output",
    )
    resume: str | None = option(
        None,
        help="'auto' (latest under OUTPUT/checkpoints, or start fresh when no run finished there) or a checkpoint "
        "folder; refused when the data, rewards or settings differ from the checkpoint's",
        group="output",
    )
    save_every: int = option(0, help="optimizer steps between checkpoints (0: none)", minimum=0, group="output")
    keep_checkpoints: int = option(2, help="checkpoints kept, newest first (0: all)", minimum=0, group="output")
    report_to: list[str] = option(
        help="metric sinks: jsonl (OUTPUT/metrics.jsonl), tensorboard (OUTPUT/tensorboard), wandb (Weights & Biases: "
        "project from WANDB_PROJECT, default aam-fast; WANDB_MODE=offline works without a network; files under "
        "WANDB_DIR, default OUTPUT/wandb; a resumed run continues the same wandb run)",
        choices=REPORTERS,
        factory=lambda: ["jsonl"],
        group="output",
    )
    run_name: str | None = option(
        None, help="the run's name in wandb (default: WANDB_NAME, else the output folder's name)", group="output"
    )
    progress: bool = option(True, help="show progress bars", group="output")

    data_split: str = option("train", help="split of a datasets source or a save_to_disk DatasetDict", group="data")
    prompt_key: str = option("prompt", help="record field holding the prompt", group="data")

    batch_size: int = option(4, help="examples per micro-batch on each rank", minimum=1, group="optimisation")
    grad_accum: int = option(
        1,
        help=f"micro-batches per optimizer step (at most {GRAD_ACCUM_MAX}: all of them run before the first update; "
        "for a larger batch raise --batch-size or the ranks)",
        minimum=1,
        maximum=GRAD_ACCUM_MAX,
        group="optimisation",
    )
    lr: float = option(1e-5, help=LR_HELP, above=0.0, maximum=LR_MAX, group="optimisation")
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
    max_steps: int | None = option(None, help=STEPS_HELP, minimum=1, maximum=STEPS_MAX, group="optimisation")
    seed: int = option(
        42,
        help="seed of the data order, initialisation and sampling",
        minimum=0,
        maximum=SEED_MAX,
        group="optimisation",
    )

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
    threads: int | None = option(
        None,
        help="torch CPU threads (default: torch's choice; at most 4 per CPU core of this machine)",
        minimum=1,
        maximum=THREADS_MAX,
        group="model",
    )
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
        if not str(self.output).strip():
            raise ValueError("--output is empty: name the run's folder (--output . for the current one)")
        if not self.report_to:
            raise ValueError(f"--report-to needs at least one of {', '.join(REPORTERS)}")
        if "wandb" in self.report_to:
            check_wandb_installed()
