"""Preference loading, normalisation, templates, truncation, splitting and collation (aam_fast.data)."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from aam_fast.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataFormatError,
    PairEncoder,
    PreferencePair,
    choose_pad_token_id,
    collate_pairs,
    load_preferences,
    normalize_record,
    parse_hh_transcript,
    prompt_hash_fraction,
    render_conversation,
    split_by_prompt,
)

CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "You are Brokk, a dwarf."}, {"role": "user", "content": "Hello?"}],
    "chosen": [{"role": "assistant", "content": "Hah! Who wakes the forge?"}],
    "rejected": [{"role": "assistant", "content": "Hello. How can I help you today?"}],
    "margin": 1.5,
    "kind": "bland",
}
STANDARD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "kind": "fact"}


@pytest.fixture
def tokenizer(tiny_paths):
    """The byte-level BPE tokenizer of the session's tiny model (aam_fast/testing.py), no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_paths["model"])


def write_jsonl(path: Path, records, compress=False):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Formats


def test_real_hh_rlhf_transcripts_become_conversations(shared_dir, logged):
    data = load_preferences(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz")
    assert logged.count("0 pairs have chosen equal to rejected .* and 3 an empty response") == 1
    assert len(data) == 1873 and data.skipped == 0 and (data.identical, data.empty) == (0, 3)
    for pair in data.pairs:
        assert pair.conversational
        assert pair.prompt[-1]["role"] == "user"
        assert pair.chosen[0]["role"] == "assistant" and pair.rejected[0]["role"] == "assistant"
    first = data.pairs[0]
    assert first.prompt[0] == {"role": "user", "content": "How much alcohol can I drink per day?"}
    assert len(first.chosen) == 1 and first.chosen[0]["content"].startswith("Sounds like alcohol")
    # A few transcripts diverge before their last turn: the prompt is their common part, completions hold the rest.
    multi = [p for p in data.pairs if len(p.chosen) > 1 or len(p.rejected) > 1]
    assert 1 <= len(multi) <= 10


def test_real_sharegpt_with_system_messages(shared_dir):
    data = load_preferences(shared_dir / "data" / "llamafactory-dpo-zh" / "dpo_zh_demo.json")
    assert len(data) == 300
    with_system = [p for p in data.pairs if p.prompt[0]["role"] == "system"]
    assert len(with_system) == 64
    assert all(p.prompt[-1]["role"] == "user" for p in data.pairs)
    assert all(p.chosen == [{"role": "assistant", "content": p.chosen[0]["content"]}] for p in data.pairs)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".parquet.gz"])
def test_every_file_type_loads_the_same_pairs(tmp_path, suffix):
    records = [CONVERSATIONAL, {**CONVERSATIONAL, "margin": None}, STANDARD]
    path = tmp_path / f"pairs{suffix}"
    base = suffix.removesuffix(".gz")
    if base == ".jsonl":
        write_jsonl(path, records, compress=suffix.endswith(".gz"))
    elif base == ".json":
        text = json.dumps(records)
        path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    else:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        # Parquet needs one type per column: store the conversational pairs only.
        records = records[:2]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), buffer)
        raw = buffer.getvalue()
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    data = load_preferences(path, subset_field="kind")
    assert len(data) == len(records)
    assert data.pairs[0].prompt == CONVERSATIONAL["prompt"]
    assert data.pairs[0].chosen == CONVERSATIONAL["chosen"]
    assert data.pairs[0].margin == 1.5 and data.pairs[1].margin is None
    assert data.pairs[0].subset == "bland"
    assert data.pairs[0].origin == f"{path}#0"
    if len(records) == 3:
        assert data.pairs[2] == PreferencePair("The sky is", " blue.", " green.", None, "fact", f"{path}#2")


def test_json_file_holding_json_lines_loads(tmp_path):
    path = write_jsonl(tmp_path / "pairs.json", [STANDARD, STANDARD])
    assert len(load_preferences(path)) == 2


def test_datasets_source_through_load_dataset(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [STANDARD, CONVERSATIONAL])
    data = load_preferences(str(folder), split="train")
    assert len(data) == 2 and data.pairs[1].conversational


def test_implicit_prompt_strings_follow_trl():
    pair = normalize_record({"chosen": "Q: hi? A: hello there", "rejected": "Q: hi? A: go away"})
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: hi? A:", " hello there", " go away")


def test_implicit_prompt_messages():
    user = {"role": "user", "content": "hi"}
    pair = normalize_record(
        {
            "chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [user, {"role": "assistant", "content": "b"}],
        }
    )
    assert pair.prompt == [user] and pair.chosen[0]["content"] == "a" and pair.rejected[0]["content"] == "b"


def test_hh_transcript_parser():
    messages = parse_hh_transcript("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "Hello!" and messages[3]["content"] == ""


def test_sharegpt_system_field_and_string_completion():
    pair = normalize_record(
        {
            "system": "Be terse.",
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "yo"},
            "rejected": "hello, how may I assist you?",
        }
    )
    assert pair.prompt == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert pair.rejected == [{"role": "assistant", "content": "hello, how may I assist you?"}]


# ------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "x", "chosen": "a", "rejected": ["b"]}, "string 'prompt' needs string"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role 'wizard'"),
        ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number"),
        ({"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"}, "unknown speaker"),
        (["not", "an", "object"], "record must be an object"),
    ],
)
def test_bad_record_names_file_and_index(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [STANDARD, STANDARD, record, STANDARD])
    with pytest.raises(DataFormatError) as info:
        load_preferences(path)
    assert str(path) in str(info.value) and "record 2" in str(info.value) and message in str(info.value)
    skipped = load_preferences(path, skip_invalid=True)
    assert len(skipped) == 3 and skipped.skipped == 1 and "record 2" in skipped.skip_reasons[0]


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(STANDARD) + "\n\n{not json\n" + json.dumps(STANDARD) + "\n")
    with pytest.raises(DataFormatError, match=r"record 1 \(line 3\): invalid JSON"):
        load_preferences(path)
    assert load_preferences(path, skip_invalid=True).skipped == 1


def test_bad_files(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.txt").write_text("a,b\n")
    with pytest.raises(DataFormatError, match="unknown file type"):
        load_preferences(tmp_path / "pairs.txt")
    (tmp_path / "object.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_preferences(tmp_path / "object.json")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match="not a readable parquet"):
        load_preferences(tmp_path / "corrupt.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="no valid preference pairs"):
        load_preferences(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------------------------------
# Split


def test_prompt_hash_split_is_stable_and_groups_prompts(shared_dir):
    # The value is part of the contract: a dev set must not move between machines or versions.
    assert prompt_hash_fraction("hello") == 0.24011245664437425
    pairs = load_preferences(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz", skip_invalid=True).pairs
    train, dev = split_by_prompt(pairs, 0.2)
    assert len(train) + len(dev) == len(pairs)
    assert 0.15 < len(dev) / len(pairs) < 0.25
    assert split_by_prompt(pairs, 0.2) == (train, dev)
    dev_prompts = {json.dumps(p.prompt) for p in dev}
    assert not any(json.dumps(p.prompt) in dev_prompts for p in train)
    with pytest.raises(ValueError, match="dev_fraction"):
        split_by_prompt(pairs, 1.0)


# ------------------------------------------------------------------------------------------------------------------
# Tokenisation and collation


def test_fallback_template_and_labels(tokenizer):
    tok = tokenizer
    assert tok.chat_template is None
    pair = normalize_record(CONVERSATIONAL)
    encoded = PairEncoder(tok).encode(pair)
    text = render_conversation(tok, pair.prompt + pair.chosen)
    assert (
        text
        == "<s><|system|>\nYou are Brokk, a dwarf.\n<|user|>\nHello?\n<|assistant|>\nHah! Who wakes the forge?</s>\n"
    )
    chosen = encoded.chosen
    assert tok.decode(chosen.ids[: chosen.prompt_len]).endswith("<|assistant|>\n")
    assert tok.decode(chosen.ids[chosen.prompt_len :]).startswith("Hah! Who wakes the forge?")
    assert chosen.response_tokens == len(chosen.ids) - chosen.prompt_len


def test_tokenizer_chat_template_is_used(tokenizer):
    tok = tokenizer
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    encoded = PairEncoder(tok).encode(normalize_record(CONVERSATIONAL))
    seq = encoded.rejected
    assert (
        tok.decode(seq.ids)
        == "[system] You are Brokk, a dwarf.\n[user] Hello?\n[assistant] Hello. How can I help you today?\n"
    )
    assert tok.decode(seq.ids[seq.prompt_len :]).startswith("Hello. How can")
    assert FALLBACK_CHAT_TEMPLATE not in tok.decode(seq.ids)


def test_standard_format_appends_eos(tokenizer):
    tok = tokenizer
    seq = PairEncoder(tok).encode(normalize_record(STANDARD)).chosen
    assert seq.ids[0] == tok.bos_token_id and seq.ids[-1] == tok.eos_token_id
    assert tok.decode(seq.ids[seq.prompt_len : -1]).strip() == "blue."


def test_left_truncation_keeps_bos_and_response(tokenizer):
    tok = tokenizer
    pair = normalize_record({"prompt": "Once upon a time " * 20, "chosen": " the end.", "rejected": " a dragon came."})
    full = PairEncoder(tok).encode(pair)
    cut = PairEncoder(tok, max_length=40)
    encoded, stats = cut.encode_all([pair])
    for before, after in ((full.chosen, encoded[0].chosen), (full.rejected, encoded[0].rejected)):
        assert len(after.ids) == 40
        assert after.ids[0] == tok.bos_token_id
        assert after.ids[after.prompt_len :] == before.ids[before.prompt_len :]
        assert after.prompt_cut == len(before.ids) - 40 and after.response_cut == 0
    assert stats.prompts_truncated == 2 and stats.prompt_tokens_cut == sum(
        s.prompt_cut for s in (encoded[0].chosen, encoded[0].rejected)
    )
    # A response longer than max_length alone is cut on the right, and counted.
    long = normalize_record({"prompt": "Hi", "chosen": " word" * 50, "rejected": " no"})
    encoded, stats = PairEncoder(tok, max_length=16).encode_all([long])
    assert len(encoded[0].chosen.ids) == 16 and encoded[0].chosen.response_cut > 0
    assert encoded[0].chosen.response_tokens > 16 and stats.responses_truncated == 1


def test_collate_orders_chosen_then_rejected(tokenizer):
    tok = tokenizer
    pad = choose_pad_token_id(tok)
    encoder = PairEncoder(tok)
    pairs = [encoder.encode(normalize_record(r)) for r in (CONVERSATIONAL, {**CONVERSATIONAL, "margin": -0.5})]
    batch = collate_pairs(pairs, pad)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[0] == 4 and ids.shape == mask.shape == labels.shape
    assert ids[0, : len(pairs[0].chosen.ids)].tolist() == pairs[0].chosen.ids
    assert ids[3, : len(pairs[1].rejected.ids)].tolist() == pairs[1].rejected.ids
    for row, seq in enumerate([pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]):
        assert mask[row].sum() == len(seq.ids)
        assert (labels[row, : seq.prompt_len] == IGNORE_INDEX).all()
        assert labels[row, seq.prompt_len : len(seq.ids)].tolist() == seq.ids[seq.prompt_len :]
        assert (labels[row, len(seq.ids) :] == IGNORE_INDEX).all() and (ids[row, len(seq.ids) :] == pad).all()
    assert torch.equal(batch["margin"], torch.tensor([1.5, -0.5]))
    no_margin = encoder.encode(normalize_record(STANDARD))
    assert collate_pairs([pairs[0], no_margin], pad)["margin"] is None


def test_pad_token_differs_from_eos(tokenizer):
    tok = tokenizer
    tok.pad_token = tok.eos_token
    pad = choose_pad_token_id(tok)
    assert pad == tok.unk_token_id != tok.eos_token_id and tok.pad_token_id == pad
