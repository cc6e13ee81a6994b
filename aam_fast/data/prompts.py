"""Prompt loading for the GRPO stage.

`load_prompts(path)` returns a list of records `{"prompt": str | list[{"role", "content"}], **columns}`, the
form TRL's GRPO trainer consumes: `prompt` is what the policy continues, the other columns are handed to rule
reward functions as keyword arguments (one list per column). Four layouts are recognised by their fields:

- RPBench-Auto character cards (`npc_profile`, `conversation`, `background`), e.g.
  `../shared/data/rpbench-auto/rpbench_character.jsonl`. Each card becomes the conversation RPBench-Auto itself
  feeds the model under test: a system message (the benchmark's own profile template, text kept verbatim), the
  character's greeting as the first assistant turn, and an opening user turn. The benchmark simulates the user with
  a judge model, so the data has no user line: a fixed `opening_turn` stands in for it. `scenes=FILE`
  (`rpbench_scene.jsonl`) adds the scene with the same `id` to the system message and uses the scene's greeting.
- Any source of `read_records` (json/jsonl/parquet/csv file, gzipped too; a `save_to_disk` folder; a `datasets`
  name) with a `prompt` column (or the one `prompt_key` names) holding a string or a message list, including
  the demo's role-play profiles (`aam_fast/demo/roleplay_pairs.jsonl`, TRL conversational preference records).
  Preference files (`chosen`/`rejected` present) give each distinct prompt once, with the columns that are
  properties of the prompt (one value per prompt, such as `character` and `language`).
- Alpaca-style records (`instruction`, optional `input`, `system`, `history`; no `prompt`): the prompt is the
  conversation of `aam_fast.data.formats.alpaca_prompt`; other columns (such as `output`) are kept.

Bad files and records raise `ValueError` naming the file and the record index.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .formats import alpaca_prompt, is_alpaca
from .messages import Text, check_messages, check_unicode
from .sources import iter_source_records

logger = logging.getLogger(__name__)

Prompt = Text
DEFAULT_OPENING_TURN = "*I look at you, waiting for you to go on.*"
PREFERENCE_COLUMNS = ("chosen", "rejected", "margin")
ALPACA_PROMPT_FIELDS = ("instruction", "input", "system", "history")  # folded into the prompt

# RPBench-Auto's candidate system prompt (run_character_eval.py), so that prompts match the benchmark's.
RPBENCH_CHARACTER_TEMPLATE = (
    "{background}\n\n# NPC Profile:\n## Name\n{name_text}\n\n## Title\n{title}\n\n## Description\n{description}\n\n"
    "## Definition\n{definition_text}\n\n## Long Definition\n{long_definition_text}\n"
)
RPBENCH_PROFILE_FIELDS = ("name_text", "title", "description", "definition_text", "long_definition_text")
# The scene sections of RPBench-Auto's scene template, without its JSON reply instruction.
RPBENCH_SCENE_SECTIONS = (
    ("background", "Scene background"),
    ("plot_recap", "Previous plots recap"),
    ("objectives", "Current objectives"),
    ("progression", "When to end the scene"),
    ("npc_status", "NPC status"),
)


def read_records(path: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """Records of a source of :mod:`aam_fast.data.sources` (a json/jsonl/parquet/csv file, each optionally `.gz`,
    a `save_to_disk` folder or a `datasets` name; `split` picks the split); an unreadable record raises."""
    records = []
    for index, record in iter_source_records(path, split=split):
        if isinstance(record, Exception):
            raise record
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
        records.append(dict(record))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def check_prompt(prompt: Any, where: str) -> Prompt:
    """Validate a prompt (non-empty string, or non-empty message list not ending with an assistant turn; the message
    check of :mod:`aam_fast.data.messages`); `where` names it."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: empty prompt")
        check_unicode(prompt, f"{where}: prompt")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: prompt must be a non-empty string or message list, got {type(prompt).__name__}")
    messages = check_messages(prompt, f"{where}: prompt")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last message is an assistant turn; a prompt must end before the reply")
    return messages


def load_prompts(
    path: str | Path,
    *,
    scenes: str | Path | None = None,
    opening_turn: str = DEFAULT_OPENING_TURN,
    limit: int | None = None,
    split: str = "train",
    prompt_key: str = "prompt",
) -> list[dict[str, Any]]:
    """Prompt records `{"prompt": ..., **columns}` from `path` (format detected from the fields; see module doc).

    `path` is any source of `read_records` (`split` for a `DatasetDict` folder or a `datasets` name); `prompt_key`
    names the prompt column. Every record has the same column names (missing values are None). `limit` (>= 1)
    keeps the first records.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not isinstance(prompt_key, str) or not prompt_key:
        raise ValueError(f"prompt_key must be a non-empty string, got {prompt_key!r}")
    records = read_records(path, split=split)
    if prompt_key != "prompt":
        records = [_rename_prompt(record, prompt_key, f"{path}: record {i}") for i, record in enumerate(records)]
    if _is_rpbench_card(records[0]):
        prompts = _rpbench_prompts(Path(path), records, scenes, opening_turn)
    else:
        if scenes is not None:
            raise ValueError(f"scenes={scenes}: scenes apply only to RPBench character cards, not to {path}")
        prompts = _column_prompts(path, records)
    if limit is not None:
        prompts = prompts[:limit]
    columns = sorted({key for record in prompts for key in record} - {"prompt"})
    return [{"prompt": r["prompt"], **{c: r.get(c) for c in columns}} for r in prompts]


def records_fingerprint(records: list[dict[str, Any]]) -> str:
    """SHA-256 (hex) of prompt records' content and order: a GRPO run's identity."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "replace"))
        digest.update(b"\x00")
    return digest.hexdigest()


def load_prompt_records(
    prompts: str | Path | list[dict[str, Any]],
    *,
    scenes: str | Path | None = None,
    opening_turn: str = DEFAULT_OPENING_TURN,
    split: str = "train",
    prompt_key: str = "prompt",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """GRPO's prompt records: :func:`load_prompts` of a source, or (from Python) a list of records as given; the
    first ``limit`` of them. ValueError naming ``--prompts`` when there is none."""
    if isinstance(prompts, (str, Path)):
        records = load_prompts(prompts, scenes=scenes, opening_turn=opening_turn, split=split, prompt_key=prompt_key)
    else:
        records = list(prompts)
    if not records:
        raise ValueError("--prompts: no prompt records")
    return records[:limit] if limit else records


def prompts_per_character(path: str | Path, count: int) -> list[dict[str, Any]]:
    """The first prompt record of each character (the ``character`` column) of ``path``, in file order, at most
    ``count`` of them."""
    chosen, characters = [], set()
    for record in load_prompts(path):
        if record.get("character") not in characters:
            characters.add(record.get("character"))
            chosen.append(record)
        if len(chosen) == count:
            break
    return chosen


def _rename_prompt(record: dict, prompt_key: str, where: str) -> dict:
    if prompt_key not in record:
        raise ValueError(f"{where} has no {prompt_key!r} field (prompt_key); fields: {sorted(record)}")
    renamed = {k: v for k, v in record.items() if k not in ("prompt", prompt_key)}
    renamed["prompt"] = record[prompt_key]
    return renamed


def _column_prompts(path: str | Path, records: list[dict]) -> list[dict]:
    if "prompt" not in records[0] and not is_alpaca(records[0]):
        raise ValueError(
            f"{path}: record 0 has neither a 'prompt' column, an Alpaca 'instruction' nor RPBench card fields "
            f"(npc_profile, conversation); fields found: {sorted(records[0])}"
        )
    prompts = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if is_alpaca(record):
            try:
                prompt = alpaca_prompt(record)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
            record = {k: v for k, v in record.items() if k not in ALPACA_PROMPT_FIELDS}
        elif "prompt" not in record:
            raise ValueError(f"{where} has no 'prompt' field")
        else:
            prompt = record["prompt"]
        prompts.append({**record, "prompt": check_prompt(prompt, where)})
    if any(c in records[0] for c in ("chosen", "rejected")):
        return _distinct_prompts(prompts)
    return prompts


def _distinct_prompts(records: list[dict]) -> list[dict]:
    """Each distinct prompt of a preference file once, in first-seen order.

    Response columns go; a column is kept only where it is a property of the prompt (one value per distinct
    prompt, e.g. `character`, `language`), not of the pair (e.g. the demo's `kind` of rejected reply).
    """
    groups: dict[str, list[dict]] = {}
    for record in records:
        key = json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)
        groups.setdefault(key, []).append(record)
    columns = {k for r in records for k in r} - {"prompt", *PREFERENCE_COLUMNS}
    per_prompt = {
        c
        for c in columns
        if all(len({json.dumps(r.get(c), sort_keys=True, default=str) for r in g}) == 1 for g in groups.values())
    }
    return [{"prompt": g[0]["prompt"], **{c: g[0].get(c) for c in sorted(per_prompt)}} for g in groups.values()]


def _is_rpbench_card(record: dict) -> bool:
    return "npc_profile" in record and "conversation" in record


def _greeting(record: dict, where: str) -> str:
    conversation = record.get("conversation")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"{where}: 'conversation' must be a non-empty list")
    first = conversation[0]
    sentences = first.get("sentences") if isinstance(first, dict) else None
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences) or not sentences:
        raise ValueError(f"{where}: conversation[0] needs a non-empty 'sentences' list of strings")
    return "\n".join(sentences)


def _record_id(record: dict, where: str) -> str | int | None:
    """The ``id`` of an RPBench card or scene: text, an integer or absent (None); anything else names the record."""
    value = record.get("id")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise ValueError(f"{where}: 'id' must be text or an integer, got {value!r}")
    return value


def _rpbench_prompts(path: Path, cards: list[dict], scenes: str | Path | None, opening_turn: str) -> list[dict]:
    if not isinstance(opening_turn, str) or not opening_turn.strip():
        raise ValueError("opening_turn must be a non-empty string")
    scene_by_id = _load_scenes(Path(scenes)) if scenes is not None else {}
    prompts, unmatched = [], 0
    for index, card in enumerate(cards):
        where = f"{path}: record {index}"
        if not _is_rpbench_card(card):
            raise ValueError(f"{where}: not an RPBench character card (needs npc_profile and conversation)")
        profile = card["npc_profile"]
        if not isinstance(profile, dict):
            raise ValueError(f"{where}: 'npc_profile' must be an object")
        missing = [f"npc_profile.{f}" for f in RPBENCH_PROFILE_FIELDS if not isinstance(profile.get(f), str)]
        if not isinstance(card.get("background"), str):
            missing.append("background")
        if missing:
            raise ValueError(f"{where}: card is missing text fields {missing}")
        system = RPBENCH_CHARACTER_TEMPLATE.format(
            background=card["background"], **{f: profile[f] for f in RPBENCH_PROFILE_FIELDS}
        )
        greeting = _greeting(card, where)
        scene = scene_by_id.get(_record_id(card, where))
        if scenes is not None and scene is None:
            unmatched += 1
        if scene is not None:
            system += "".join(f"\n# {title}:\n{scene[key]}\n" for key, title in RPBENCH_SCENE_SECTIONS)
            greeting = scene["greeting"]
        messages = [
            {"role": "system", "content": system},
            {"role": "assistant", "content": greeting},
            {"role": "user", "content": opening_turn},
        ]
        check_unicode(messages, f"{where}: prompt")
        prompts.append(
            {
                "prompt": messages,
                "character": profile["name_text"],
                "rpbench_id": _record_id(card, where),
                "scene": scene is not None,
            }
        )
    if unmatched == len(cards):
        raise ValueError(f"{scenes}: no scene id matches a card id of {path}")
    if unmatched:
        logger.warning(
            f"{scenes}: {unmatched} of {len(cards)} cards of {path} have no scene with their id; they are used "
            "without a scene (their own greeting)"
        )
    return prompts


def _load_scenes(path: Path) -> dict[Any, dict[str, str]]:
    scenes = {}
    for index, record in enumerate(read_records(path)):
        where = f"{path}: record {index}"
        if "id" not in record or "conversation" not in record:
            raise ValueError(f"{where}: not an RPBench scene (needs id and conversation); fields: {sorted(record)}")
        missing = [key for key, _ in RPBENCH_SCENE_SECTIONS if not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"{where}: scene is missing text fields {missing}")
        scene_id = _record_id(record, where)
        if scene_id in scenes:
            raise ValueError(f"{where}: duplicate scene id {scene_id!r}")
        scenes[scene_id] = {key: record[key] for key, _ in RPBENCH_SCENE_SECTIONS}
        scenes[scene_id]["greeting"] = _greeting(record, where)
    return scenes
