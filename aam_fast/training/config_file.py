"""A run described by a file. ``--config FILE`` (YAML or JSON; keys are the config's field names or their flag
spellings, ``max_grad_norm`` or ``max-grad-norm``) is read and checked exactly as the flags are; the resolved config
is written beside the run (``OUTPUT/config.yaml``) so that ``--config OUTPUT/config.yaml`` runs it again.

Left out of the saved file, each with a comment saying why: ``overwrite`` (running the saved file must never delete
the run it came from) and values a file cannot hold (Python objects given through the API, e.g. GRPO's prompt
records or reward functions as callables)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .options import file_value, flag_name, option_fields, option_kinds, value_problem
from .run_folder import write_text_atomic

CONFIG_FILE = "config.yaml"
NOT_SAVED = {"overwrite": "give --overwrite again to start afresh in a folder that holds a run"}
SUFFIXES = (".yaml", ".yml", ".json")


class _KeyTwice(Exception):
    def __init__(self, key: Any, line: int | None):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping giving one key twice is refused (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise _KeyTwice(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _KeyTwice(key, None)
    return dict(pairs)


def _parse(path: Path) -> Any:
    """The file's content: YAML or JSON by its suffix; ValueError naming the file for anything unreadable."""
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--config {path}: must be a .yaml, .yml or .json file")
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _KeyTwice as exc:
        raise ValueError(f"{path}: key {exc.key!r} given twice" + (f" (line {exc.line})" if exc.line else "")) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") from None


def _spellings(config_class: type) -> dict[str, Any]:
    """Every key that names an option: its field name and its flag, each with dashes or underscores."""
    keys = {}
    for field in option_fields(config_class):
        for name in (field.name, flag_name(field)[2:]):
            keys[name.replace("-", "_")] = field
            keys[name.replace("_", "-")] = field
    return keys


def read_config_file(config_class: type, path: str | Path) -> dict[str, Any]:
    """``{field name: value}`` of the settings in ``path``, converted and checked as the flags are (same types,
    choices, ranges and finiteness). ValueError ``FILE: KEY: what is wrong`` for an unknown key, a key given twice
    (in any spelling), a wrong type or a value out of range."""
    path = Path(path)
    content = _parse(path)
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"{path}: must hold settings as 'key: value' lines, got a {type(content).__name__}")
    spellings, kinds = _spellings(config_class), option_kinds(config_class)
    values: dict[str, Any] = {}
    for key, value in content.items():
        field = spellings.get(key) if isinstance(key, str) else None
        if field is None:
            close = difflib.get_close_matches(str(key), list(spellings), n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (the keys are the command's flags, see --help)"
            raise ValueError(f"{path}: unknown key {key!r}{hint}")
        if field.name in values:
            raise ValueError(f"{path}: {key}: sets {field.name} a second time")
        try:
            converted = file_value(kinds[field.name], value, repeat=field.metadata["repeat"])
            problem = None if converted is None else value_problem(field, converted)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise ValueError(f"{path}: {key}: {problem}")
        values[field.name] = converted
    return values


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper writing lists on one line (``report_to: [jsonl, tensorboard]``), mappings as blocks."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True))


def _file_can_hold(value: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar[:3]) for v in value))


def config_values(cfg: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``cfg``'s options as plain values ``{name: value}``, and ``{name: why}`` for those left out (see the module
    docstring)."""
    values, left_out = {}, {}
    for field in option_fields(type(cfg)):
        value = getattr(cfg, field.name)
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        value = list(value) if isinstance(value, tuple) else value
        if field.name in NOT_SAVED:
            left_out[field.name] = NOT_SAVED[field.name]
        elif not _file_can_hold(value):
            left_out[field.name] = (
                f"given from Python as a {type(value).__name__} holding objects a file cannot; "
                f"give {flag_name(field)} to run this again"
            )
        else:
            values[field.name] = value
    return values, left_out


def config_text(cfg: Any) -> str:
    """``cfg``'s options as YAML, a commented section per flag group, the left-out settings named at the top."""
    values, left_out = config_values(cfg)
    lines = [
        f"# The resolved settings of this run ({type(cfg).__name__}: defaults, then --config, then flags).",
        "# Run it again with `aam-fast COMMAND --config THIS_FILE --output ANOTHER_FOLDER` (flags override the file).",
    ]
    lines += [f"# not saved: {name}: {why}" for name, why in left_out.items()]
    groups: dict[str, dict[str, Any]] = {}
    for field in option_fields(type(cfg)):
        if field.name in values:
            groups.setdefault(field.metadata["group"], {})[field.name] = values[field.name]
    for group, settings in groups.items():
        dumped = yaml.dump(settings, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
        lines += ["", f"# {group}", dumped.rstrip("\n")]
    return "\n".join(lines) + "\n"


def save_config(cfg: Any, folder: str | Path) -> Path:
    """Write ``folder/config.yaml`` (through a temporary file and a rename: never half-written); returns its path."""
    path = Path(folder) / CONFIG_FILE
    write_text_atomic(path, config_text(cfg))
    return path
