"""Packed (padding-free) batches give the padded batches' rewards, log-probs and gradients on the real stories260k
model and real hh-rlhf pairs; train-rm --packing ends where the padded run ends."""

import pytest
import torch
from safetensors.torch import load_file

from aam_fast import AAMLoss, linear_logprobs
from aam_fast.data import PairEncoder, collate_pairs, load_preferences, pad_sequences
from aam_fast.models import ReferenceModel, RewardModel, load_causal_lm
from aam_fast.packing import add_packing, packed_reward_forward, unpack
from aam_fast.rm import RMConfig, train_reward_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def paths(shared_dir):
    return {
        "model": str(shared_dir / "models" / "stories260k"),
        "hh": str(shared_dir / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"),
    }


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


def test_left_padding_is_refused():
    batch = {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        add_packing(batch)


def test_packed_rewards_logprobs_and_gradients_equal_padded(paths):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    encoded, _ = PairEncoder(tokenizer, 160).encode_all(load_preferences(paths["hh"], limit=16).pairs)
    encoded = sorted(encoded, key=lambda p: min(len(p.chosen.ids), len(p.rejected.ids)))[:5]
    batch = add_packing(collate_pairs(encoded, pad_token_id=0))
    lengths = batch["attention_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # a real length mix: padding exists

    torch.manual_seed(0)
    model = RewardModel(load_causal_lm(paths["model"]))
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


def test_train_rm_with_packing_ends_where_padded_training_ends(paths, tmp_path):
    common = dict(
        model=paths["model"],
        data=paths["hh"],
        max_pairs=16,
        dev_fraction=0.0,
        max_length=160,  # hh-rlhf sequences are 45-2193 tokens here: a real mix of lengths in each batch
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
