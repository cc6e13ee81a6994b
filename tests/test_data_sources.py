"""Data sources and data problems: deeply nested JSON, degenerate pairs, unused margins, save_to_disk folders,
CSV, column mapping and Alpaca records, for preference pairs and GRPO prompts alike."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from aam_fast.data import DataFormatError, load_preferences, load_prompts, normalize_record

STANDARD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
DEEP = {"prompt": "x", "chosen": "a", "rejected": "b", "extra": json.loads("[" * 50 + "]" * 50)}
DEEP_TEXT = '{"prompt": "x", "chosen": "a", "rejected": "b", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------------------------
# Deeply nested JSON: a clear error naming file and record, or skipped and counted


def test_deeply_nested_jsonl_record(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(STANDARD) + "\n" + DEEP_TEXT + "\n" + json.dumps(DEEP) + "\n")
    with pytest.raises(DataFormatError, match=r"deep.jsonl: record 1 \(line 2\): JSON nested deeper"):
        load_preferences(path)
    data = load_preferences(path, skip_invalid=True)
    assert len(data) == 2 and data.skipped == 1 and "record 1" in data.skip_reasons[0]


def test_deeply_nested_json_array_record(tmp_path):
    path = tmp_path / "deep.json"
    last = {"prompt": "y", "chosen": "c", "rejected": "d"}
    path.write_text("[" + json.dumps(STANDARD) + ", " + DEEP_TEXT + ", " + json.dumps(last) + "]")
    with pytest.raises(DataFormatError, match=r"deep.json: record 1: JSON nested deeper"):
        load_preferences(path)
    data = load_preferences(path, skip_invalid=True)
    assert [p.prompt for p in data.pairs] == ["The sky is", "y"] and data.skipped == 1
    (tmp_path / "deep_object.json").write_text('{"data": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataFormatError, match="deep_object.json: JSON nested deeper"):
        load_preferences(tmp_path / "deep_object.json", skip_invalid=True)


def test_deeply_nested_prompt_record(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n' + DEEP_TEXT + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl: record 1 \(line 2\): JSON nested deeper"):
        load_prompts(path)


# ------------------------------------------------------------------------------------------------------------------
# Degenerate pairs and an unused margin column


def test_degenerate_pairs_are_counted_and_logged_or_dropped(tmp_path, logged):
    user = [{"role": "user", "content": "hi"}]
    records = [
        STANDARD,
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
        {"prompt": "Q", "chosen": "  ", "rejected": " no"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "yo"}], "rejected": ""},
        {"chosen": "Q: A", "rejected": "Q: A"},  # implicit prompt: everything shared, both completions empty
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    data = load_preferences(path)
    assert logged.count(r"2 pairs have chosen equal to rejected .* and 2 an empty response.*; kept") == 1
    assert len(data) == 5 and (data.identical, data.empty, data.skipped) == (2, 2, 0)
    dropped = load_preferences(path, skip_invalid=True)
    assert [p.origin for p in dropped.pairs] == [f"{path}#0"]
    assert (dropped.identical, dropped.empty, dropped.skipped) == (2, 2, 4)
    assert "record 1: chosen equals rejected" in dropped.skip_reasons[0]
    assert "record 2: empty chosen response" in dropped.skip_reasons[1]
    assert "record 3: empty rejected response" in dropped.skip_reasons[2]


def test_margin_note_only_when_the_variant_ignores_the_column(tmp_path):
    with_margin = write_jsonl(tmp_path / "m.jsonl", [{**STANDARD, "margin": 1.0}, STANDARD])
    data = load_preferences(with_margin)
    assert data.with_margin == 1
    assert data.margin_note("fixed") is None
    note = data.margin_note("pr")
    assert "1 of 2 pairs have a 'margin' column, ignored under margin='pr'" in note
    assert load_preferences(write_jsonl(tmp_path / "n.jsonl", [STANDARD])).margin_note("bt") is None
    with pytest.raises(ValueError, match="margin must be one of"):
        data.margin_note("huge")


# ------------------------------------------------------------------------------------------------------------------
# save_to_disk folders, CSV, column mapping, Alpaca


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [STANDARD, {"prompt": "Grass is", "chosen": " green.", "rejected": " blue."}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [p.prompt for p in load_preferences(tmp_path / "ds").pairs] == ["The sky is", "Grass is"]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[1:])}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert len(load_preferences(tmp_path / "dd")) == 2
    assert [p.prompt for p in load_preferences(tmp_path / "dd", split="test").pairs] == ["Grass is"]
    with pytest.raises(DataFormatError, match=r"no split 'dev' in this DatasetDict \(splits: \['test', 'train'\]\)"):
        load_preferences(tmp_path / "dd", split="dev")
    prompts = load_prompts(tmp_path / "dd", split="test")
    assert prompts == [{"prompt": "Grass is"}]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.csv.gz"])
def test_csv_with_string_margins(tmp_path, name):
    text = 'prompt,chosen,rejected,margin\nThe sky is, blue., green.,1.5\n"Say ""hi""",hi,"bye, then",\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    data = load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in data.pairs] == [
        ("The sky is", " blue.", " green.", 1.5),
        ('Say "hi"', "hi", "bye, then", None),
    ]
    (tmp_path / "bad.csv").write_text("prompt,chosen,rejected,margin\na,b,c,lots\n")
    with pytest.raises(DataFormatError, match=r"bad.csv: record 0: 'margin' must be a finite number, got 'lots'"):
        load_preferences(tmp_path / "bad.csv")
    assert load_prompts(path) == [{"prompt": "The sky is"}, {"prompt": 'Say "hi"'}]
    (tmp_path / "prompts.csv").write_text("prompt,topic\nOnce upon a time,story\n")
    assert load_prompts(tmp_path / "prompts.csv") == [{"prompt": "Once upon a time", "topic": "story"}]


def test_column_mapping(tmp_path):
    rows = [{"question": "2+2?", "good": " 4", "bad": " 5", "score": 2.0, "prompt": "ignored", "chosen": "ignored"}]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    data = load_preferences(path, prompt_key="question", chosen_key="good", rejected_key="bad", margin_key="score")
    pair = data.pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ("2+2?", " 4", " 5", 2.0)
    assert "a 'score' column, ignored under margin='bt'" in data.margin_note("bt")
    with pytest.raises(DataFormatError, match=r"record 0: missing field 'query' \(prompt_key"):
        load_preferences(path, prompt_key="query")
    with pytest.raises(DataFormatError, match=r"record 0: missing field 'best'"):
        load_preferences(path, chosen_key="best")
    with pytest.raises(ValueError, match="chosen_key must be a non-empty string"):
        load_preferences(path, chosen_key="")
    with pytest.raises(ValueError, match="must differ"):
        load_preferences(path, chosen_key="bad", rejected_key="bad")
    assert load_prompts(path, prompt_key="question")[0]["prompt"] == "2+2?"
    with pytest.raises(ValueError, match=r"record 0 has no 'query' field \(prompt_key\)"):
        load_prompts(path, prompt_key="query")


def test_alpaca_records(tmp_path):
    pair = normalize_record({"instruction": "Translate.", "input": "Bonjour", "chosen": "Hello", "rejected": "Bye"})
    assert pair.prompt == [{"role": "user", "content": "Translate.\nBonjour"}]
    assert pair.chosen == [{"role": "assistant", "content": "Hello"}]
    full = normalize_record(
        {
            "system": "Be brief.",
            "history": [["Hi", "Hello!"]],
            "instruction": "Name a colour.",
            "input": "",
            "chosen": "Red.",
            "rejected": "Hmm.",
        }
    )
    assert [m["role"] for m in full.prompt] == ["system", "user", "assistant", "user"]
    assert full.prompt[-1]["content"] == "Name a colour."
    with pytest.raises(ValueError, match="'instruction' and 'input' are both empty"):
        normalize_record({"instruction": "", "input": "", "chosen": "a", "rejected": "b"})
    rows = [{"instruction": f"Task {i}", "input": "data" if i % 2 else "", "output": f"answer {i}"} for i in range(4)]
    prompts = load_prompts(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert [p["prompt"][-1]["content"] for p in prompts] == ["Task 0", "Task 1\ndata", "Task 2", "Task 3\ndata"]
    assert all(set(p) == {"prompt", "output"} for p in prompts) and prompts[1]["output"] == "answer 1"
