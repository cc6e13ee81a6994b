"""Cached `datasets.map` tokenisation (`encode_pairs`) gives exactly the old loop's output (`encode_all`): the same
token ids, prompt lengths, truncation and counts; a second run reads the cache; the cache key follows the tokenizer
and max_length."""

from __future__ import annotations

import random

import pytest

from aam_fast.data import (
    DataFormatError,
    PairEncoder,
    PreferencePair,
    encode_pairs,
    normalize_record,
    tokenizer_fingerprint,
)

WORDS = "the a forge dwarf sword coal sky blue green once upon time dragon came hello who wakes end".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on a few sentences, BOS added by its post-processor, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([" ".join(WORDS)] * 20 + ["<|user|> <|assistant|> <|system|> ?!."], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def synthetic_pairs(count: int, seed: int = 0) -> list[PreferencePair]:
    """Standard and conversational pairs of random lengths, some far beyond max_length on either side."""
    rng = random.Random(seed)

    def text(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    pairs = []
    for i in range(count):
        long_prompt, long_reply = rng.random() < 0.3, rng.random() < 0.15
        prompt = text(20, 60) if long_prompt else text(1, 8)
        chosen, rejected = " " + (text(30, 50) if long_reply else text(1, 10)), " " + text(1, 10)
        if i % 2:
            record = {"prompt": [{"role": "system", "content": text(1, 5)}, {"role": "user", "content": prompt}]}
            record.update(chosen=chosen.strip(), rejected=rejected.strip())
        else:
            record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        pairs.append(normalize_record({**record, "margin": float(i % 3) or None}, origin=f"syn#{i}"))
    return pairs


def test_equal_to_the_old_loop_first_run_cached_and_in_two_processes(tokenizer, tmp_path):
    pairs = synthetic_pairs(300)
    encoder = PairEncoder(tokenizer, max_length=40)
    expected, expected_stats = encoder.encode_all(pairs)
    assert expected_stats.prompts_truncated > 20 and expected_stats.responses_truncated > 5
    first = encode_pairs(pairs, encoder, cache_dir=tmp_path, progress=False)
    assert first == (expected, expected_stats)
    assert len(list(tmp_path.glob("pairs-*.arrow"))) == 1
    assert encode_pairs(pairs, encoder, cache_dir=tmp_path, progress=False) == (expected, expected_stats)
    two = encode_pairs(pairs, encoder, num_proc=2, cache_dir=tmp_path / "two", progress=False)
    assert two == (expected, expected_stats)
    assert encode_pairs(pairs, encoder, cache=False, progress=False) == (expected, expected_stats)


def test_second_run_reads_the_cache_and_the_key_follows_tokenizer_and_length(tokenizer, tmp_path, monkeypatch):
    pairs = synthetic_pairs(40, seed=1)
    encoder = PairEncoder(tokenizer, max_length=32)
    expected = encode_pairs(pairs, encoder, cache_dir=tmp_path, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(PairEncoder, "encode_sequences", refuse)
    # Other margins and origins: the same texts, so the same cache; margins come from this call's pairs.
    remargined = [PreferencePair(p.prompt, p.chosen, p.rejected, 7.0, None, "other") for p in pairs]
    cached, _ = encode_pairs(remargined, encoder, cache_dir=tmp_path, progress=False)
    assert [e.chosen for e in cached] == [e.chosen for e in expected[0]] and {e.margin for e in cached} == {7.0}
    with pytest.raises(AssertionError, match="tokenised again"):
        encode_pairs(pairs, PairEncoder(tokenizer, max_length=31), cache_dir=tmp_path, progress=False)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer("once upon a time")  # using a tokenizer does not change its fingerprint
    assert tokenizer_fingerprint(tokenizer) == before
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        assert tokenizer_fingerprint(tokenizer) != before
        with pytest.raises(AssertionError, match="tokenised again"):
            encode_pairs(pairs, encoder, cache_dir=tmp_path, progress=False)
    finally:
        tokenizer.chat_template = None


def test_errors_name_the_pair_and_bad_arguments(tokenizer, tmp_path):
    bad = PreferencePair("a string prompt", [{"role": "assistant", "content": "x"}], " y", origin="file.jsonl#4")
    with pytest.raises(DataFormatError, match="file.jsonl#4: cannot tokenise: a string prompt needs a string"):
        encode_pairs([bad], PairEncoder(tokenizer), cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="num_proc must be a positive integer"):
        encode_pairs(synthetic_pairs(2), PairEncoder(tokenizer), num_proc=0)
    assert encode_pairs([], PairEncoder(tokenizer))[0] == []
