"""Packed (padding-free) batches give the padded batches' rewards, log-probs and gradients on the tiny Llama built by
the test session: hh-rlhf style pairs for the RM stage, GRPO rollouts (left-padded prompts, completions of mixed
lengths) for the policy stage; train-rm and train-grpo with --packing end where the padded runs end."""

import pytest
import torch
from safetensors.torch import load_file

from aam_fast import AAMLoss, linear_logprobs
from aam_fast.data import PairEncoder, collate_pairs, load_preferences, pad_sequences
from aam_fast.modeling import ReferenceModel, RewardModel, RewardScorer, load_causal_lm, save_reward_model
from aam_fast.modeling.packing import add_packing, packed_reward_forward, padded_columns, unpack
from aam_fast.stages.grpo import GRPOConfig, GRPOTrainer, train_grpo
from aam_fast.stages.grpo.rollout import token_logprobs
from aam_fast.stages.rm.config import RMConfig
from aam_fast.stages.rm.trainer import train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pack_and_unpack_layout():
    batch = pad_sequences([([7, 8, 9], 1), ([5], 0), ([4, 3], 1)], pad_token_id=0)
    add_packing(batch)
    assert batch["packed_input_ids"].tolist() == [[7, 8, 9, 5, 4, 3]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 6] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_seq_len"] == 3
    packed = torch.arange(1.0, 7.0, requires_grad=True)
    out = unpack(packed, batch["cu_seq_lens"], 3)
    assert out.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    out.sum().backward()
    assert packed.grad.tolist() == [1.0] * 6


def test_left_and_both_sided_padding_pack_and_read_back_by_column():
    """GRPO rows: left-padded prompt, completion, padding after EOS; positions restart at each first token."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [8, 9, 4, 3, 2, 1], [0, 7, 7, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    batch = add_packing({"input_ids": ids, "attention_mask": mask})
    assert batch["packed_input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1, 7, 7]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]]
    assert batch["packed_starts"].tolist() == [2, 0, 1] and batch["max_seq_len"] == 6
    packed = torch.arange(1.0, 12.0)
    assert padded_columns(packed, batch, 0, 6).tolist() == [
        [0, 0, 1, 2, 3, 0],
        [4, 5, 6, 7, 8, 9],
        [0, 10, 11, 0, 0, 0],
    ]
    assert padded_columns(packed, batch, 3, 2).tolist() == [[2, 3], [7, 8], [0, 0]]


def test_a_gap_in_the_attention_mask_is_refused():
    batch = {"input_ids": torch.tensor([[4, 5, 6]]), "attention_mask": torch.tensor([[1, 0, 1]])}
    with pytest.raises(ValueError, match="one block"):
        add_packing(batch)


def test_packed_rewards_logprobs_and_gradients_equal_padded(tiny_paths):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["model"])
    encoded, _ = PairEncoder(tokenizer, 160).encode_all(load_preferences(tiny_paths["hh"], limit=16).pairs)
    encoded = sorted(encoded, key=lambda p: min(len(p.chosen.ids), len(p.rejected.ids)))[:5]
    batch = add_packing(collate_pairs(encoded, pad_token_id=0))
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # a real length mix: padding exists

    torch.manual_seed(0)
    model = RewardModel(load_causal_lm(tiny_paths["model"]))
    reference = ReferenceModel(model)
    loss_fn = AAMLoss(margin="pr", sft_weight=0.3, backend="torch")
    targets = batch["labels"][:, 1:]
    results = {}
    for mode in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        if mode == "padded":
            out = model(batch["input_ids"], batch["attention_mask"], reference=reference)
        else:
            out = packed_reward_forward(model, batch, reference=reference)
        hidden = out.hidden[:, :-1]
        logps = linear_logprobs(hidden, model.lm_head_weight, targets, backend="torch")
        result = loss_fn(
            hidden,
            model.lm_head_weight,
            targets,
            out.rewards,
            ref_hidden=out.ref_hidden[:, :-1],
            ref_weight=reference.lm_head_weight,
        )
        result.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (out.rewards.detach(), logps.detach(), result.logps, result.ref_logps, result.loss, grads)
    padded, packed = results["padded"], results["packed"]
    assert model.lm.config._attn_implementation == "aam_varlen_sdpa"  # set by the packed forward
    with torch.no_grad():  # padded batches still run plain SDPA under it
        again = model(batch["input_ids"], batch["attention_mask"]).rewards
    torch.testing.assert_close(again, padded[0], rtol=0, atol=0)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)  # rewards
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-5)  # token log-probs
    torch.testing.assert_close(packed[2], padded[2], rtol=1e-5, atol=1e-5)  # sequence log-probs
    torch.testing.assert_close(packed[3], padded[3], rtol=1e-5, atol=1e-5)  # reference sequence log-probs
    torch.testing.assert_close(packed[4], padded[4], rtol=1e-5, atol=1e-6)  # loss
    assert sorted(packed[5]) == sorted(padded[5]) and len(padded[5]) > 10
    for name, grad in padded[5].items():
        torch.testing.assert_close(packed[5][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_rm_with_packing_ends_where_padded_training_ends(tiny_paths, tmp_path):
    common = dict(
        model=tiny_paths["model"],
        data=tiny_paths["hh"],
        max_pairs=16,
        dev_fraction=0.0,
        max_length=160,  # the pairs are 40-123 tokens: a mix of lengths in each batch
        batch_size=4,
        max_steps=2,
        lr=1e-4,
        warmup_ratio=0.0,
        progress=False,
    )
    train_reward_model(RMConfig(output=str(tmp_path / "padded"), **common))
    train_reward_model(RMConfig(output=str(tmp_path / "packed"), packing=True, **common))
    padded = load_file(str(tmp_path / "padded" / "model.safetensors"))
    packed = load_file(str(tmp_path / "packed" / "model.safetensors"))
    for name, value in padded.items():
        torch.testing.assert_close(packed[name], value, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="packing"):
        RMConfig(model="m", data="d", output="o", packing=True, trainable_layers=1, cache_trunk=True).validate()


# ------------------------------------------------------------------------------------------------------ GRPO

GRPO_PROMPTS = [
    {"prompt": "Once upon a time"},
    {"prompt": "One day a little girl named Lily went to the park with her mom. She saw a big"},
    {"prompt": [{"role": "system", "content": "You are Tom, a cat."}, {"role": "user", "content": "Hi!"}]},
    {"prompt": "The dog"},
]


def share_of_a(prompts, completions, **columns):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


@pytest.fixture
def reward_model_dir(tiny_paths, tmp_path):
    """A reward model on the tiny Llama with a random score head (seeded)."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    folder = tmp_path / "rm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["model"])
    save_reward_model(RewardModel(load_causal_lm(tiny_paths["model"])), tokenizer, folder)
    return str(folder)


def grpo_config(paths, reward_model_dir, output, **overrides) -> GRPOConfig:
    settings = dict(
        policy=paths["model"],
        prompts=GRPO_PROMPTS,
        reward_model=reward_model_dir,
        reward_fns=[share_of_a],
        reward_weights=[1.0, 0.5],
        num_generations=3,
        max_new_tokens=10,
        batch_size=4,
        beta=0.04,
        lr=1e-3,
        rm_batch_size=5,
        output=str(output),
        progress=False,
    )
    return GRPOConfig(**{**settings, **overrides})


def test_grpo_packed_logprobs_rewards_loss_and_gradients_equal_padded(tiny_paths, reward_model_dir, tmp_path):
    trainer = GRPOTrainer(grpo_config(tiny_paths, reward_model_dir, tmp_path / "run", num_iterations=2))
    [batch], _ = trainer.make_rollout()
    width = batch.targets.shape[1]
    for row, keep in ((0, 2), (4, 5), (7, 1), (11, width - 1)):  # completions ending early, as at EOS
        batch.targets[row, keep:] = -100
        batch.attention_mask[row, batch.prompt_len + keep :] = 0
    prompt_lengths = batch.attention_mask[:, : batch.prompt_len].sum(1)
    assert prompt_lengths.min() < prompt_lengths.max() and batch.mask.sum(1).unique().numel() > 2  # a length mix
    batch.advantages = torch.linspace(-1.5, 1.2, batch.targets.shape[0])

    policy, reference = trainer.policy, trainer.reference
    logps = {packing: token_logprobs(policy, batch, 1.0, backend="torch", packing=packing) for packing in (0, 1)}
    torch.testing.assert_close(logps[1], logps[0], rtol=1e-5, atol=1e-5)
    assert bool((logps[1][~batch.mask] == 0).all()) and bool((logps[1][batch.mask] < 0).all())
    ref = {packing: token_logprobs(reference, batch, 1.0, backend="torch", packing=packing) for packing in (0, 1)}
    torch.testing.assert_close(ref[1], ref[0], rtol=1e-5, atol=1e-5)
    shift = torch.linspace(-0.4, 0.4, width) * batch.mask  # ratios e^-0.4 .. e^0.4: both clip regions act
    batch.old_logps, batch.ref_logps = logps[0] + shift, ref[0]

    rewards = [
        RewardScorer(reward_model_dir, batch_size=5, packing=p)(batch.prompts, batch.completions) for p in (False, True)
    ]
    torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-5)

    results = {}
    for packing in (False, True):
        trainer.cfg.packing = packing
        policy.zero_grad(set_to_none=True)
        loss, stats = trainer.accumulate_gradients([batch])
        results[packing] = loss, stats, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    (loss, stats, grads), (packed_loss, packed_stats, packed_grads) = results[False], results[True]
    assert packed_loss == pytest.approx(loss, rel=1e-5, abs=1e-7) and loss != 0
    assert packed_stats.keys() == stats.keys() and stats["clip_low_sum"] + stats["clip_high_sum"] > 0
    for key, value in stats.items():
        assert packed_stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert sorted(packed_grads) == sorted(grads) and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_grpo_with_packing_ends_where_padded_training_ends(
    tiny_paths, reward_model_dir, tiny_period_id, tmp_path, monkeypatch
):
    """Three steps, two updates per rollout (old log-probs), the reward model and a rule reward, reference KL;
    completions also stop at a period, so their lengths differ. A small lr: AdamW's first steps turn float32
    rounding of a gradient element near Adam's eps (|g| ~ 1e-8) into an update difference of up to ~0.1 lr."""
    import json

    import aam_fast.stages.grpo.trainer

    monkeypatch.setattr(aam_fast.stages.grpo.trainer, "eos_token_ids", lambda model, tokenizer: [2, tiny_period_id])
    runs = {}
    for packing in (False, True):
        output = tmp_path / ("packed" if packing else "padded")
        settings = dict(packing=packing, max_steps=3, num_iterations=2, seed=1, lr=2e-5)
        rows = train_grpo(grpo_config(tiny_paths, reward_model_dir, output, **settings))
        completions = [json.loads(line) for line in (output / "completions.jsonl").read_text().splitlines()]
        runs[packing] = rows, completions, load_file(str(output / "model.safetensors"))
    (rows, completions, weights), (packed_rows, packed_completions, packed_weights) = runs[False], runs[True]
    assert [r["completion"] for r in packed_completions] == [r["completion"] for r in completions]
    assert len({r["length"] for r in completions}) > 1 and rows[-1]["kl"] > 0
    for row, packed_row in zip(rows, packed_rows, strict=True):
        for key in ("reward", "rewards/reward_model/mean", "loss", "kl", "entropy", "grad_norm"):
            assert packed_row[key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), key
    initial = load_file(tiny_paths["model"] + "/model.safetensors")
    assert max(float((weights[k] - initial[k]).abs().max()) for k in initial) > 5e-5, "the policy did not move"
    for name, value in weights.items():
        torch.testing.assert_close(packed_weights[name], value, rtol=0, atol=1e-5, msg=name)
