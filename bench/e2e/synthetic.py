"""A model, tokenizer, preference pairs and prompts for the end-to-end benchmarks where no real model or data is at
hand (the GPU machine has neither ../shared nor a hub): a Llama built from a config at a real size with random
weights, and the byte-level BPE tokenizer and kind/rude texts the test suite builds (aam_fast/testing.py), given a
ChatML template so that TRL and aam_fast render the same conversations.

Speed and memory at that size are real (the model has the shape's full vocabulary, so the LM head costs what it
costs; the tokenizer's ids are a small part of it); accuracies and rewards mean nothing.

``python -m bench.e2e.synthetic --out DIR [--shape qwen2-0.5b] [--pairs 320] [--prompts 64]`` writes
``DIR/model/``, ``DIR/pairs.jsonl`` (hh-rlhf transcripts whose prompts hold several stories, a few hundred tokens)
and ``DIR/prompts.jsonl`` (conversational ``prompt`` records).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Llama-shaped configs (tied embeddings, grouped-query attention) at the sizes the issue asks for.
SHAPES = {
    "qwen2-0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151_936},
    "qwen2-1.5b": {"hidden": 1536, "intermediate": 8960, "layers": 28, "heads": 12, "kv_heads": 2, "vocab": 151_936},
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1_024},
}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_model_folder(folder: Path, shape: str, seed: int) -> Path:
    """``folder`` holding the randomly initialised model of ``shape`` and the test suite's tokenizer (float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aam_fast.testing import build_tokenizer, corpus

    tokenizer = build_tokenizer(corpus(seed))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"  # completions end where a turn ends
    tokenizer.model_max_length = 4096
    dims = SHAPES[shape]
    if len(tokenizer) > dims["vocab"]:
        raise ValueError(f"shape {shape}'s vocabulary {dims['vocab']} is smaller than the tokenizer's {len(tokenizer)}")
    config = LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pair_records(seed: int, count: int, stories: int) -> list[dict]:
    """hh-rlhf transcripts: a prompt of ``stories`` stories and a question, a kind chosen and a rude rejected reply."""
    from aam_fast.testing import KIND, QUESTIONS, RUDE, hh_transcript, reply, story

    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = " ".join(story(rng) for _ in range(stories)) + " " + rng.choice(QUESTIONS)
        records.append(
            {
                "chosen": hh_transcript([(prompt, reply(rng, KIND))]),
                "rejected": hh_transcript([(prompt, reply(rng, RUDE))]),
            }
        )
    return records


def prompt_records(seed: int, count: int, stories: int) -> list[dict]:
    """Conversational ``prompt`` records: one user turn of ``stories`` stories and a question."""
    from aam_fast.testing import QUESTIONS, story

    rng = random.Random(seed)
    return [
        {"prompt": [{"role": "user", "content": " ".join(story(rng) for _ in range(stories)) + " " + q}]}
        for q in (rng.choice(QUESTIONS) for _ in range(count))
    ]


def write_assets(out: Path, shape: str, pairs: int, prompts: int, stories: int, seed: int) -> dict[str, str]:
    """Write the model, pairs and prompts under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    model = build_model_folder(out / "model", shape, seed)
    paths = {"model": str(model), "pairs": str(out / "pairs.jsonl"), "prompts": str(out / "prompts.jsonl")}
    for key, records in (
        ("pairs", pair_records(seed + 1, pairs, stories)),
        ("prompts", prompt_records(seed + 2, prompts, stories)),
    ):
        Path(paths[key]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--pairs", type=int, default=320)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--stories", type=int, default=12, help="stories per prompt (about 25 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_assets(Path(args.out), args.shape, args.pairs, args.prompts, args.stories, args.seed)))


if __name__ == "__main__":
    main()
