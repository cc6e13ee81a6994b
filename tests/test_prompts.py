"""Prompt loading for the GRPO stage: RPBench cards (+ scenes), prompt columns in every file format, bad files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from aam_fast.data import DEFAULT_OPENING_TURN, load_prompts

REPO = Path(__file__).resolve().parents[1]
DEMO_PAIRS = REPO / "aam_fast" / "demo" / "roleplay_pairs.jsonl"

CARD = {
    "id": 7,
    "background": "You are role-playing a character based on the following profile.",
    "npc_profile": {
        "definition_text": "I forge blades.",
        "long_definition_text": "Old smith of the hold.",
        "short_definition_text": "Gruff",
        "name_text": "Brokk",
        "title": "Gruff smith",
        "description": "A dwarf who works the forge.",
        "id": 3,
    },
    "conversation": [{"from": "npc", "sentences": ["*The forge roars.*", "What do you want?"]}],
}
SCENE = {
    "id": 7,
    "npc_profile": {"name": "Brokk"},
    "background": "A mountain hold.",
    "plot_recap": "The forge went cold last week.",
    "objectives": "Get the player to fetch coal.",
    "progression": "Ends when the player agrees.",
    "npc_status": "Tired.",
    "conversation": [{"from": "npc", "sentences": ["Coal. Now."], "is_chat_finished": False}],
}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_rpbench_card_becomes_system_greeting_and_opening_turn(tmp_path):
    other = {**CARD, "id": 8, "npc_profile": {**CARD["npc_profile"], "name_text": "Ilsa"}}
    prompts = load_prompts(write_jsonl(tmp_path / "cards.jsonl", [CARD, other]))
    assert [p["character"] for p in prompts] == ["Brokk", "Ilsa"]
    assert [p["rpbench_id"] for p in prompts] == [7, 8]
    messages = prompts[0]["prompt"]
    assert [m["role"] for m in messages] == ["system", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith(CARD["background"] + "\n\n# NPC Profile:\n## Name\nBrokk\n")
    for text in ("## Title\nGruff smith", "A dwarf who works the forge.", "I forge blades.", "Old smith of the hold."):
        assert text in system
    assert messages[1]["content"] == "*The forge roars.*\nWhat do you want?"
    assert messages[2]["content"] == DEFAULT_OPENING_TURN
    assert prompts[0]["scene"] is False


def test_scene_adds_sections_and_its_greeting(tmp_path):
    cards = write_jsonl(tmp_path / "cards.jsonl", [CARD])
    scenes = write_jsonl(tmp_path / "scenes.jsonl", [SCENE])
    [record] = load_prompts(cards, scenes=scenes, opening_turn="Hello?")
    system, greeting, opening = (m["content"] for m in record["prompt"])
    for text in ("# Previous plots recap:\nThe forge went cold", "# Current objectives:\nGet the player", "Tired."):
        assert text in system
    assert greeting == "Coal. Now."
    assert opening == "Hello?"
    assert record["scene"] is True


def test_scene_ids_must_match(tmp_path, logged):
    cards = write_jsonl(tmp_path / "cards.jsonl", [CARD, {**CARD, "id": 9}])
    with pytest.raises(ValueError, match="no scene id matches"):
        load_prompts(cards, scenes=write_jsonl(tmp_path / "s.jsonl", [{**SCENE, "id": 99}]))
    records = load_prompts(cards, scenes=write_jsonl(tmp_path / "s2.jsonl", [SCENE]))
    assert logged.count("1 of 2 cards .* have no scene with their id; they are used without a scene") == 1
    assert [r["scene"] for r in records] == [True, False]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="only to RPBench"):
        load_prompts(plain, scenes=tmp_path / "s2.jsonl")


def test_real_rpbench_files(shared_dir):
    folder = shared_dir / "data" / "rpbench-auto"
    prompts = load_prompts(folder / "rpbench_character.jsonl", scenes=folder / "rpbench_scene.jsonl")
    assert len(prompts) == 80
    assert all(p["scene"] for p in prompts)
    assert all([m["role"] for m in p["prompt"]] == ["system", "assistant", "user"] for p in prompts)
    assert len({p["character"] for p in prompts}) > 70
    assert prompts[0]["character"] == "Your rival Marco" and "Intoxicated" in prompts[0]["prompt"][0]["content"]


def _prompt_records():
    return [
        {"prompt": "Once upon a time", "topic": "story"},
        {"prompt": [{"role": "system", "content": "Be Brokk."}, {"role": "user", "content": "Hi"}], "topic": "rp"},
    ]


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.jsonl.gz", "p.json.gz"])
def test_prompt_column_json_formats(tmp_path, name):
    records = _prompt_records()
    text = json.dumps(records) if ".jsonl" not in name else "".join(json.dumps(r) + "\n" for r in records)
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    assert load_prompts(path) == records


@pytest.mark.parametrize("name", ["p.parquet", "p.parquet.gz"])
@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_column_parquet(tmp_path, name, conversational):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A parquet column has one type: string prompts and message-list prompts go in separate files.
    records = [r for r in _prompt_records() if isinstance(r["prompt"], list) == conversational] * 2
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "raw.parquet")
    raw = (tmp_path / "raw.parquet").read_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    assert load_prompts(path) == records


def test_json_object_holding_the_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": _prompt_records()}))
    assert load_prompts(path) == _prompt_records()


def test_missing_columns_are_filled_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "x": 1}, {"prompt": "b"}, {"prompt": "c", "y": 2}])
    records = load_prompts(path)
    assert records == [
        {"prompt": "a", "x": 1, "y": None},
        {"prompt": "b", "x": None, "y": None},
        {"prompt": "c", "x": None, "y": 2},
    ]
    assert [r["prompt"] for r in load_prompts(path, limit=2)] == ["a", "b"]


def test_preference_file_gives_distinct_prompts_with_prompt_level_columns(tmp_path):
    p1 = [{"role": "system", "content": "Be Brokk."}, {"role": "user", "content": "Sword?"}]
    p2 = [{"role": "system", "content": "Be Ilsa."}, {"role": "user", "content": "Hi"}]
    reply = [{"role": "assistant", "content": "x"}]
    rows = [
        {"prompt": p1, "chosen": reply, "rejected": reply, "character": "Brokk", "kind": "bland"},
        {"prompt": p1, "chosen": reply, "rejected": reply, "character": "Brokk", "kind": "ooc"},
        {"prompt": p2, "chosen": reply, "rejected": reply, "character": "Ilsa", "kind": "bland", "margin": 1.0},
    ]
    records = load_prompts(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert records == [{"prompt": p1, "character": "Brokk"}, {"prompt": p2, "character": "Ilsa"}]


def test_demo_roleplay_profiles():
    if not DEMO_PAIRS.is_file():
        pytest.skip(f"{DEMO_PAIRS} not present (the demo data ships with the RM stage)")
    records = load_prompts(DEMO_PAIRS)
    assert len(records) >= 12
    assert {"character", "language"} <= set(records[0])
    assert all(r["prompt"][0]["role"] == "system" and r["prompt"][-1]["role"] == "user" for r in records)
    assert {"en", "zh"} <= {r["language"] for r in records}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "a"\n', r"record 1 \(line 2\): invalid JSON"),
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "record 1 has no 'prompt' field"),
        ('{"text": "x"}\n', "neither a 'prompt' column, an Alpaca 'instruction' nor RPBench card fields"),
        ('{"prompt": "ok"}\n[1, 2]\n', "record 1 is a list"),
        ('{"prompt": "ok"}\n{"prompt": "  "}\n', "record 1: empty prompt"),
        ('{"prompt": 5}\n', "record 0: prompt must be a non-empty string or message list"),
        ('{"prompt": [{"role": "robot", "content": "x"}]}\n', r"record 0: prompt\[0\] has unknown role 'robot'"),
        ('{"prompt": [{"role": "user"}]}\n', r"record 0: prompt\[0\] must be a \{'role', 'content'\} message"),
        ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "assistant turn"),
        ("\n", "no records"),
    ],
)
def test_bad_prompt_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_bad_cards_and_paths(tmp_path):
    broken = {**CARD, "npc_profile": {k: v for k, v in CARD["npc_profile"].items() if k != "title"}}
    path = write_jsonl(tmp_path / "cards.jsonl", [CARD, broken])
    with pytest.raises(ValueError, match=r"record 1: card is missing text fields \['npc_profile.title'\]"):
        load_prompts(path)
    no_greeting = write_jsonl(tmp_path / "cards2.jsonl", [{**CARD, "conversation": []}])
    with pytest.raises(ValueError, match="record 0: 'conversation' must be a non-empty list"):
        load_prompts(no_greeting)
    with pytest.raises(ValueError, match="unknown file type"):
        load_prompts(write_jsonl(tmp_path / "cards.txt", [CARD]))
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    bad_scene = write_jsonl(tmp_path / "scenes.jsonl", [{**SCENE, "objectives": None}])
    with pytest.raises(ValueError, match=r"scenes.jsonl: record 0: scene is missing text fields \['objectives'\]"):
        load_prompts(write_jsonl(tmp_path / "ok.jsonl", [CARD]), scenes=bad_scene)


def test_tool_role_is_one_message_check_for_prompts_and_pairs(tmp_path):
    # One message check for both: a tool result is a valid turn, and a prompt may end with it (the assistant replies).
    from aam_fast.data import normalize_record

    turns = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Calling the weather tool."},
        {"role": "tool", "content": '{"celsius": 4}'},
    ]
    [record] = load_prompts(write_jsonl(tmp_path / "tool.jsonl", [{"prompt": turns}]))
    assert record["prompt"] == turns
    pair = normalize_record({"prompt": turns, "chosen": "It is 4 degrees.", "rejected": "No idea."})
    assert pair.prompt == turns and pair.chosen == [{"role": "assistant", "content": "It is 4 degrees."}]
