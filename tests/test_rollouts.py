"""Shared-prefix rollouts (aam_fast/stages/grpo/generation.py) against ``generate`` on G copies of every prompt, on
the tiny Llama of tests/tiny_assets.py in float32 on the CPU: the prefill of P prompts repeated is bitwise the
prefill of their P·G copies, and the sampled completions are token-identical for the same seeds (prompts of
different lengths, left padding, EOS mid-way and the length limit hit, temperature/top-k/top-p), row-seeded or from
the global RNG."""

from __future__ import annotations

import json

import pytest
import torch

from aam_fast.stages.grpo import GRPOConfig, train_grpo
from aam_fast.stages.grpo.generation import SharedPrefill, generation_positions, new_cache
from aam_fast.stages.grpo.policy import load_policy
from aam_fast.stages.grpo.rollout import generate_micro_batch, left_pad, token_logprobs
from aam_fast.stages.grpo.sampling import completion_seed

pytestmark = pytest.mark.usefixtures("single_thread")

# Three prompt lengths, so two of the three rows are left-padded.
PROMPTS = [
    {"prompt": "Once upon a time, there was a big red ball. Lily"},
    {"prompt": "Tom"},
    {"prompt": "One day, Sam went to the park. The dog was very happy because"},
]


@pytest.fixture(scope="module")
def tiny_policy(tiny_paths):
    return load_policy(tiny_paths["model"], torch.device("cpu"))


def sampling(tokenizer, eos_id: int, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10):
    from transformers import GenerationConfig

    cfg = GRPOConfig(
        policy="unused",
        prompts=PROMPTS,
        reward_fns=["unused:unused"],
        num_generations=4,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    generation = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        eos_token_id=[eos_id],
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    return cfg, generation


# Completion budgets tried in turn: the first at which a batch holds both completions ended by EOS and completions
# cut at the budget is used (how soon the tiny model emits "." depends on its random weights, hence on the versions).
BUDGETS = (10, 6, 4, 3, 2)


def both_endings(draw):
    """``draw(max_new_tokens)`` returns ``(batch, extra)``; the first draw over :data:`BUDGETS` whose batch has
    stopped and truncated completions both (the test needs them both)."""
    for budget in BUDGETS:
        batch, extra = draw(budget)
        if 0 < int(batch.truncated.sum()) < batch.truncated.numel():
            return batch, extra
    raise AssertionError(f"no budget in {BUDGETS} gives both stopped and truncated completions")


def test_prefill_of_the_prompts_repeated_is_bitwise_the_prefill_of_their_copies(tiny_policy):
    policy, tokenizer = tiny_policy
    ids, mask = left_pad([tokenizer(r["prompt"])["input_ids"] for r in PROMPTS], tokenizer.pad_token_id, "cpu")
    shared = SharedPrefill(policy, ids, mask, copies=4)
    copies_ids, copies_mask = ids.repeat_interleave(4, dim=0), mask.repeat_interleave(4, dim=0)
    cache = new_cache(policy.config)
    with torch.no_grad():
        full = policy.base_model(
            input_ids=copies_ids,
            attention_mask=copies_mask,
            position_ids=generation_positions(copies_mask),
            use_cache=True,
            **{shared.keyword: cache},
        ).last_hidden_state
    assert torch.equal(shared.last_hidden, full[:, -1:])
    assert len(shared.cache.layers) == len(cache.layers) > 0
    for ours, theirs in zip(shared.cache.layers, cache.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert torch.equal(shared.attention_mask, copies_mask)
    # the first scores: the LM head on the repeated hidden state is bitwise generate's on the copies
    from transformers import GenerationConfig

    greedy_one = GenerationConfig(
        do_sample=False, max_new_tokens=1, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        first = policy.generate(input_ids=copies_ids, attention_mask=copies_mask, generation_config=greedy_one).logits[
            0
        ]
        ours = policy.get_output_embeddings()(shared.last_hidden)[:, -1].float()
    assert torch.equal(ours, first)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 12, 1.0), (1.0, 0, 0.8), (0.8, 30, 0.9)],
)
def test_shared_prefix_completions_are_token_identical_to_generate_on_copies(
    tiny_policy, tiny_period_id, temperature, top_k, top_p
):
    policy, tokenizer = tiny_policy

    def draw(budget):
        cfg, generation = sampling(tokenizer, tiny_period_id, temperature, top_k, top_p, max_new_tokens=budget)
        seeds = [completion_seed(7, 3, p, g) for p in range(len(PROMPTS)) for g in range(cfg.num_generations)]
        batches = [
            generate_micro_batch(
                policy, tokenizer, PROMPTS, cfg, generation, [tiny_period_id], torch.float32, seeds, method=method
            )[0]
            for method in ("generate", "shared-prefix")
        ]
        return batches[0], batches[1]

    old, new = both_endings(draw)
    assert (old.attention_mask[:, 0] == 0).any(), "left padding"
    assert torch.equal(old.input_ids, new.input_ids)
    assert torch.equal(old.attention_mask, new.attention_mask)
    assert torch.equal(old.targets, new.targets)
    assert torch.equal(old.truncated, new.truncated)
    assert old.prompt_len == new.prompt_len and old.completions == new.completions and old.prompts == new.prompts


def test_global_rng_draws_are_token_identical_too(tiny_policy, tiny_period_id):
    """Without row seeds both methods draw from the global RNG, one multinomial call per step."""
    policy, tokenizer = tiny_policy
    cfg, generation = sampling(tokenizer, tiny_period_id, temperature=0.9, top_k=40, max_new_tokens=8)
    batches = []
    for method in ("generate", "shared-prefix"):
        torch.manual_seed(11)
        batch, _, _ = generate_micro_batch(
            policy, tokenizer, PROMPTS, cfg, generation, [tiny_period_id], torch.float32, method=method
        )
        batches.append(batch)
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert batches[0].completions == batches[1].completions


def test_unknown_method_is_refused(tiny_policy, tiny_period_id):
    policy, tokenizer = tiny_policy
    cfg, generation = sampling(tokenizer, tiny_period_id)
    with pytest.raises(ValueError, match="method must be one of"):
        generate_micro_batch(policy, tokenizer, PROMPTS, cfg, generation, [tiny_period_id], method="vllm")


def test_reserved_cache_holds_what_a_dynamic_cache_holds_within_and_past_its_room(tiny_policy):
    """Keys and values written into the reserved room, and concatenated once past it, equal DynamicCache's."""
    from transformers import DynamicCache

    from aam_fast.stages.grpo.generation import ReservedCache

    config = tiny_policy[0].config
    reserved, plain = ReservedCache(config=config), DynamicCache(config=config)
    layers = len(reserved.layers)
    generator = torch.Generator().manual_seed(0)
    for step, width in enumerate([5, 1, 1, 2, 1]):  # a prompt of 5, then room for 3: the last two go past it
        if step == 1:
            reserved.reserve(3)
        for layer in range(layers):
            keys, values = (torch.randn(2, 2, width, 8, generator=generator) for _ in range(2))
            ours, theirs = reserved.update(keys, values, layer), plain.update(keys, values, layer)
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert reserved.get_seq_length() == plain.get_seq_length() == 10


@pytest.mark.parametrize("max_new_tokens", [1, "mixed"])
def test_shared_prefix_logprobs_equal_the_whole_rows(tiny_policy, tiny_period_id, max_new_tokens):
    """The reference/old-policy pass with each prompt run once gives the whole rows' log-probs up to rounding
    (left padding, completions ended by EOS mid-way and padded after it, temperature); a group of rows whose
    prompts differ is refused."""
    policy, tokenizer = tiny_policy

    def draw(budget):
        cfg, generation = sampling(tokenizer, tiny_period_id, max_new_tokens=budget)
        seeds = [completion_seed(1, 0, p, g) for p in range(len(PROMPTS)) for g in range(cfg.num_generations)]
        rows = generate_micro_batch(policy, tokenizer, PROMPTS, cfg, generation, [tiny_period_id], row_seeds=seeds)
        return rows[0], cfg

    batch, cfg = draw(1) if max_new_tokens == 1 else both_endings(draw)
    whole = token_logprobs(policy, batch, 0.8, backend="torch")
    shared = token_logprobs(policy, batch, 0.8, backend="torch", copies=cfg.num_generations)
    assert bool((whole[batch.mask] < 0).all())
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not share their prompt"):
        token_logprobs(policy, batch, 0.8, backend="torch", copies=cfg.num_generations + 1)


def share_of_a(prompts, completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def test_train_grpo_is_the_same_run_with_either_method_and_resumes_across_them(tiny_paths, tmp_path, logged):
    """A run sampling with shared-prefix equals one that sampled step 1 with generate and resumed with shared-prefix
    (a change allowed with a log line): the same metrics, completions and final weights."""
    from safetensors.torch import load_file

    def config(output, method, **overrides):
        settings = dict(policy=tiny_paths["model"], prompts=PROMPTS, reward_fns=[share_of_a], num_generations=3)
        settings.update(max_new_tokens=6, batch_size=2, lr=1e-3, beta=0.04, max_steps=2, save_every=1, seed=5)
        settings.update(progress=False, log_completions_every=1, output=str(tmp_path / output), generation=method)
        return GRPOConfig(**{**settings, **overrides})

    straight = train_grpo(config("straight", "shared-prefix"))
    switched = train_grpo(config("switched", "generate", max_steps=1))
    logged.clear()
    switched += train_grpo(config("switched", "shared-prefix", resume="auto"))
    assert logged.count(r"changed settings: generation 'generate' -> 'shared-prefix'") == 1

    def untimed(rows):
        return [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows]

    assert untimed(straight) == untimed(switched)
    runs = [tmp_path / "straight", tmp_path / "switched"]
    logged = [[json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()] for run in runs]
    assert logged[0] == logged[1] and len(logged[0]) == 2 * 2 * 3
    first, second = (load_file(run / "model.safetensors") for run in runs)
    assert all(torch.equal(first[name], second[name]) for name in first)
