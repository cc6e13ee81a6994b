"""Fixtures for the test suite and the benchmarks (``import aam_fast.testing`` from both, as ``torch.testing`` is
imported): a tiny model, tokenizer and data set built in a temporary folder, with no download. Nothing of the
package imports this module.

`build_tiny_assets(folder)` writes, deterministically from `seed`:

- `model/`: a byte-level BPE tokenizer trained on a synthetic corpus (`<unk>`=0, `<s>`=1 prepended to every text,
  `</s>`=2, pad = `<unk>`, no chat template, so `aam_fast.data`'s fallback template is used) and a Llama built from a
  `LlamaConfig` (`LAYERS` decoder layers, hidden `HIDDEN`, grouped-query attention, tied embeddings; about 180K
  parameters), randomly initialised and then trained for 80 AdamW steps (about a second on one core) on the same
  corpus as a language model, so that it writes short sentences that end in a period (the GRPO tests stop
  completions there) instead of uniform noise;
- `hh.jsonl.gz`: hh-rlhf style `\\n\\nHuman: ... \\n\\nAssistant: ...` transcripts (some with an earlier exchange)
  whose chosen reply is kind and whose rejected reply is rude, drawn from disjoint phrase sets of equal mean length
  with independent counts: a signal a reward model learns in a few steps, and a length-only baseline near chance;
- `pairs.jsonl`: TRL conversational preference records (system character card + user turn; one assistant message
  each in `chosen` and `rejected`) with `character` and `topic` columns, the same kind/rude signal;
- `cards.jsonl` / `scenes.jsonl`: RPBench-Auto-like character cards and scenes (the fields `aam_fast.prompts`
  reads), with ids that match.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

LAYERS = 4
HIDDEN = 64
VOCAB = 512  # the BPE target; the model's vocabulary is the trained tokenizer's size (<= VOCAB)
SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2 tokenizers

NAMES = ("Lily", "Tom", "Sam", "Ben", "Mia", "Anna", "Max", "Sara", "Tim", "Zoe")
NOUNS = ("cat", "dog", "ball", "tree", "park", "cake", "bird", "car", "hat", "apple", "boat", "toy", "fish", "box")
ADJECTIVES = ("big", "little", "red", "happy", "small", "sad", "green", "fast", "soft", "shiny", "funny", "old")
VERBS = ("saw", "had", "liked", "found", "wanted", "made", "lost", "gave", "took", "loved")
STORY_TEMPLATES = (
    "Once upon a time, there was a {adj} {noun}.",
    "{name} {verb} a {adj} {noun}.",
    "One day, {name} went to the {noun2}.",
    "The {noun} was very {adj}.",
    "{name} and {name2} played with the {noun}.",
    "{name} was {adj} because the {noun} was {adj2}.",
    "They {verb} a {noun} in the {noun2}.",
    "{name} said hello to the {adj} {noun}.",
)

KIND = (
    "I am glad to help you.",
    "Thank you for asking, dear friend.",
    "Here is a kind answer for you.",
    "Let me tell you a happy story.",
    "Of course, I will gladly help with that.",
    "That is a lovely idea, well done.",
    "Please take care and be safe.",
    "What a wonderful question, thank you.",
)
RUDE = (
    "No. Go away and stop asking me.",
    "I hate this stupid question of yours.",
    "Stop bothering me, you silly fool.",
    "Ugh, you are so boring, really.",
    "Leave me alone, I refuse to help.",
    "Whatever, nobody cares about that.",
    "Shut up and get lost, right now.",
    "That is dumb and so are you, pal.",
)
QUESTIONS = (
    "Can you help me bake a cake?",
    "What should I name my dog?",
    "Tell me about the park.",
    "How do I fix my red car?",
    "Can you tell me a story about a bird?",
    "Where did my little cat go?",
    "Why is the sky blue?",
    "What game should we play today?",
    "Could you help me find my hat?",
    "How do I make a paper boat?",
)
OPENERS = (("Hi there!", "Hello, what can I do for you?"), ("Are you awake?", "Yes, I am here."))

CHARACTERS = (
    ("Brokk", "a dwarf smith", "Gruff but fair; loves his forge and hates idle talk."),
    ("Mira", "a sea witch", "Speaks in riddles and trades secrets for shells."),
    ("Captain Vale", "a sky pirate", "Bold, loud and loyal to the crew of the Tern."),
    ("Pip", "a shy robot", "Beeps when nervous and collects lost buttons."),
    ("Lady Rowan", "a castle healer", "Calm and patient; keeps a garden of bitter herbs."),
    ("Old Finn", "a lighthouse keeper", "Tells long tales about storms and the old days."),
)


def story(rng: random.Random, fewest: int = 2, most: int = 5) -> str:
    """`fewest` to `most` sentences from the story templates (TinyStories-like text)."""
    sentences = []
    for _ in range(rng.randint(fewest, most)):
        template = rng.choice(STORY_TEMPLATES)
        sentences.append(
            template.format(
                name=rng.choice(NAMES),
                name2=rng.choice(NAMES),
                noun=rng.choice(NOUNS),
                noun2=rng.choice(NOUNS),
                adj=rng.choice(ADJECTIVES),
                adj2=rng.choice(ADJECTIVES),
                verb=rng.choice(VERBS),
            )
        )
    return " ".join(sentences)


def reply(rng: random.Random, phrases: tuple[str, ...]) -> str:
    return " ".join(rng.sample(phrases, rng.randint(1, 3)))


def corpus(seed: int, stories: int = 600) -> list[str]:
    """The texts the tokenizer and the language model are trained on: stories, replies, questions, cards."""
    rng = random.Random(seed)
    texts = [story(rng) for _ in range(stories)]
    texts += [reply(rng, KIND) for _ in range(60)] + [reply(rng, RUDE) for _ in range(60)]
    texts += [f"{q} {a}" for q, a in zip(QUESTIONS, KIND + RUDE, strict=False)]
    texts += [f"You are {name}, {title}. {about}" for name, title, about in CHARACTERS]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    """A byte-level BPE `PreTrainedTokenizerFast`: every text encodes (no unknown characters), `<s>` is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def build_model(vocab_size: int, seed: int):
    """A randomly initialised tiny Llama (float32) with the Llama-2 special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def pretrain(model, tokenizer, texts: list[str], seed: int, steps: int = 80, batch: int = 8) -> list[float]:
    """A few AdamW steps of next-token training on `texts` (each `<s> text </s>`); returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        picked = [rows[i] for i in torch.randint(len(rows), (batch,), generator=generator).tolist()]
        width = max(len(r) for r in picked)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, r in enumerate(picked):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def hh_transcript(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {human}\n\nAssistant: {assistant}" for human, assistant in turns)


def preference_records(seed: int, count: int) -> list[dict]:
    """hh-rlhf style records: a question (sometimes after an opening exchange), a kind chosen, a rude rejected."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        history = [rng.choice(OPENERS)] if i % 3 == 0 else []
        question = QUESTIONS[i % len(QUESTIONS)]
        chosen, rejected = reply(rng, KIND), reply(rng, RUDE)
        records.append(
            {
                "chosen": hh_transcript([*history, (question, chosen)]),
                "rejected": hh_transcript([*history, (question, rejected)]),
            }
        )
    return records


def trl_records(seed: int, count: int) -> list[dict]:
    """TRL conversational preference records: a character card as system message, a question, kind vs rude."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        name, title, about = CHARACTERS[i % len(CHARACTERS)]
        prompt = [
            {"role": "system", "content": f"You are {name}, {title}. {about}"},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ]
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": reply(rng, KIND)}],
                "rejected": [{"role": "assistant", "content": reply(rng, RUDE)}],
                "character": name,
                "topic": "even" if i % 2 == 0 else "odd",
            }
        )
    return records


def rpbench_records(seed: int) -> tuple[list[dict], list[dict]]:
    """RPBench-Auto-like character cards and scenes (one each per character, matching ids)."""
    rng = random.Random(seed)
    cards, scenes = [], []
    for index, (name, title, about) in enumerate(CHARACTERS):
        long_definition = story(rng, 3, 6)
        cards.append(
            {
                "id": index,
                "background": "You are role-playing a character based on the following profile.",
                "npc_profile": {
                    "name_text": name,
                    "title": title,
                    "description": about,
                    "definition_text": "",
                    "long_definition_text": long_definition,
                    "short_definition_text": title,
                    "id": 100 + index,
                },
                "conversation": [{"from": "npc", "sentences": [f"*{name} looks up.* Hello there.", story(rng, 1, 2)]}],
            }
        )
        scenes.append(
            {
                "id": index,
                "npc_profile": {"name": name, "personality": about},
                "background": story(rng, 1, 2),
                "plot_recap": story(rng, 1, 2),
                "objectives": f"Help {name} find the {rng.choice(NOUNS)}.",
                "progression": "The scene ends when the item is found.",
                "npc_status": f"{name} is {rng.choice(ADJECTIVES)}.",
                "conversation": [{"from": "npc", "sentences": [f"*{name} waves.* You came back!"]}],
            }
        )
    return cards, scenes


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def build_tiny_assets(folder: Path, seed: int = 0) -> dict[str, str]:
    """Write the tiny model and data under `folder`; returns `{"model", "hh", "pairs", "cards", "scenes"}` paths."""
    folder = Path(folder)
    texts = corpus(seed)
    tokenizer = build_tokenizer(texts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops far too small to split; also keeps the weights independent of the core count
    try:
        model = build_model(len(tokenizer), seed)
        pretrain(model, tokenizer, texts, seed)
    finally:
        torch.set_num_threads(threads)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cards, scenes = rpbench_records(seed + 3)
    return {
        "model": str(model_dir),
        "hh": str(write_jsonl(folder / "hh.jsonl.gz", preference_records(seed + 1, 48))),
        "pairs": str(write_jsonl(folder / "pairs.jsonl", trl_records(seed + 2, 24))),
        "cards": str(write_jsonl(folder / "cards.jsonl", cards)),
        "scenes": str(write_jsonl(folder / "scenes.jsonl", scenes)),
    }
