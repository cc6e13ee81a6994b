"""What a config field that is a CLI option is: :func:`option` declares it with its help, choices and allowed range.
The helpers here name its flag, read its type, convert a value given as text (a flag) or as a YAML/JSON value (a
``--config`` file) the same way, and say what is wrong with a value outside its range or choices."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ..ops.validation import range_problem

MISSING = dataclasses.MISSING


def option(
    default: Any = MISSING,
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
    factory: Any = MISSING,
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
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields of ``config_class`` that are CLI options (declared with :func:`option`), in declaration order."""
    return [field for field in dataclasses.fields(config_class) if "help" in field.metadata]


def flag_name(field: dataclasses.Field) -> str:
    return "--" + (field.metadata.get("flag") or field.name.replace("_", "-"))


def is_required(field: dataclasses.Field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def default_value(field: dataclasses.Field) -> Any:
    return field.default if field.default is not MISSING else field.default_factory()


@dataclasses.dataclass(frozen=True)
class Kind:
    """How an option's values are read: ``scalar`` (int, float, str or bool) or a list of them, and whether
    ``None`` is a value (``X | None``)."""

    scalar: type
    is_list: bool
    optional: bool


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X``, ``X | None`` or ``Optional[X]``; a union of several types reads as text
    (e.g. ``str | list[dict]``: a path on the CLI, records from Python)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else str), optional
    return annotation, False


def option_kinds(config_class: type) -> dict[str, Kind]:
    """``{field name: Kind}`` of every option of ``config_class``."""
    hints = typing.get_type_hints(config_class)
    kinds = {}
    for field in option_fields(config_class):
        inner, optional = _unwrap(hints[field.name])
        is_list = typing.get_origin(inner) is list
        if is_list:
            inner, _ = _unwrap(typing.get_args(inner)[0])
        scalar = inner if inner in (int, float) or (inner is bool and not is_list) else str
        kinds[field.name] = Kind(scalar, is_list, optional)
    return kinds


def text_parser(scalar: type, optional: bool):
    """The flag's conversion of its text: ``scalar(text)``, and ``none`` or an empty text as None when optional."""

    def parse(text: str):
        if optional and text.lower() in ("none", ""):
            return None
        return scalar(text)

    parse.__name__ = getattr(scalar, "__name__", "value")  # argparse names the type in its error message
    return parse


_NOUNS = {int: "an integer", float: "a number", str: "text (quote it)", bool: "true or false"}


def _file_scalar(scalar: type, optional: bool, value: Any) -> Any:
    if isinstance(value, str) and scalar is not bool:
        try:
            return text_parser(scalar, optional)(value)
        except ValueError:
            raise ValueError(f"must be {_NOUNS[scalar]}, got {value!r}") from None
    if value is None and optional:
        return None
    if scalar is bool and isinstance(value, bool):
        return value
    if scalar in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if scalar is float or isinstance(value, int):
            return scalar(value)
    raise ValueError(f"must be {_NOUNS[scalar]}, got {value!r}")


def file_value(kind: Kind, value: Any, *, repeat: bool = False) -> Any:
    """A ``--config`` file's value converted as the flag converts its text (a string goes through the very same
    parser; a YAML/JSON number, boolean or null must match the field's type); a single value for a list field is a
    one-item list. ValueError saying what is wrong."""
    if value is None:
        if kind.optional:
            return None
        raise ValueError("needs a value, not null")
    if kind.is_list:
        items = value if isinstance(value, list) else [value]
        if not items and not repeat:
            raise ValueError("needs at least one value (or null where the flag has no default list)")
        return [_file_scalar(kind.scalar, False, item) for item in items]
    if isinstance(value, (list, dict)):
        raise ValueError(f"must be a single value, got a {type(value).__name__}")
    return _file_scalar(kind.scalar, kind.optional, value)


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


def value_problem(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` (or an item of it) for ``field``: outside its choices, or, for a number, not
    finite or outside its range (:func:`~aam_fast.ops.validation.range_problem`, the one number check); None when
    nothing is."""
    meta = field.metadata
    bounds = {key: meta.get(key) for key in ("minimum", "maximum", "above", "below")}
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if meta.get("choices") and item not in meta["choices"]:
            return f"must be one of {', '.join(map(str, meta['choices']))}, got {item!r}"
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        problem = range_problem(item, **bounds)
        if problem:
            return problem
    return None


def check_ranges(config: Any) -> None:
    """ValueError naming the flag and its allowed range or choices for the first field outside them."""
    for field in option_fields(type(config)):
        value = getattr(config, field.name)
        problem = None if value is None else value_problem(field, value)
        if problem:
            raise ValueError(f"{flag_name(field)} {problem}")
