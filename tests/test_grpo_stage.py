"""The GRPO stage end to end on CPU, on the tiny Llama built by the test session (tests/conftest.py); the CLI run on
RPBench cards also on the real stories260k model and RPBench-Auto data where the shared folder exists.

Covers: rollouts (EOS stop, truncation flag, log-probs equal to the sampling distribution), exact gradient
accumulation (normaliser counted over the whole step), a loop that learns a rule reward, exact resume (mid-rollout
too) from `checkpoint-<step>` folders whose every file loads with json or torch.load(weights_only=True), a diverging
run that stops before applying or saving anything non-finite, the reward model scoring as eval-rm does, rule-reward
plumbing, config and CLI. The fused loss's own formula tests live in tests/test_losses.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from dataclasses import fields

import pytest
import torch

from aam_fast.stages.grpo import GRPOConfig, GRPOTrainer, train_grpo
from aam_fast.stages.grpo.policy import load_policy
from aam_fast.stages.grpo.rewards import RewardSources, load_reward_fn
from aam_fast.stages.grpo.rollout import MicroBatch, generate_micro_batch, token_logprobs
from aam_fast.training import TrainingDiverged, add_config_arguments, config_from_args

STORY_PROMPTS = [
    {"prompt": p} for p in ["Once upon a time", "One day", "Lily was", "The cat", "Tom and", "There was a"]
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are tiny: on a shared 2-core CPU, thread hand-offs cost 10× the math."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def policy_dir(tiny_paths):
    """The session's tiny Llama (a save_pretrained folder with its tokenizer)."""
    return tiny_paths["model"]


def share_of_a(prompts, completions, **columns):
    """Rule reward: the fraction of the completion's characters that are the letter 'a' (TRL's completion forms)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def small_config(policy_dir, tmp_path, **overrides) -> GRPOConfig:
    settings = dict(
        policy=policy_dir,
        prompts=STORY_PROMPTS,
        output=str(tmp_path / "run"),
        reward_fns=[share_of_a],
        num_generations=4,
        max_new_tokens=6,
        batch_size=2,
        lr=1e-3,
        max_steps=2,
        progress=False,
        log_completions_every=1,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def rows_of(batch: MicroBatch, rows: slice) -> MicroBatch:
    """The micro-batch restricted to `rows` (tensors and lists alike)."""
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        values[f.name] = value if value is None or isinstance(value, int) else value[rows]
    return MicroBatch(**values)


def untimed(rows) -> list[dict]:
    """Metric rows without their ``timing/*`` wall seconds."""
    return [{k: v for k, v in row.items() if not k.startswith("timing/")} for row in rows]


def test_rollout_stops_at_eos_and_flags_truncation(policy_dir, tiny_period_id):
    from transformers import GenerationConfig

    policy, tokenizer = load_policy(policy_dir, torch.device("cpu"))
    cfg = GRPOConfig(
        policy=policy_dir, prompts=STORY_PROMPTS, reward_fns=[share_of_a], num_generations=8, max_new_tokens=12
    )
    generation = GenerationConfig(
        do_sample=True, top_k=0, max_new_tokens=12, eos_token_id=[tiny_period_id], pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    batch, columns, cut = generate_micro_batch(
        policy, tokenizer, STORY_PROMPTS[:2], cfg, generation, [tiny_period_id], torch.float32
    )
    n, width = batch.targets.shape
    assert n == 16 and width <= 12 and cut == 0
    assert batch.prompts == [STORY_PROMPTS[0]["prompt"]] * 8 + [STORY_PROMPTS[1]["prompt"]] * 8
    completion = batch.input_ids[:, batch.prompt_len :]
    assert 0 < int(batch.truncated.sum()) < n, "the seed should give both stopped and truncated completions"
    for i in range(n):
        kept = batch.targets[i] != -100
        length = int(kept.sum())
        assert bool(kept[:length].all()) and not bool(kept[length:].any()), "the mask is a prefix"
        assert torch.equal(batch.attention_mask[i, batch.prompt_len :].bool(), kept)
        ids = completion[i, :length].tolist()
        if batch.truncated[i]:
            assert length == width == 12 and tiny_period_id not in ids
        else:
            assert ids[-1] == tiny_period_id and tiny_period_id not in ids[:-1], (
                "stops at the first EOS, which is learned"
            )
            assert bool((completion[i, length:] == tokenizer.pad_token_id).all())
            ids = ids[:-1]
        assert batch.completions[i] == tokenizer.decode(ids, skip_special_tokens=True)


def test_logprobs_equal_the_sampling_distribution(policy_dir):
    """Fused forward-only log-probs of a left-padded batch equal log-softmax of the logits generate sampled from."""
    from transformers import GenerationConfig

    policy, tokenizer = load_policy(policy_dir, torch.device("cpu"))
    cfg = GRPOConfig(
        policy=policy_dir,
        prompts=STORY_PROMPTS,
        reward_fns=[share_of_a],
        num_generations=2,
        max_new_tokens=5,
        temperature=0.7,
    )
    generation = GenerationConfig(
        do_sample=True, top_k=0, temperature=0.7, max_new_tokens=5, eos_token_id=[2], pad_token_id=0
    )
    torch.manual_seed(1)
    batch, _, _ = generate_micro_batch(policy, tokenizer, STORY_PROMPTS[:2], cfg, generation, [2], torch.float32)
    ours = token_logprobs(policy, batch, 0.7, torch.float32, "torch")
    prompt_ids = batch.input_ids[:, : batch.prompt_len]
    prompt_mask = batch.attention_mask[:, : batch.prompt_len]
    replay = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=GenerationConfig(
            do_sample=False,
            max_new_tokens=1,
            eos_token_id=[2],
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        ),
    )
    first = torch.log_softmax(replay.logits[0].float() / 0.7, dim=-1)
    expected = first.gather(1, batch.targets[:, :1]).squeeze(1)
    torch.testing.assert_close(ours[:, 0], expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits
    logp = torch.log_softmax(logits[:, batch.prompt_len - 1 : -1].float() / 0.7, dim=-1)
    mask = batch.targets != -100
    full = logp.gather(2, batch.targets.clamp_min(0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_micro_batches_accumulate_to_one_batch(policy_dir, tmp_path, loss_type):
    """The normaliser is counted over the whole step, so an uneven split gives the one-batch gradient."""
    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, loss_type=loss_type, beta=0.1, num_iterations=2))
    [batch], _ = trainer.make_rollout()
    batch.advantages = torch.linspace(-1.5, 1.2, batch.targets.shape[0])
    batch.targets[0, 2:] = -100  # uneven completion lengths, as EOS makes them
    batch.attention_mask[0, batch.prompt_len + 2 :] = 0
    batch.targets[5, 4:] = -100
    batch.attention_mask[5, batch.prompt_len + 4 :] = 0

    def gradient(batches):
        trainer.policy.zero_grad(set_to_none=True)
        loss, totals = trainer.accumulate_gradients(batches)
        return loss, totals, [p.grad.clone() for p in trainer.policy.parameters() if p.grad is not None]

    loss_one, totals_one, grads_one = gradient([batch])
    loss_two, totals_two, grads_two = gradient([rows_of(batch, slice(0, 3)), rows_of(batch, slice(3, None))])
    assert math.isclose(loss_one, loss_two, rel_tol=1e-5, abs_tol=1e-7)
    assert totals_one["tokens"] == totals_two["tokens"] == float((batch.targets != -100).sum())
    assert math.isclose(totals_one["kl_sum"], totals_two["kl_sum"], rel_tol=1e-5, abs_tol=1e-7)
    assert len(grads_one) == len(grads_two) > 0
    for a, b in zip(grads_one, grads_two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in grads_one) > 0


def test_loop_learns_a_rule_reward(policy_dir, tmp_path):
    """With a reward for the letter 'a', the mean reward after a dozen steps is clearly above the first steps'.
    (The tiny model starts near 0.09 and, at this lr, ends near 0.5: completions of " a a a".)"""
    cfg = small_config(
        policy_dir,
        tmp_path,
        num_generations=8,
        max_new_tokens=10,
        max_steps=16,
        lr=5e-3,
        beta=0.0,
        seed=0,
        log_completions_every=0,
    )
    rows = train_grpo(cfg)
    rewards = [r["reward"] for r in rows]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert end > start + 0.15 and end > 2 * start, f"reward did not rise: {[round(r, 3) for r in rewards]}"
    for key in (
        "reward",
        "reward_std",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/clipped_ratio",
        "frac_reward_zero_std",
        "num_tokens",
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/share_of_a/mean",
    ):
        assert all(math.isfinite(r[key]) for r in rows), key
    tokens = [r["num_tokens"] for r in rows]
    assert tokens[0] > 0 and all(b > a for a, b in zip(tokens, tokens[1:], strict=False))  # cumulative, TRL's


def test_resume_is_exact(policy_dir, tmp_path, logged):
    """Stop at step 3 (mid rollout: 2 iterations per rollout), resume to 5: same metrics, completions, weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(grad_accum=2, num_iterations=2, beta=0.04, save_every=3, seed=3, log_completions_every=2)
    full = small_config(policy_dir, tmp_path, output=str(tmp_path / "full"), max_steps=5, **common)
    rows_full = train_grpo(full)
    assert [r["step"] for r in rows_full] == [1, 2, 3, 4, 5]
    # the reference pass runs each prompt once (--generation shared-prefix): the policy's log-probs up to rounding
    assert abs(rows_full[0]["kl"]) < 1e-8 and rows_full[-1]["kl"] > 1e-6
    assert rows_full[1]["clip_ratio/region_mean"] >= 0 and rows_full[0]["reward"] == rows_full[1]["reward"]

    part = tmp_path / "part"
    train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=3, **common))
    with pytest.raises(ValueError, match="holds an earlier run"):
        train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=5, **common))
    with pytest.raises(ValueError, match=r"resuming would change the run: --lr 0.001 -> 0.002"):
        GRPOTrainer(
            small_config(
                policy_dir, tmp_path, output=str(tmp_path / "x"), resume=str(part), max_steps=5, lr=2e-3, **common
            )
        )
    logged.clear()
    GRPOTrainer(
        small_config(
            policy_dir, tmp_path, output=str(tmp_path / "y"), resume=str(part), max_steps=5, **common, backend="torch"
        )
    )
    assert logged.count(r"changed settings: backend 'auto' -> 'torch'") == 1
    resumed = train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=5, resume="auto", **common))
    assert untimed(resumed) == untimed(rows_full[3:])  # the wall seconds differ from run to run
    metrics = [
        untimed(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        for run in (part, tmp_path / "full")
    ]
    assert metrics[0] == metrics[1]
    assert (part / "completions.jsonl").read_text() == (tmp_path / "full" / "completions.jsonl").read_text()
    weights_full = load_file(tmp_path / "full" / "model.safetensors")
    weights_part = load_file(part / "model.safetensors")
    assert weights_full.keys() == weights_part.keys()
    assert all(torch.equal(weights_full[k], weights_part[k]) for k in weights_full)

    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-5"]
    state = json.loads((part / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["mid_rollout"] and state["iteration"] == 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (part / name).is_file()
    assert AutoModelForCausalLM.from_pretrained(part).config.vocab_size == len(AutoTokenizer.from_pretrained(part))
    table = [json.loads(line) for line in (part / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in table} == {1, 3, 5}
    assert {"prompt", "completion", "reward", "advantage", "rewards/share_of_a", "truncated"} <= set(table[0])


def test_reward_model_scores_as_eval_rm(policy_dir, tmp_path):
    """RM + weighted rule reward on conversational prompts: logged rewards equal RewardScorer's scores."""
    from transformers import AutoTokenizer

    from aam_fast.modeling import RewardModel, RewardScorer, load_causal_lm, save_reward_model

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    save_reward_model(RewardModel(load_causal_lm(policy_dir)), AutoTokenizer.from_pretrained(policy_dir), rm_dir)
    chats = [
        {"prompt": [{"role": "system", "content": "You are Tom, a cat."}, {"role": "user", "content": "Hi!"}]},
        {"prompt": [{"role": "system", "content": "You are Lily."}, {"role": "user", "content": "A story?"}]},
    ]
    cfg = small_config(
        policy_dir, tmp_path, prompts=chats, reward_model=str(rm_dir), reward_weights=[0.5, 2.0], max_steps=1, beta=0.0
    )
    train_grpo(cfg)
    table = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(table) == 8
    scores = RewardScorer(rm_dir)([r["prompt"] for r in table], [r["completion"] for r in table])
    for row, score in zip(table, scores.tolist(), strict=True):
        assert math.isclose(row["rewards/reward_model"], score, rel_tol=1e-5, abs_tol=1e-6)
        expected_rule = share_of_a(None, [row["completion"]])[0]
        assert math.isclose(row["rewards/share_of_a"], expected_rule, rel_tol=1e-6)
        assert math.isclose(row["reward"], 0.5 * score + 2.0 * expected_rule, rel_tol=1e-5, abs_tol=1e-6)


def test_reward_sources_none_weights_and_errors(logged):
    def first(prompts, completions, **columns):
        return [1.0, None, 3.0]

    def second(prompts, completions, tag, completion_ids, **columns):
        assert tag == ["x", "y", "z"] and completion_ids == [[1], [2], [3]]
        return [None, None, 1]

    sources = RewardSources(None, [first, second], [1.0, 2.0])
    assert sources.names == ["first", "second"]
    total, table = sources(["p"] * 3, ["a", "b", "c"], {"tag": ["x", "y", "z"], "completion_ids": [[1], [2], [3]]})
    assert logged.count("1 completions got no reward from any source; they count as 0") == 1
    assert total.tolist() == [1.0, 0.0, 5.0]
    assert torch.isnan(table[1]).all() and table[2].tolist() == [3.0, 1.0]

    def short(prompts, completions, **columns):
        return [1.0]

    def wordy(prompts, completions, **columns):
        return ["high", 1]

    with pytest.raises(ValueError, match="reward function short must return a list of 2"):
        RewardSources(None, [short], None)(["p", "q"], ["a", "b"], {})
    with pytest.raises(ValueError, match="reward function wordy returned 'high' for row 0"):
        RewardSources(None, [wordy], None)(["p", "q"], ["a", "b"], {})
    for bad in (float("nan"), float("inf"), "1.5", True):

        def odd(prompts, completions, value=bad, **columns):
            return [0.5, value]

        with pytest.raises(ValueError, match=r"reward function odd returned .* for row 1: expected a finite float"):
            RewardSources(None, [odd], None)(["p", "q"], ["a", "b"], {})

    def nan_model(prompts, completions):
        return torch.tensor([0.0, float("nan")])

    with pytest.raises(ValueError, match="reward model scored row 1 nan"):
        RewardSources(nan_model, [], None)(["p", "q"], ["a", "b"], {})


def test_load_reward_fn_specs(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text("def brevity(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n")
    fn = load_reward_fn(f"{module}:brevity")
    assert fn(["p"], ["abc"]) == [-3]
    assert load_reward_fn("math:sqrt") is math.sqrt
    for bad, message in [
        ("no_colon", "expected 'module:function'"),
        (f"{tmp_path / 'missing.py'}:f", "no such file"),
        ("aam_fast_no_such_module:f", "cannot import"),
        (f"{module}:missing", "has no callable 'missing'"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_reward_fn(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_generations=1), "--num-generations must be >= 2"),
        (dict(reward_fns=[]), "no reward"),
        (dict(reward_weights=[1.0, 2.0]), "--reward-weights has 2 values for 1 reward sources"),
        (dict(temperature=0.0), "--temperature must be > 0"),
        (dict(top_p=1.5), "--top-p must be > 0.0 and <= 1.0"),
        (dict(loss_type="sum"), "--loss-type must be one of"),
        (dict(kl="k4"), "--kl must be one of"),
        (dict(batch_size=0), "--batch-size must be >= 1"),
        (dict(prompts=""), "--prompts: give a prompt file"),
        (dict(lr=float("nan")), "--lr must be > 0"),
    ],
)
def test_config_validation(overrides, message):
    cfg = GRPOConfig(policy="p", **{"prompts": "f.jsonl", "reward_fns": ["m:f"], **overrides})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_cli_flags_map_to_config():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    argv = (
        "--policy P --reward-model RM --prompts F --scenes S --num-generations 6 --max-new-tokens 33 --temperature 0.9 "
        "--top-p 0.95 --beta 0.02 --kl k2 --epsilon 0.1 --epsilon-high 0.28 --loss-type seq-mean-token-sum-norm "
        "--scale-rewards none --num-iterations 3 --entropy-coef 0.01 --lr 2e-6 --max-steps 7 --batch-size 3 "
        "--grad-accum 4 --seed 9 --output OUT --save-every 5 --resume CK --reward-fn a:b --reward-fn c:d "
        "--reward-weights 1 0.5 0.25 --log-completions-every 2 --dtype bfloat16 --packing"
    ).split()
    cfg = config_from_args(GRPOConfig, parser.parse_args(argv))
    assert cfg.policy == "P" and cfg.reward_model == "RM" and cfg.prompts == "F" and cfg.scenes == "S"
    assert (cfg.num_generations, cfg.max_new_tokens, cfg.temperature, cfg.top_p) == (6, 33, 0.9, 0.95)
    assert (cfg.beta, cfg.kl, cfg.epsilon, cfg.epsilon_high) == (0.02, "k2", 0.1, 0.28)
    assert (cfg.loss_type, cfg.scale_rewards, cfg.num_iterations, cfg.entropy_coef) == (
        "seq-mean-token-sum-norm",
        "none",
        3,
        0.01,
    )
    assert (cfg.lr, cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.seed) == (2e-6, 7, 3, 4, 9)
    assert (cfg.output, cfg.save_every, cfg.resume, cfg.log_completions_every, cfg.dtype) == (
        "OUT",
        5,
        "CK",
        2,
        "bfloat16",
    )
    assert cfg.reward_fns == ["a:b", "c:d"] and cfg.reward_weights == [1.0, 0.5, 0.25] and cfg.packing
    cfg.validate()


def test_trainable_layers_freeze_the_trunk_and_head(policy_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    rows = train_grpo(small_config(policy_dir, tmp_path, trainable_layers=1, max_steps=1, dtype="bfloat16"))
    assert math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0
    before = load_file(f"{policy_dir}/model.safetensors")
    after = load_file(tmp_path / "run" / "model.safetensors")
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    last = f"model.layers.{AutoConfig.from_pretrained(policy_dir).num_hidden_layers - 1}."
    assert changed and all(k.startswith((last, "model.norm.")) for k in changed), sorted(changed)


@pytest.fixture(params=["tiny", "real"])
def rpbench(request):
    """Model, cards and scenes: the session's tiny Llama and synthetic cards, then stories260k and the real
    RPBench-Auto files (skipped without the shared folder)."""
    paths = request.getfixturevalue(f"{request.param}_paths")
    return paths["model"], paths["cards"], paths["scenes"]


def test_cli_run_on_rpbench_cards(rpbench, tmp_path, capsys):
    """`aam-fast train-grpo` end to end: RPBench cards + scenes, a rule reward from a file, the final folder."""
    from aam_fast.cli import main

    model, cards, scenes = rpbench
    rules = tmp_path / "rules.py"
    rules.write_text(
        "def brevity(prompts, completions, character, **kw):\n"
        "    assert all(isinstance(c, list) and c[0]['role'] == 'assistant' for c in completions)\n"
        "    return [-len(c[0]['content']) / 100 for c in completions]\n"
    )
    output = tmp_path / "cli"
    argv = [
        "train-grpo", "--policy", model, "--prompts", cards,
        "--scenes", scenes, "--reward-fn", f"{rules}:brevity", "--max-steps", "2",
        "--num-generations", "3", "--max-new-tokens", "5", "--max-prompt-length", "200", "--lr", "1e-3",
        "--output", str(output), "--no-progress", "--threads", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "steps 1..2: reward" in capsys.readouterr().err
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["prompts/truncated"] == 2
    table = [json.loads(line) for line in (output / "completions.jsonl").read_text().splitlines()]
    assert table[0]["prompt"][0]["role"] == "system" and "rewards/brevity" in table[0]
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()


def test_demo_prompts_take_one_per_character(tmp_path):
    from aam_fast.data import prompts_per_character as demo_prompts

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "character": name} for i, name in enumerate("AABCB")]
    path = tmp_path / "profiles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["prompt"][0]["content"] for r in demo_prompts(path, 2)] == ["q0", "q2"]
    assert [r["character"] for r in demo_prompts(path, 5)] == ["A", "B", "C"]


def assert_loads_without_unpickling(folder):
    """Every file of a checkpoint loads with json, torch.load(weights_only=True) or safetensors; returns them."""
    from safetensors.torch import load_file

    loaded = {}
    for path in sorted(folder.iterdir()):
        assert path.is_file(), path
        if path.suffix == ".json":
            loaded[path.name] = json.loads(path.read_text())
        elif path.suffix == ".pt":
            loaded[path.name] = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".safetensors":
            loaded[path.name] = load_file(path)
        else:
            raise AssertionError(f"{path.name}: a checkpoint file that is neither JSON, tensors nor safetensors")
    return loaded


def test_checkpoint_files_load_with_json_or_weights_only(policy_dir, tmp_path):
    """checkpoint-1 is saved mid-rollout (2 iterations per rollout): its RNG states and the rollout's tensors are
    in rank0.pt, the rollout's prompts and texts in rank0.json, all readable without unpickling code."""
    cfg = small_config(policy_dir, tmp_path, max_steps=2, num_iterations=2, save_every=1, beta=0.04)
    train_grpo(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == ["checkpoint-1", "checkpoint-2"]
    mid = assert_loads_without_unpickling(root / "checkpoint-1")
    assert {"model.safetensors", "optimizer.pt", "rank0.pt", "rank0.json", "trainer_state.json"} <= set(mid)
    state, tensors, texts = mid["trainer_state.json"], mid["rank0.pt"], mid["rank0.json"]
    assert state["step"] == 1 and state["mid_rollout"] and state["stage"] == "grpo" and state["world_size"] == 1
    assert set(tensors["rng"]) >= {"python", "numpy", "torch"}
    [rollout] = tensors["rollout"]
    assert rollout["targets"].shape[0] == 8 and {"old_logps", "ref_logps", "advantages"} <= set(rollout)
    assert len(texts["rollout"][0]["completions"]) == 8 and texts["rollout"][0]["prompts"][0] in [
        p["prompt"] for p in STORY_PROMPTS
    ]
    assert mid["optimizer.pt"]["state"] and all(isinstance(k, str) for k in mid["optimizer.pt"]["state"])
    done = assert_loads_without_unpickling(root / "checkpoint-2")
    assert (
        not done["trainer_state.json"]["mid_rollout"] and "rank0.json" not in done and "rollout" not in done["rank0.pt"]
    )


def _nan_loss_at_step_2(trainer):
    original = trainer.loss_fn

    def loss_fn(*args, **kwargs):
        out = original(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * math.nan) if trainer.step == 1 else out

    trainer.loss_fn = loss_fn
    return r"non-finite loss \(nan\) at step 2"


def _nan_gradient_at_step_2(trainer):
    parameter = next(p for p in trainer.policy.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * math.nan if trainer.step == 1 else grad)
    return r"non-finite gradient norm \(nan\) at step 2"


@pytest.mark.parametrize("poison", [_nan_loss_at_step_2, _nan_gradient_at_step_2])
def test_a_diverging_run_stops_before_applying_or_saving_it(policy_dir, tmp_path, poison):
    """A NaN loss, or a finite loss whose gradient is NaN, at step 2: TrainingDiverged names the step and the last
    finite checkpoint; the weights and the optimizer's state are still step 1's, and nothing non-finite is saved."""
    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, max_steps=3, save_every=1, beta=0.04))
    expected = poison(trainer)
    with pytest.raises(TrainingDiverged, match=expected + r".*not applied.*checkpoint-1"):
        trainer.train()
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert not (run / "model.safetensors").exists(), "no final export of a diverged run"
    saved = assert_loads_without_unpickling(run / "checkpoints" / "checkpoint-1")
    assert all(bool(torch.isfinite(t).all()) for t in saved["model.safetensors"].values())
    current = {k.removeprefix("model."): v for k, v in trainer.engine.state_dict().items()}
    for name, value in saved["model.safetensors"].items():
        assert torch.equal(current[name], value), name
    optimizer = trainer.ctx.optimizer_state(trainer.engine, trainer.optimizer)["state"]
    assert optimizer.keys() == saved["optimizer.pt"]["state"].keys() and optimizer
    for name, moments in optimizer.items():
        for key, value in moments.items():
            assert torch.equal(value, saved["optimizer.pt"]["state"][name][key]), (name, key)
            assert bool(torch.isfinite(value).all()) and float(moments["step"]) == 1
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_huge_learning_rate_diverges_without_saving_non_finite_weights(policy_dir, tmp_path):
    """lr 1e30 (above what --lr accepts, so set on the built optimizer and schedule): the weights blow up to ~1e30
    after step 1 (finite), the next forward overflows; the run stops with TrainingDiverged and every checkpoint on
    disk holds finite weights."""
    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, lr=1.0, max_steps=6, save_every=1, max_grad_norm=0.0))
    for group in trainer.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 1e30
    trainer.scheduler.base_lrs = [1e30 for _ in trainer.scheduler.base_lrs]
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at step \d+"):
        trainer.run_to_end()
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    for folder in folders:
        weights = assert_loads_without_unpickling(folder)["model.safetensors"]
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), folder.name


def test_lora_policy_trains_only_its_adapters_against_the_adapters_off_reference(policy_dir, tmp_path):
    """With --lora-r the reference is the policy with its adapters off (no copy): its KL equals a run whose reference
    is a separate frozen copy of the initial policy; only the adapters train; the export merges them and a LoRA run
    resumes exactly (mid-rollout)."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    from safetensors.torch import load_file

    from aam_fast.modeling import ADAPTER_FILE, frozen_copy, load_causal_lm

    common = dict(lora_r=4, lora_alpha=8.0, beta=0.1, lr=2e-2, num_iterations=2, grad_accum=2, seed=4)
    full = train_grpo(
        small_config(
            policy_dir, tmp_path, output=str(tmp_path / "full"), max_steps=3, save_every=1, keep_checkpoints=0, **common
        )
    )
    assert full[-1]["kl"] > 0
    copy = GRPOTrainer(small_config(policy_dir, tmp_path, output=str(tmp_path / "copy"), max_steps=3, **common))
    assert copy.reference is None and copy.adapter_reference
    copy.adapter_reference, copy.reference = False, frozen_copy(load_causal_lm(policy_dir))
    with_copy = copy.train()
    for a, b in zip(full, with_copy, strict=True):
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    merged = load_file(tmp_path / "full" / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    base = load_causal_lm(policy_dir).state_dict()
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only adapted linear layers moved
    assert (tmp_path / "full" / ADAPTER_FILE).is_file()
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-1", part / "checkpoints" / "checkpoint-1")
    resumed = train_grpo(small_config(policy_dir, tmp_path, output=str(part), max_steps=3, resume="auto", **common))
    assert untimed(resumed) == untimed(full[1:])


def test_gradient_checkpointing_gives_the_same_policy(policy_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "plain"), beta=0.0))
    plain_calls, calls["n"] = calls["n"], 0
    train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "gc"), beta=0.0, gradient_checkpointing=True))
    assert calls["n"] > plain_calls  # the layers ran again in the backward
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "gc" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_trl_loss_type_names_run_as_their_aggregation(policy_dir, tmp_path):
    """--loss-type dr_grpo is seq-mean-token-sum-norm: the same losses, step for step."""
    ours = train_grpo(
        small_config(policy_dir, tmp_path, output=str(tmp_path / "a"), loss_type="seq-mean-token-sum-norm")
    )
    trl = train_grpo(small_config(policy_dir, tmp_path, output=str(tmp_path / "b"), loss_type="dr_grpo"))
    assert [r["loss"] for r in ours] == [r["loss"] for r in trl]


@pytest.mark.parametrize("alias", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_cli_accepts_trl_loss_type_names(alias):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GRPOConfig)
    cfg = config_from_args(GRPOConfig, parser.parse_args(["--policy", "P", "--prompts", "F", "--loss-type", alias]))
    assert cfg.loss_type == alias
    cfg.reward_fns = ["m:f"]
    cfg.validate()


def test_terminated_lengths_are_over_the_completions_that_ended_with_eos(policy_dir, tmp_path, tiny_period_id):
    """As TRL logs them: mean/min/max length of the EOS-ended completions (EOS counted); 0.0 when none ended."""
    from aam_fast.stages.grpo.stats import terminated_length_metrics

    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, max_new_tokens=12, num_generations=8, seed=1))
    trainer.eos_ids = [tiny_period_id]  # "." ends a completion: a mix of stopped and truncated ones
    trainer.generation_config.eos_token_id = [tiny_period_id]
    [batch], metrics = trainer.make_rollout()
    lengths, truncated = batch.mask.sum(dim=1).tolist(), batch.truncated.tolist()
    ended = [n for n, cut in zip(lengths, truncated, strict=True) if not cut]
    assert 0 < len(ended) < len(lengths), "the seed should give both stopped and truncated completions"
    assert metrics["completions/mean_terminated_length"] == pytest.approx(sum(ended) / len(ended))
    assert metrics["completions/min_terminated_length"] == min(ended)
    assert metrics["completions/max_terminated_length"] == max(ended)
    # the truncated ones (all of length 12) are left out; an EOS-ended one may also reach 12 (EOS counted)
    assert metrics["completions/max_length"] == 12
    assert all(n == 12 for n, cut in zip(lengths, truncated, strict=True) if cut)
    assert metrics["completions/mean_terminated_length"] != pytest.approx(sum(lengths) / len(lengths))
    none_ended = terminated_length_metrics(torch.tensor([12, 12]), torch.tensor([True, True]))
    assert none_ended == {f"completions/{s}_terminated_length": 0.0 for s in ("mean", "min", "max")}


def test_clip_extremes_are_per_sequence_fractions_over_the_step(policy_dir, tmp_path):
    """clip_ratio/low_min (high_max): the smallest (largest) fraction of a sequence's tokens clipped low (high),
    over every sequence of the step: TRL's nanmin (nanmax) of per-sequence masked means; two micro-batches give the
    one-batch value."""
    from aam_fast.stages.grpo.stats import step_metrics

    trainer = GRPOTrainer(small_config(policy_dir, tmp_path, num_iterations=2, beta=0.0, max_new_tokens=8))
    [batch], _ = trainer.make_rollout()
    batch.targets[0, 2:] = -100  # uneven lengths: per-sequence fractions differ from the token mean
    batch.attention_mask[0, batch.prompt_len + 2 :] = 0
    mask = batch.mask
    logps = token_logprobs(trainer.policy, batch, 1.0)
    noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0)) * 0.4
    noise[:, 0], noise[:, 1] = 0.5, -0.5  # every sequence has a token below 0.8 and one above 1.2
    batch.old_logps = torch.where(mask, logps + noise, 0.0)  # ratio exp(-noise): some tokens outside [0.8, 1.2]
    ratio = torch.exp(-noise)
    for sign in (-1.0, 1.0):
        batch.advantages = sign * torch.linspace(0.5, 1.5, mask.shape[0])
        trainer.policy.zero_grad(set_to_none=True)
        _, one = trainer.accumulate_gradients([batch])
        _, two = trainer.accumulate_gradients([rows_of(batch, slice(0, 3)), rows_of(batch, slice(3, None))])
        low = ((ratio < 0.8) & mask & (sign < 0)).float()
        high = ((ratio > 1.2) & mask & (sign > 0)).float()
        per_sequence_low = low.sum(1) / mask.sum(1)
        per_sequence_high = high.sum(1) / mask.sum(1)
        metrics = step_metrics(0.0, 0.0, 0.0, two)
        assert metrics["clip_ratio/low_min"] == pytest.approx(float(per_sequence_low.min()))
        assert metrics["clip_ratio/high_max"] == pytest.approx(float(per_sequence_high.max()))
        assert metrics["clip_ratio/low_mean"] == pytest.approx(float(low.sum() / mask.sum()))
        assert (
            one["clip_low_seq_min"] == two["clip_low_seq_min"] and one["clip_high_seq_max"] == two["clip_high_seq_max"]
        )
        if sign < 0:
            assert (
                0 < metrics["clip_ratio/low_min"] <= metrics["clip_ratio/low_mean"]
                and metrics["clip_ratio/high_max"] == 0
            )
        else:
            assert (
                metrics["clip_ratio/high_max"] >= metrics["clip_ratio/high_mean"] > 0
                and metrics["clip_ratio/low_min"] == 0
            )
    nothing = step_metrics(0.0, 0.0, 0.0, {"tokens": 0.0, "clip_low_seq_min": math.inf, "clip_high_seq_max": -math.inf})
    assert nothing["clip_ratio/low_min"] is None and nothing["clip_ratio/high_max"] is None


def test_num_tokens_counts_prompt_and_completion_tokens_sampled(policy_dir, tmp_path):
    """num_tokens as TRL's: the running sum over rollouts of every completion's prompt tokens plus its tokens."""
    from aam_fast.stages.grpo.rollout import PromptStream, encode_prompt

    cfg = small_config(policy_dir, tmp_path, max_steps=2, log_completions_every=0)
    trainer = GRPOTrainer(cfg)
    rows = trainer.train()
    sampled = PromptStream(trainer.records, cfg.seed).take(cfg.max_steps * cfg.batch_size)
    prompt_tokens = [len(encode_prompt(trainer.tokenizer, r["prompt"], cfg.max_prompt_length)[0]) for r in sampled]
    assert 0 < rows[0]["num_tokens"] < rows[1]["num_tokens"]
    completion_tokens = [r["completions/mean_length"] * cfg.batch_size * cfg.num_generations for r in rows]
    expected = cfg.num_generations * sum(prompt_tokens) + sum(completion_tokens)
    assert rows[-1]["num_tokens"] == pytest.approx(expected)


def test_steps_log_their_wall_time_per_phase(policy_dir, tmp_path):
    """timing/generation, scoring, logprobs (old and reference) and update: seconds of this step; a step that reuses
    its rollout spent none on the first three."""
    rows = train_grpo(small_config(policy_dir, tmp_path, num_iterations=2, beta=0.04, log_completions_every=0))
    fresh, reused = rows
    for phase in ("generation", "scoring", "logprobs", "update"):
        assert fresh[f"timing/{phase}"] > 0, phase
    assert reused["timing/update"] > 0
    assert reused["timing/generation"] == reused["timing/scoring"] == reused["timing/logprobs"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["timing/update"] for row in logged] == [fresh["timing/update"], reused["timing/update"]]
    from aam_fast.stages.grpo.stats import PhaseTimer

    with pytest.raises(ValueError, match="phase must be one of"):
        with PhaseTimer(torch.device("cpu"))("loss"):
            pass
